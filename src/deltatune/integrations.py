"""transformers' ``Trainer``, accelerate and TRL treat a deltatune model as they treat a peft model.

They recognise a PEFT model only by ``isinstance(model, peft.PeftModel)`` and save through ``save_pretrained`` only
for ``PreTrainedModel`` / ``peft.PeftModel`` instances, so a deltatune model would otherwise be trained as a plain
module: dataset columns dropped by the wrapper's ``forward(*args, **kwargs)`` signature, no ``labels`` (so no loss in
evaluation), checkpoints holding every base weight, and TRL calling the wrapper's ``base_model`` as the backbone.
deltatune already has what they use on a peft model (``get_base_model``, ``base_model.model``, ``active_adapters``,
``load_adapter`` into an existing adapter, ``set_adapter``, ``disable_adapter``, ``add_adapter``,
``enable_input_require_grads``, ``save_pretrained``); what it cannot do from its own side is pass their isinstance
tests, which is why these few patches exist:

- ``transformers.trainer_utils._is_peft_model``: also true for a deltatune model. Trainer then inspects the base
  model (columns and label names: default ``TrainingArguments`` work and evaluation computes the loss), resumes and
  restores the best checkpoint through ``load_adapter``, and finds the NEFTune embeddings, as for peft.
- ``transformers.Trainer._save``: writes a deltatune model with ``save_pretrained`` (the adapter in peft's format,
  nothing of the base) instead of the full state dict.
- ``accelerate.utils.is_peft_model`` (TRL's test): also true for a deltatune model, so TRL computes through the base
  model's backbone and uses ``disable_adapter`` / a frozen ``"ref"`` adapter as the reference model, as for peft.
- TRL's SFT and DPO trainers test ``isinstance(lm_head, BaseTunerLayer)`` to refuse an adapter on the LM head (their
  fused head reads ``lm_head.weight`` and would bypass it); ``AdapterLayer`` joins that test. Where peft is not
  installed, the peft names those modules would have imported are given their peft meaning: no object is a peft
  ``LoraConfig``, and ``use_adapter`` works for a deltatune model.

Each patch wraps the original, falls through to it for every other model (plain transformers models and peft models
behave exactly as before), never imports peft, and is idempotent. ``import deltatune`` calls :func:`install`: modules
already imported are patched at once, the others right after they are imported (a post-import hook on
``sys.meta_path``), so import order does not matter and ``import deltatune`` imports none of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .layers import AdapterLayer
from .model import PeftModel

_MARK = "__deltatune_original__"  # set on every wrapper: the wrapped original (idempotence, tests)
_SCANNED = ("transformers", "accelerate", "trl")  # whose modules may hold a re-bound copy of a patched function


def is_deltatune_model(model: Any) -> bool:
    """Whether ``model`` is a deltatune ``PeftModel`` (any task wrapper)."""
    return isinstance(model, PeftModel)


def _wrap(module: ModuleType, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace function ``module.name`` by ``make(original)``, also where other loaded modules of ``_SCANNED`` bound
    it by ``from module import name``; nothing when it is already wrapped or missing."""
    original = module.__dict__.get(name)
    if original is None or hasattr(original, _MARK):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _MARK, original)
    for loaded in list(sys.modules.values()):
        namespace = getattr(loaded, "__dict__", None)
        if (
            namespace is not None and namespace.get(name) is original
            and getattr(loaded, "__name__", "").partition(".")[0] in _SCANNED
        ):
            setattr(loaded, name, wrapper)
    setattr(module, name, wrapper)


# --- transformers ----------------------------------------------------------------------------------------------------
def _patch_trainer_utils(module: ModuleType) -> None:
    _wrap(module, "_is_peft_model", lambda original: lambda model: is_deltatune_model(model) or original(model))


def _patch_trainer(module: ModuleType) -> None:
    _patch_trainer_utils(module)  # older transformers defined _is_peft_model in trainer.py itself
    trainer = module.Trainer
    original = trainer.__dict__["_save"]
    if hasattr(original, _MARK):
        return
    args_name = getattr(module, "TRAINING_ARGS_NAME", "training_args.bin")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """For a deltatune model: the adapter via ``save_pretrained`` (its values from ``state_dict`` when Trainer
        gathered one), then the tokenizer and training arguments as Trainer writes them beside any model."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_deltatune_model(model):
            return original(self, output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # a state dict Trainer gathered (FSDP, DeepSpeed ZeRO-3, ...) holds the full values of sharded parameters
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, args_name))

    functools.update_wrapper(_save, original)
    setattr(_save, _MARK, original)
    trainer._save = _save


# --- accelerate / TRL ------------------------------------------------------------------------------------------------
def _patch_accelerate(module: ModuleType) -> None:
    def make(original: Callable) -> Callable:
        def is_peft_model(model: Any) -> bool:
            if original(model):
                return True
            from accelerate.utils.other import extract_model_from_parallel

            return is_deltatune_model(extract_model_from_parallel(model))

        return is_peft_model

    _wrap(module, "is_peft_model", make)


class _NotPeftInstalled:
    """Stands for a peft class where peft is not installed: nothing is an instance of it."""


def _patch_trl_trainer(module: ModuleType) -> None:
    tuner = module.__dict__.get("BaseTunerLayer")
    if tuner is None:
        module.BaseTunerLayer = AdapterLayer
    elif isinstance(tuner, type) and tuner is not AdapterLayer:
        module.BaseTunerLayer = (tuner, AdapterLayer)  # isinstance() takes a tuple
    module.__dict__.setdefault("LoraConfig", _NotPeftInstalled)


def _patch_trl_utils(module: ModuleType) -> None:
    def make(original: Callable) -> Callable:
        @contextlib.contextmanager
        def use_adapter(model: Any, adapter_name: str | None) -> Iterator[None]:
            if not is_deltatune_model(model):
                with original(model, adapter_name):
                    yield
                return
            if adapter_name is None:
                with model.disable_adapter():
                    yield
                return
            previous = model.active_adapter
            model.set_adapter(adapter_name)
            try:
                yield
            finally:
                model.set_adapter(previous)

        return use_adapter

    _wrap(module, "use_adapter", make)


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "transformers.trainer_utils": _patch_trainer_utils,
    "transformers.trainer": _patch_trainer,
    "accelerate.utils.modeling": _patch_accelerate,
    "accelerate.utils": _patch_accelerate,
    "trl.trainer.utils": _patch_trl_utils,
    "trl.trainer.sft_trainer": _patch_trl_trainer,
    "trl.trainer.dpo_trainer": _patch_trl_trainer,
}


# --- post-import hook ------------------------------------------------------------------------------------------------
class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then its patch."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds a module of ``_PATCHES`` with the other finders and wraps its loader in a ``_PatchingLoader``."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Patch what is imported now and hook what is imported later (idempotent)."""
    if not any(isinstance(finder, _PostImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)

"""peft's module-level API for working without (or beside) the ``PeftModel`` wrapper.

``inject_adapter_in_model`` adds a layer adapter to any ``nn.Module`` in place, with no wrapper: the model keeps its
own class and forward, which is what frameworks that manage their own model object (diffusers, custom trainers) want.
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` read and write an adapter in the saved format (peft's
keys) for such a model or for a ``PeftModel``; the key layout follows the object: ``base_model.model.<path>`` under a
``PeftModel``, ``<path>`` for an injected plain model.

``get_base_model_state_dict`` / ``set_base_model_state_dict`` read and write the *base* model's tensors under its own
keys (no ``base_layer`` / ``original_module`` infixes, no adapter tensors), e.g. to load base weights after FSDP
wrapping; ``load_peft_weights`` reads an adapter file safely; ``cast_mixed_precision_params`` prepares mixed-precision
training.

``get_layer_status`` / ``get_model_status`` report, per adapter layer and for the whole model, which adapters exist,
are active, merged, trainable and on which devices — the questions that come up when a model behaves unexpectedly
(``status`` computes them).
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import status
from .checkpoint import (
    LAYER_KEY_PREFIX, gathered_values, layer_adapter_state_dict, load_layer_adapter_state_dict, restore_base_on_error,
)
from .config import PeftConfig
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .files import read_weights
from .inject import (
    add_layer_adapter, add_modules_to_save, mark_trainable, prepared_model, remove_adapter, set_active,
)
from .layers import AdapterLayer, ModulesToSaveWrapper, adapter_layers
from .model import PeftModel, _hub_kwargs
from .registry import LayerMethod, get_method
from .resolve import resolve
from .status import ModelStatus, TunerLayerStatus
from .targeting import trained_biases


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add layer adapter ``adapter_name`` to ``model`` in place, make it active and trainable, and return ``model``.

    Args:
        peft_config: A layer method's config (prompt methods need the ``PeftModel`` wrapper to feed their inputs).
        model: Any module; it keeps its class and forward.
        adapter_name: Name of the new adapter.
        low_cpu_mem_usage: peft builds the adapter on the meta device and fills it from ``state_dict``; deltatune
            builds it where the base is and loads ``state_dict`` into it, the same result, so this is accepted with
            a ``state_dict`` and refused without one (peft would leave meta tensors).
        state_dict: Adapter weights in the saved format (``<path>.lora_A.weight``, ...) to load right away.

    Raises:
        ConfigError: ``peft_config`` belongs to a prompt or router method, or ``low_cpu_mem_usage`` without
            ``state_dict``.
        TargetError: the targets match nothing or a module the method cannot adapt.
        AdapterLoadError: ``state_dict`` does not fit the adapter; ``model`` unchanged.
    """
    if low_cpu_mem_usage and state_dict is None:
        raise ConfigError(
            "low_cpu_mem_usage=True without a state_dict (an adapter left on the meta device) is not supported; "
            "pass the adapter's state_dict, or leave low_cpu_mem_usage off"
        )
    method = get_method(peft_config.peft_type)
    if not isinstance(method, LayerMethod):
        raise ConfigError(
            f"{peft_config.peft_type.value} is not a layer method (prompt methods feed the model extra inputs, "
            f"routers such as X-LoRA load experts and run a second pass), which needs the PeftModel wrapper; use "
            f"get_peft_model(model, config) instead of inject_adapter_in_model"
        )
    if any(adapter_name in layer.deltas for _, layer in adapter_layers(model)):
        raise AdapterStateError(f"the model already has an adapter named {adapter_name!r}; choose another name")
    with restore_base_on_error(model, peft_config):  # a failure anywhere below leaves the model as it was
        with prepared_model(model, peft_config, method):
            resolved = resolve(model, peft_config, method)  # a copy: the caller's config is never modified
            add_layer_adapter(model, resolved, adapter_name)
        config = resolved.config
        try:
            if config.modules_to_save:
                tie = getattr(config, "ties_modules_to_save", False)
                add_modules_to_save(model, config.modules_to_save, adapter_name, tie)
            if state_dict is not None:
                set_peft_model_state_dict(model, state_dict, adapter_name)
        except Exception:
            remove_adapter(model, adapter_name)
            raise
    set_active(model, [adapter_name])
    mark_trainable(model, [adapter_name], trained_biases(config))
    return model


def _root_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The module the saved keys are relative to, and the prefix the file puts before them."""
    if isinstance(model, PeftModel):
        return model.get_base_model(), LAYER_KEY_PREFIX
    return model, ""


def get_peft_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None, adapter_name: str = "default",
    unwrap_compiled: bool = False, save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name`` of ``model`` (a ``PeftModel`` or an injected plain module) keyed as in
    ``adapter_model.safetensors``.

    Args:
        state_dict: Take the values from this full state dict of ``model`` (e.g. one gathered by DeepSpeed/FSDP)
            instead of from the live parameters (:func:`deltatune.checkpoint.gathered_values`).
        unwrap_compiled: Read through a ``torch.compile`` wrapper (``_orig_mod``).
        save_embedding_layers: As in ``PeftModel.save_pretrained`` (``PeftModel`` only).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    root, prefix = _root_and_prefix(model)
    if isinstance(model, PeftModel):
        saved = model.adapter_state_dict(adapter_name, save_embedding_layers)
    else:
        if not any(adapter_name in layer.deltas for _, layer in adapter_layers(root)):
            raise AdapterStateError(f"the model has no layer adapter named {adapter_name!r}")
        saved = layer_adapter_state_dict(root, adapter_name)
    if state_dict is None:
        return saved
    return model.adapter_state_dict(adapter_name, save_embedding_layers, state_dict) if isinstance(model, PeftModel) \
        else gathered_values(saved, state_dict, root, adapter_name, prefix=prefix)


@dataclass(frozen=True)
class LoadResult:
    """What ``set_peft_model_state_dict`` returns (the shape of ``nn.Module.load_state_dict``'s result). Loading is
    strict and all-or-nothing, so both lists are always empty; a file that does not fit raises instead."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load saved-format tensors into the existing adapter ``adapter_name`` of ``model``, all or nothing.

    Raises:
        AdapterLoadError: a key does not fit, a shape differs, or an adapter tensor is missing; ``model`` unchanged.
        ConfigError: ``ignore_mismatched_sizes=True`` (deltatune never loads part of an adapter silently).
    """
    if ignore_mismatched_sizes:
        raise ConfigError("ignore_mismatched_sizes=True is not supported: a tensor that does not fit is an error, so "
                          "that an adapter never loads partially; fix the adapter or the base model instead")
    if isinstance(model, PeftModel):
        model.load_adapter_state_dict(dict(peft_model_state_dict), adapter_name, "state dict")
    else:
        load_layer_adapter_state_dict(model, peft_model_state_dict, adapter_name, "state dict")
    return LoadResult()


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper of ``model`` (a ``PeftModel`` or an
    injected plain module).

    Raises:
        AdapterStateError: the model has no adapter layers.
    """
    if isinstance(model, PeftModel):
        return model.get_layer_status()
    return status.get_layer_status(model)


def get_model_status(model: nn.Module) -> ModelStatus:
    """One summary of :func:`get_layer_status` for the whole model."""
    if isinstance(model, PeftModel):
        return model.get_model_status()
    return status.get_model_status(model)


def load_peft_weights(
    model_id: str, device: str | torch.device | None = None, key_mapping: Mapping[str, str] | None = None,
    **hf_hub_download_kwargs,
) -> dict[str, torch.Tensor]:
    """The tensors of ``model_id``'s adapter file (a local directory or a hub repo), keyed as saved.

    ``adapter_model.safetensors`` is preferred (its header checked before anything is allocated); a pickled
    ``adapter_model.bin`` is read only as a weights-only pickle, never unpickling objects.

    Args:
        device: Where the tensors go; ``None``: the current accelerator if there is one, else the CPU (peft's rule).
        key_mapping: ``{regex: replacement}`` applied to each key with its ``base_model.model.`` (or
            ``base_model.``) prefix removed, the first pattern that matches only, as in peft.
        hf_hub_download_kwargs: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``; any
            other keyword is a ``TypeError`` naming it.

    Raises:
        AdapterLoadError: no weights file, a corrupt or unsafe one, or a key without peft's prefix to remap.
        ConfigError: a ``key_mapping`` pattern that is not a valid regular expression.
    """
    hub = _hub_kwargs("load_peft_weights", dict(hf_hub_download_kwargs))
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accelerator if accelerator is not None else "cpu"
    patterns = []
    for pattern, replacement in (key_mapping or {}).items():
        try:
            patterns.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise ConfigError(f"load_peft_weights: key_mapping pattern {pattern!r} is not a regex: {exc}") from None
    tensors, path = read_weights(model_id, **hub)
    out = {}
    for key, value in tensors.items():
        if patterns:
            prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
            if prefix is None:
                raise AdapterLoadError(f"{path}: key {key!r} has no 'base_model.' prefix, so key_mapping cannot apply")
            rest = key[len(prefix):]
            for pattern, replacement in patterns:
                rest, count = pattern.subn(replacement, rest)
                if count:
                    break
            key = prefix + rest
        out[key] = value.to(device)
    return out


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s frozen floating-point parameters to ``dtype`` (``torch.float16`` / ``torch.bfloat16``) and its
    trainable ones to float32, in place: half the memory for the base, full precision for what the optimizer updates
    (peft's mixed-precision recipe). Integer-stored (quantized) parameters are left as they are.

    Raises:
        ConfigError: ``dtype`` is not a floating-point dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"cast_mixed_precision_params: dtype must be a floating-point torch.dtype, got {dtype!r}")
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype if not param.requires_grad else torch.float32)


def _base_keys(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The module holding the base model (``PeftModel``: its base model; else ``model``, with or without injected
    adapters) and ``{original key: key in its state_dict()}`` for every base tensor: keys read through an adapter
    layer's ``base_layer`` and a ``modules_to_save`` wrapper's ``original_module`` lose that infix, and every other
    tensor of those wrappers (deltas, trained copies) is the adapter's, left out."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    keys = {}
    for key in root.state_dict(keep_vars=True):
        *path, leaf = key.split(".")
        module, kept, adapter = root, [], False
        for part in path:
            child = module._modules.get(part) if module is not None else None
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                if part not in ("base_layer", "original_module"):
                    adapter = True
                    break
            else:
                kept.append(part)
            module = child
        if not adapter and not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            keys[".".join([*kept, leaf])] = key
    return root, keys


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under the base model's own keys, without the adapters' (peft's function: the keys
    ``model.get_base_model().state_dict()`` had before any adapter was added). ``model``: a ``PeftModel`` or a module
    with injected adapters. Merged adapters are part of the weights, as in peft."""
    root, keys = _base_keys(model)
    state = root.state_dict()
    return {original: state[key] for original, key in keys.items()}


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def set_base_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load base-model tensors keyed as in :func:`get_base_model_state_dict` into ``model``'s base, all or nothing.

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)`` (original keys), as in peft.

    Raises:
        RuntimeError: ``strict`` and keys are missing or unexpected (peft's error), or a tensor's shape differs
            (checked before anything is written).
        AdapterStateError: an adapter is merged into the weights (loading under it would make unmerging wrong);
            unmerge first.
    """
    root, keys = _base_keys(model)
    merged = [name for name, layer in adapter_layers(root) if layer.merged]
    if merged:
        raise AdapterStateError(f"set_base_model_state_dict: adapters are merged into {merged[:5]}; unmerge first")
    missing = [k for k in keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in keys]
    if strict and (missing or unexpected):
        messages = [f"{what} key(s) in state_dict: {names}"
                    for what, names in (("Missing", missing), ("Unexpected", unexpected)) if names]
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(messages))
    current = root.state_dict()
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(current[keys[k]].shape)}"
             for k in state_dict if k in keys and state_dict[k].shape != current[keys[k]].shape]
    if wrong:
        raise RuntimeError(f"set_base_model_state_dict: size mismatch (given vs model), nothing loaded: {wrong}")
    root.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)

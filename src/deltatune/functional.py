"""peft's module-level API for working without (or beside) the ``PeftModel`` wrapper.

``inject_adapter_in_model`` adds a layer adapter to any ``nn.Module`` in place, with no wrapper: the model keeps its
own class and forward, which is what frameworks that manage their own model object (diffusers, custom trainers) want.
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` read and write an adapter in the saved format (peft's
keys) for such a model or for a ``PeftModel``; the key layout follows the object: ``base_model.model.<path>`` under a
``PeftModel``, ``<path>`` for an injected plain model.

``get_layer_status`` / ``get_model_status`` report, per adapter layer and for the whole model, which adapters exist,
are active, merged, trainable and on which devices — the questions that come up when a model behaves unexpectedly
(``status`` computes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import status
from .checkpoint import (
    LAYER_KEY_PREFIX, gathered_values, layer_adapter_state_dict, load_layer_adapter_state_dict, restore_base_on_error,
)
from .config import PeftConfig
from .errors import AdapterStateError, ConfigError
from .inject import (
    add_layer_adapter, add_modules_to_save, mark_trainable, prepared_model, remove_adapter, set_active,
)
from .layers import adapter_layers
from .model import PeftModel
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

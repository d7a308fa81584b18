"""peft's module-level API for working without (or beside) the ``PeftModel`` wrapper.

``inject_adapter_in_model`` adds a layer adapter to any ``nn.Module`` in place, with no wrapper: the model keeps its
own class and forward, which is what frameworks that manage their own model object (diffusers, custom trainers) want.
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` read and write an adapter in the saved format (peft's
keys) for such a model or for a ``PeftModel``; the key layout follows the object: ``base_model.model.<path>`` under a
``PeftModel``, ``<path>`` for an injected plain model.

``get_layer_status`` / ``get_model_status`` report, per adapter layer and for the whole model, which adapters exist,
are active, merged, trainable and on which devices — the questions that come up when a model behaves unexpectedly.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .checkpoint import (
    LAYER_KEY_PREFIX,
    adapter_holders,
    layer_adapter_state_dict,
    load_layer_adapter_state_dict,
    to_model_keys,
)
from .config import PeftConfig
from .errors import AdapterStateError, ConfigError
from .inject import add_layer_adapter, add_modules_to_save, mark_trainable, set_active
from .layers import AdapterLayer, ModulesToSaveWrapper, adapter_layers
from .registry import LayerMethod, get_method

Irregular = Literal["irregular"]  # the adapter is in different states in different layers


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add layer adapter ``adapter_name`` to ``model`` in place, make it active and trainable, and return ``model``.

    Args:
        peft_config: A layer method's config (prompt methods need the ``PeftModel`` wrapper to feed their inputs).
        model: Any module; it keeps its class and forward.
        adapter_name: Name of the new adapter.
        low_cpu_mem_usage: Accepted for peft compatibility; adapters are always built directly where the base is.
        state_dict: Adapter weights in the saved format (``<path>.lora_A.weight``, ...) to load right away.

    Raises:
        ConfigError: ``peft_config`` belongs to a prompt method.
        TargetError: the targets match nothing or a module the method cannot adapt.
    """
    method = get_method(peft_config.peft_type)
    if not isinstance(method, LayerMethod):
        raise ConfigError(
            f"{peft_config.peft_type.value} is a prompt method: it feeds the model extra inputs, which needs the "
            f"PeftModel wrapper; use get_peft_model(model, config) instead of inject_adapter_in_model"
        )
    if any(adapter_name in layer.deltas for _, layer in adapter_layers(model)):
        raise AdapterStateError(f"the model already has an adapter named {adapter_name!r}; choose another name")
    add_layer_adapter(model, peft_config, adapter_name, method)
    if peft_config.modules_to_save:
        add_modules_to_save(model, peft_config.modules_to_save, adapter_name)
    set_active(model, [adapter_name])
    mark_trainable(model, [adapter_name], getattr(peft_config, "bias", "none"))
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict, adapter_name)
    return model


def _root_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The module the saved keys are relative to, and the prefix the file puts before them."""
    from .model import PeftModel

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
            instead of from the live parameters; keys as ``model.state_dict()`` names them.
        unwrap_compiled: Read through a ``torch.compile`` wrapper (``_orig_mod``).
        save_embedding_layers: As in ``PeftModel.save_pretrained`` (``PeftModel`` only).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    from .model import PeftModel

    root, prefix = _root_and_prefix(model)
    if isinstance(model, PeftModel):
        saved = model.adapter_state_dict(adapter_name, save_embedding_layers)
    else:
        if not any(adapter_name in layer.deltas for _, layer in adapter_layers(root)):
            raise AdapterStateError(f"the model has no layer adapter named {adapter_name!r}")
        saved = layer_adapter_state_dict(root, adapter_name)
    if state_dict is None:
        return saved
    live = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    names = to_model_keys(live, adapter_holders(root), adapter_name)
    missing = [names[k] for k in live if prefix + names[k] not in state_dict]
    if missing:
        raise AdapterStateError(f"state_dict lacks {len(missing)} tensor(s) of adapter {adapter_name!r}, first "
                                f"{prefix + missing[0]!r}")
    return {**saved, **{prefix + k: state_dict[prefix + names[k]] for k in live}}


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
    from .model import PeftModel

    if isinstance(model, PeftModel):
        model._check_exists(adapter_name)
        model.load_adapter_state_dict(dict(peft_model_state_dict), adapter_name, "state dict")
    else:
        load_layer_adapter_state_dict(model, peft_model_state_dict, adapter_name, "state dict")
    return LoadResult()


# --- status ------------------------------------------------------------------------------------------------------

@dataclass
class TunerLayerStatus:
    """One adapter layer: the module it wraps and the state of each adapter in it (peft's field names)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@dataclass
class ModelStatus:
    """The whole model: each field summarises the layers, ``"irregular"`` where layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


def _all_or_irregular(values: list[Any]) -> Any:
    return "irregular" if len({repr(v) for v in values}) > 1 else values[0]


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper of ``model`` (a ``PeftModel`` or an
    injected plain module)."""
    root, prefix = _root_and_prefix(model)
    statuses = []
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            wrapped, owned = module.base_layer, module.deltas
            active, merged, enabled = module.active_adapters, module.merged_adapters, not module.disabled
        elif isinstance(module, ModulesToSaveWrapper):
            wrapped, owned = module.original_module, module.modules_to_save
            active = [module.active_adapter] if module.active_adapter else []
            merged, enabled = [], not module.disabled
        else:
            continue
        requires_grad = {
            adapter: _all_or_irregular([p.requires_grad for p in sub.parameters()] or [False])
            for adapter, sub in owned.items()
        }
        devices = {adapter: sorted({str(p.device) for p in sub.parameters()}) for adapter, sub in owned.items()}
        statuses.append(TunerLayerStatus(
            name=prefix + name, module_type=type(wrapped).__name__, enabled=enabled, active_adapters=list(active),
            merged_adapters=list(merged), requires_grad=requires_grad, available_adapters=sorted(owned),
            devices=devices,
        ))
    if not statuses:
        raise AdapterStateError("the model has no adapter layers; nothing to report")
    return statuses


def _consistent(layers: list[TunerLayerStatus], attribute: str) -> list[str] | Irregular:
    """The adapters in state ``attribute`` (active / merged) model-wide, or ``"irregular"`` when some layer holding
    one of them has it in the other state."""
    union = sorted({a for layer in layers for a in getattr(layer, attribute)})
    for layer in layers:
        if sorted(getattr(layer, attribute)) != [a for a in union if a in layer.available_adapters]:
            return "irregular"
    return union


def get_model_status(model: nn.Module) -> ModelStatus:
    """One summary of :func:`get_layer_status` for the whole model."""
    from .model import PeftModel

    layers = get_layer_status(model)
    root, _ = _root_and_prefix(model)
    if isinstance(model, PeftModel):
        peft_types = {name: config.peft_type.value for name, config in model.peft_config.items()}
        adapter_model_type = type(model).__name__
    else:
        peft_types, adapter_model_type = {}, "injected"
    requires_grad: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for layer in layers:
        for adapter, flag in layer.requires_grad.items():
            requires_grad[adapter].append(flag)
        for adapter, where in layer.devices.items():
            devices[adapter].update(where)
    params = list(model.parameters())
    return ModelStatus(
        base_model_type=type(root).__name__,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=_all_or_irregular([layer.enabled for layer in layers]),
        active_adapters=_consistent(layers, "active_adapters"),
        merged_adapters=_consistent(layers, "merged_adapters"),
        requires_grad={adapter: _all_or_irregular(flags) for adapter, flags in sorted(requires_grad.items())},
        available_adapters=sorted({a for layer in layers for a in layer.available_adapters}),
        devices={adapter: sorted(where) for adapter, where in sorted(devices.items())},
    )

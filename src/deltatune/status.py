"""Where each adapter is: per adapter layer and for the whole model, which adapters exist, are active, merged,
trainable, and on which devices -- the questions that come up when a model behaves unexpectedly. peft's
``TunerLayerStatus`` / ``ModelStatus`` fields; ``functional.get_layer_status`` / ``get_model_status`` (and the same
``PeftModel`` methods) are the public entry points, which pass a ``PeftModel``'s pieces in.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .errors import AdapterStateError
from .layers import AdapterLayer, ModulesToSaveWrapper

Irregular = Literal["irregular"]  # the adapter is in different states in different layers


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


def get_layer_status(root: nn.Module, prefix: str = "") -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper under ``root``, each named ``prefix`` +
    its path (a ``PeftModel`` passes its base model and ``base_model.model.``).

    Raises:
        AdapterStateError: ``root`` holds no adapter layer.
    """
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


def get_model_status(
    model: nn.Module,
    root: nn.Module | None = None,
    *,
    peft_types: Mapping[str, str] | None = None,
    adapter_model_type: str = "injected",
) -> ModelStatus:
    """One summary of :func:`get_layer_status` for the whole model.

    Args:
        model: What the parameter counts cover (a ``PeftModel`` also counts its prompt encoders).
        root: The module holding the adapter layers; ``model`` itself by default (a ``PeftModel`` passes its base
            model).
        peft_types: Adapter name -> method name (a ``PeftModel``'s configs; an injected model has none).
        adapter_model_type: The wrapper's class name; ``"injected"`` for an adapter injected into a plain module.
    """
    root = model if root is None else root
    layers = get_layer_status(root)
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
        peft_types=dict(peft_types or {}),
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

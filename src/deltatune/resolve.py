"""Resolve a layer config against a model: the one step between the config a user wrote and the adapter built from it.

Everything about an adapter that depends on the model is derived here, once, into a frozen :class:`Resolved`:

* the targets: ``target_modules=None`` and ``"all-linear"`` become the names they stand for, and every selected
  module's base layer is checked (``LayerMethod.layer_types``, then ``LayerMethod.check_target``) before anything is
  built, so a bad config leaves the model untouched;
* the layer layout: ``fan_in_fan_out=True`` when a target is a transformers ``Conv1D`` (weight stored ``(in, out)``),
  recorded as peft records it for readers of the file (peft, vLLM); deltatune itself reads the layout from the layer
  type;
* the method's model-dependent fields (``LayerMethod.resolve_config``: IA3's default ``feedforward_modules``);
* parameter targets (LoRA's ``target_parameters``): parameters adapted directly because no layer type wraps them,
  above all the fused 3-D expert stacks of MoE layers (transformers' Mixtral, Qwen3-MoE, GPT-OSS keep every expert
  of a layer in one ``nn.Parameter`` of shape ``(experts, ., .)``). A small, generic path beside the module targets:
  the module holding the parameter gets one adapter layer per targeted parameter (``Delta.parameter_name``).

The config in the result is a copy: the user's object is never modified, and the copy is what a ``PeftModel`` stores
and saves. Building (``inject.add_layer_adapter``) and the meta-device dry run that bounds a loaded adapter's size
both start from the result, so they cannot disagree about what an adapter is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import quant
from .config import LayerConfig
from .errors import TargetError
from .layers import AdapterLayer, unwrap
from .registry import LayerMethod
from .targeting import find_parameter_targets, find_targets, iter_candidates


@dataclass(frozen=True)
class Resolved:
    """A layer config resolved against a model.

    Attributes:
        config: A copy of the user's config with the model-dependent fields filled in; what is stored and saved.
        method: The config's method.
        targets: Full module name -> the base layer its delta wraps (a module already wrapped by an ``AdapterLayer``
            contributes that layer's ``base_layer``), in model order; read-only.
        tied: For a method with ``make_tied_delta`` (and a config it ``ties_weights`` for): the tied twins, full
            module name -> (the target whose weight it shares, its base layer); empty otherwise.
        extra: ``LayerMethod.extra_targets`` and the modules tied to them: full module name -> (its base layer, the
            extra target whose weight it shares or ``None``), sources first; read-only.
        parameters: Parameter targets (``target_parameters``): full parameter name ``<module>.<parameter>`` -> the
            module that owns it (unwrapped), in model order and, within a module, in registration order (the order
            their adapter layers nest in); read-only.
        model: The model resolved against, for ``LayerMethod.make_network``.
    """

    config: LayerConfig
    method: LayerMethod
    targets: Mapping[str, nn.Module]
    tied: Mapping[str, tuple[str, nn.Module]] = field(default_factory=lambda: MappingProxyType({}))
    parameters: Mapping[str, nn.Module] = field(default_factory=lambda: MappingProxyType({}))
    extra: Mapping[str, tuple[nn.Module, str | None]] = field(default_factory=lambda: MappingProxyType({}))
    model: nn.Module | None = None


def resolve(model: nn.Module, config: LayerConfig, method: LayerMethod) -> Resolved:
    """Resolve ``config`` (of ``method``) against ``model``; neither is modified.

    Raises:
        TargetError: nothing matches, no default targets exist for the model type, a matched module is of a type the
            method cannot wrap, or ``check_target`` refuses one.
        ConfigError: ``resolve_config`` finds the config inconsistent with the model (e.g. IA3's
            ``feedforward_modules`` outside the targets).
    """
    if method.find_targets is not None:
        target_modules, names = method.find_targets(model, config)
    else:
        target_modules, names = find_targets(model, config, method.default_targets)
    rewrites = method.rewrites_base_weights is not None and method.rewrites_base_weights(config)
    targets: dict[str, nn.Module] = {}
    for name in names:
        base = unwrap(model.get_submodule(name))
        quant.check_target(base, name, config.peft_type.value, rewriting_option(config) if rewrites else None)
        if _adapted_parameters(model.get_submodule(name)):
            raise TargetError(
                f"module {name!r} has parameters adapted through target_parameters by another adapter, so it cannot "
                f"also be a target_modules target; narrow target_modules to exclude it"
            )
        if not isinstance(base, method.layer_types):
            raise TargetError(
                f"module {name!r} is a {type(base).__name__}, which {config.peft_type.value} cannot adapt; "
                f"supported types: {[t.__name__ for t in method.layer_types]}. Narrow target_modules to exclude it."
            )
        targets[name] = base
    ties = method.make_tied_delta is not None and (method.ties_weights is None or method.ties_weights(config))
    tied = _tied_twins(model, targets) if ties else {}
    for name in tied:
        targets.pop(name, None)  # a target tied to an earlier one follows it rather than training apart
    view = MappingProxyType(targets)
    resolved = _copy_with(config, target_modules=target_modules, **_layout_fields(config, view.values()))
    if method.resolve_config is not None:
        resolved = method.resolve_config(resolved, model, view)
    if method.check_target is not None:
        for name, base in targets.items():
            method.check_target(resolved, quant.delta_view(base), name)
    parameters = _parameter_targets(model, resolved, method, targets)
    extra = _extra_targets(model, resolved, method, targets)
    return Resolved(
        resolved, method, view, MappingProxyType(tied), MappingProxyType(parameters), MappingProxyType(extra), model
    )


def _extra_targets(
    model: nn.Module, config: LayerConfig, method: LayerMethod, targets: Mapping[str, nn.Module]
) -> dict[str, tuple[nn.Module, str | None]]:
    """``LayerMethod.extra_targets`` and their tied twins, none of them a target (peft refuses the combination:
    one delta kind per module and adapter)."""
    if method.extra_targets is None:
        return {}
    sources = {name: unwrap(model.get_submodule(name)) for name in method.extra_targets(config, model)}
    extra: dict[str, tuple[nn.Module, str | None]] = {name: (base, None) for name, base in sources.items()}
    for name, (source, base) in _tied_twins(model, sources).items():
        extra[name] = (base, source)
    for name in extra:
        if name in targets:
            raise TargetError(
                f"{name}: selected by target_modules and (itself or through a weight tied to it) by "
                f"{method.config_class.__name__}'s extra targets; a module takes one kind of delta per adapter "
                f"(peft refuses this too). Leave it out of target_modules."
            )
    return dict(sorted(extra.items(), key=lambda item: item[1][1] is not None))  # sources before twins


def _parameter_targets(
    model: nn.Module, config: LayerConfig, method: LayerMethod, targets: Mapping[str, nn.Module]
) -> dict[str, nn.Module]:
    """The parameters ``config.target_parameters`` selects, checked: full name -> owning module.

    A parameter target is a floating-point 2-D weight or 3-D stack of per-expert weights, on a module that is not
    also a module target; where other adapters already adapt parameters of that module, the new adapter must target
    the same ones (peft's rule: the nesting order of the wrappers is what the saved keys encode).
    """
    names = getattr(config, "target_parameters", None)
    if not names:
        return {}
    if method.make_parameter_delta is None:
        raise TargetError(f"{config.peft_type.value} cannot adapt parameters directly (target_parameters)")
    selected: dict[str, list[str]] = {}
    for module_name, param_name in find_parameter_targets(model, names):
        selected.setdefault(module_name, []).append(param_name)
    out: dict[str, nn.Module] = {}
    for module_name, param_names in selected.items():
        wrapper, owner = model.get_submodule(module_name), unwrap(model.get_submodule(module_name))
        if any(n == module_name or n.startswith(module_name + ".") for n in targets):
            raise TargetError(
                f"{module_name}: target_parameters selects its parameters {param_names} while target_modules selects "
                f"it (or a module inside it); a module is adapted either as a layer or through its parameters (peft "
                f"refuses this too). Narrow one of them."
            )
        existing = _adapted_parameters(wrapper)
        if existing is None:
            raise TargetError(
                f"{module_name}: another adapter adapts this module as a layer (target_modules), so its parameters "
                f"{param_names} cannot also be targeted through target_parameters"
            )
        if existing and existing != param_names:
            raise TargetError(
                f"{module_name}: other adapters adapt its parameters {existing}, this config {param_names}; all "
                f"adapters that use target_parameters must target the same parameters (peft's rule: the nesting of "
                f"the adapted parameters decides the saved keys)"
            )
        for param_name in param_names:
            param = getattr(owner, param_name)
            if not param.is_floating_point() or param.dim() not in (2, 3):
                raise TargetError(
                    f"{module_name}.{param_name}: target_parameters adapts floating-point 2-D weights and 3-D stacks "
                    f"of expert weights, got a {param.dim()}-D {param.dtype} tensor of shape {list(param.shape)}"
                )
            out[f"{module_name}.{param_name}"] = owner
    return out


def _adapted_parameters(module: nn.Module) -> list[str] | None:
    """The parameters that adapter layers around ``module`` already adapt, innermost first; ``None`` when an adapter
    layer there adapts the module as a whole."""
    names: list[str] = []
    while isinstance(module, AdapterLayer):
        params = {getattr(d, "parameter_name", None) for d in module.deltas.values()}
        if None in params:
            return None
        names.extend(sorted(params))
        module = module.base_layer
    return names[::-1]


def rewriting_option(config: LayerConfig) -> str:
    """The config option that makes a method rewrite base weights, for messages (LoRA's PiSSA / OLoRA init): the
    config's own ``rewriting_option`` where it has one (LoRA's KaSA)."""
    named = getattr(config, "rewriting_option", None)
    if named:
        return named
    init = getattr(config, "init_lora_weights", None)
    return f"init_lora_weights={init!r}" if init is not None else f"this {config.peft_type.value} config"


def _tied_twins(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, tuple[str, nn.Module]]:
    """Modules (targets or not) whose ``weight`` is the very tensor of a target's weight, other than the first
    target holding it: name -> (that target, the module's base layer). Identity of the parameter, not a model-config
    flag, decides, so it holds for any architecture that ties (LM heads, T5's ``shared`` / ``embed_tokens``)."""
    owners: dict[int, str] = {}
    for name, base in targets.items():
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), name)
    tied: dict[str, tuple[str, nn.Module]] = {}
    for name, module in iter_candidates(model):
        base = unwrap(module)
        source = owners.get(id(getattr(base, "weight", None)))
        if source is not None and source != name:
            tied[name] = (source, base)
    return tied


def _layout_fields(config: LayerConfig, bases: Iterable[nn.Module]) -> dict[str, Any]:
    """The config fields the targets' layer layout decides: ``fan_in_fan_out`` for a config that has the field and
    a ``Conv1D`` target."""
    if hasattr(config, "fan_in_fan_out") and any(isinstance(base, Conv1D) for base in bases):
        return {"fan_in_fan_out": True}
    return {}


def _copy_with(config: LayerConfig, **changes: Any) -> LayerConfig:
    """A deep copy of ``config`` with ``changes``. Unlike ``dataclasses.replace`` this does not run ``__post_init__``
    again: the config was checked when it was made, and a second run would repeat its warnings (AdaLoRA's note on
    ignored fields). Deep, so that the stored config shares no list or dict with the user's."""
    new = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new

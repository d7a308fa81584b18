"""Walk a model, wrap the targets, freeze the rest; and the way back (unload, with or without merging).

These functions work on any ``nn.Module`` — transformers models, ``trust_remote_code`` models and plain PyTorch
modules alike — because they only replace child modules by name and never subclass an architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import AdapterStateError, ConfigError, TargetError
from .layers import AdapterLayer, ModulesToSaveWrapper, adapter_layers, save_wrappers
from .registry import LayerMethod
from .targeting import find_modules_to_save, find_targets


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_layer_adapter(
    model: nn.Module, config, adapter_name: str, method: LayerMethod, shared_state: nn.ModuleDict | None = None
) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets; return the adapted module names.

    All targets are checked before anything changes, so a bad config leaves the model untouched. For a method with
    ``make_shared`` (VeRA), the adapter's shared module is built once, handed to every ``make_delta`` and stored in
    ``shared_state[adapter_name]`` (the ``PeftModel``'s ``base_model.shared_state``).

    Raises:
        TargetError: nothing matches, or a matched module is of a type the method cannot wrap.
        ConfigError: the method needs ``shared_state`` and none was given (a model without the ``PeftModel``).
    """
    targets = find_targets(model, config, method.default_targets)
    if method.resolve_config is not None:
        method.resolve_config(config, model)
    bases = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if not isinstance(base, method.layer_types):
            raise TargetError(
                f"module {name!r} is a {type(base).__name__}, which {config.peft_type.value} cannot adapt; "
                f"supported types: {[t.__name__ for t in method.layer_types]}. Narrow target_modules to exclude it."
            )
        if method.check_target is not None:
            method.check_target(config, base, name)
        bases[name] = base
    shared = ()
    if method.make_shared is not None:
        if shared_state is None:
            raise ConfigError(
                f"{config.peft_type.value} keeps tensors shared by all adapted layers, which live in the PeftModel "
                f"wrapper; use get_peft_model(model, config) instead"
            )
        shared = (method.make_shared(config, bases, dict(shared_state)),)
    deltas = {name: method.make_delta(config, base, name, *shared) for name, base in bases.items()}
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            _set_child(model, name, module)
        module.add_delta(adapter_name, delta)
    if shared:
        shared_state[adapter_name] = shared[0]
    return targets


def add_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Give adapter ``adapter_name`` a trainable copy of each module selected by ``names``."""
    selected = find_modules_to_save(model, names)
    for name in selected:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            _set_child(model, name, module)
        module.add_copy(adapter_name)
    return selected


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete adapter ``adapter_name`` everywhere; wrappers left with no adapter are replaced by their module (inner
    ones first: an adapter layer can sit inside another's base layer, see ``Delta.attach``)."""
    for name, layer in reversed(list(adapter_layers(model))):
        if adapter_name in layer.deltas:
            layer.remove_delta(adapter_name)
            if not layer.deltas:
                _set_child(model, name, layer.base_layer)
    for name, wrapper in list(save_wrappers(model)):
        if adapter_name in wrapper.modules_to_save:
            wrapper.remove_copy(adapter_name)
            if not wrapper.modules_to_save:
                _set_child(model, name, wrapper.original_module)


def set_active(model: nn.Module, names: Sequence[str]) -> None:
    for _, layer in adapter_layers(model):
        layer.set_active(names)
    for _, wrapper in save_wrappers(model):
        wrapper.set_active(names)


def set_disabled(model: nn.Module, disabled: bool) -> None:
    for _, module in [*adapter_layers(model), *save_wrappers(model)]:
        module.disabled = disabled


def mark_trainable(model: nn.Module, trainable: Sequence[str], bias: str = "none") -> None:
    """Freeze everything, then unfreeze the deltas and module copies of the ``trainable`` adapters and the biases that
    ``bias`` selects (``"all"``: every bias; ``"lora_only"``: biases of adapted layers)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for name in trainable:
            if name in layer.deltas:
                delta = layer.deltas[name]
                delta.requires_grad_(True)
                for constant in delta.constants:
                    getattr(delta, constant).requires_grad_(False)
        # "<method>_only" (lora_only, oft_only, ...): the biases of adapted layers, as peft reads any "_only" value
        if bias.endswith("_only") and getattr(layer.base_layer, "bias", None) is not None and layer.active_adapters:
            layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in save_wrappers(model):
        for name in trainable:
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
    if bias == "all":
        # The model's own biases. Those inside wrappers follow their adapter (set above) or, in a modules_to_save
        # original, stay frozen: the original does not run while its trained copy is active.
        wrapped = {id(p) for _, w in save_wrappers(model) for p in w.parameters()}
        wrapped.update(id(p) for _, layer in adapter_layers(model) for p in layer.deltas.parameters())
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and id(param) not in wrapped:
                param.requires_grad_(True)


def merge(model: nn.Module, names: Sequence[str], safe_merge: bool = False) -> None:
    """Fold the deltas of ``names`` into the base weights of every adapter layer, all or nothing.

    ``safe_merge`` checks every layer for NaN/inf before any weight changes, so a refusal leaves the weights bit for
    bit as they were (unmerging is exact only up to rounding). Any other failure unmerges the layers this call merged
    before the error propagates.
    """
    named = list(adapter_layers(model))
    for path, layer in named:  # deltas that cannot merge at all refuse before any weight changes
        for name in names:
            if name in layer.deltas and name not in layer.merged_adapters:
                try:
                    layer.deltas[name].check_mergeable(layer.base_layer)
                except AdapterStateError as exc:
                    raise AdapterStateError(f"cannot merge adapter {name!r} into {path}: {exc}") from None
    layers = [layer for _, layer in named]
    if safe_merge:
        for layer in layers:
            layer.check_finite_merge(names)
    before: list[tuple[AdapterLayer, int]] = []
    try:
        for layer in layers:
            before.append((layer, len(layer.merged_adapters)))
            layer.merge(names)
    except Exception:
        for layer, count in before:
            layer.unmerge(keep=count)
        raise


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, keep_trained_copies: bool) -> nn.Module:
    """Replace every wrapper by the module it wraps and return ``model``.

    Adapter layers give back their base layer as it is now (merged or not). ``modules_to_save`` wrappers give back
    the active adapter's trained copy with ``keep_trained_copies`` (merge_and_unload), else the original module.
    """
    for name, layer in reversed(list(adapter_layers(model))):  # inner ones first, while their paths still resolve
        _set_child(model, name, layer.base_layer)
    for name, wrapper in list(save_wrappers(model)):
        keep = wrapper.modules_to_save[wrapper.active_adapter] if keep_trained_copies and wrapper.active_adapter else None
        _set_child(model, name, keep if keep is not None else wrapper.original_module)
    return model

"""Wrap the targets of a resolved adapter (``resolve.py``), freeze the rest; and the way back (unload, with or
without merging).

These functions work on any ``nn.Module`` — transformers models, ``trust_remote_code`` models and plain PyTorch
modules alike — because they only replace child modules by name and never subclass an architecture.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import quant
from .config import LayerConfig
from .errors import AdapterStateError, ConfigError
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper, adapter_layers, save_wrappers, unwrap
from .registry import LayerMethod
from .resolve import Resolved
from .targeting import BiasScope, find_modules_to_save, iter_candidates

_log = logging.getLogger("deltatune")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# The undos of the innermost open undo_scope (None outside any): a scope that succeeds hands its undos to the one
# around it, so a structural change made while building an adapter lasts only as long as the whole operation does.
_UNDOS: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar("deltatune_undos",
                                                                                          default=None)


@contextlib.contextmanager
def undo_scope() -> Iterator[None]:
    """Undo the structural changes :func:`prepared_model` made in the block (in reverse order) if the block fails,
    also those of a nested block that succeeded: a load opens one around building the adapter *and* filling it, so
    that a file refused after ``layer_replication`` ran leaves the layers as they were."""
    outer = _UNDOS.get()
    undos: list[Callable[[], None]] = []
    token = _UNDOS.set(undos)
    try:
        yield
    except BaseException:
        _UNDOS.reset(token)
        for undo in reversed(undos):
            undo()
        raise
    _UNDOS.reset(token)
    if outer is not None:
        outer.extend(undos)


@contextlib.contextmanager
def prepared_model(model: nn.Module, config: LayerConfig, method: LayerMethod) -> Iterator[None]:
    """Run the method's ``prepare_model`` (LoRA's ``layer_replication``) before an adapter is resolved and built in
    the block; undone if the block fails, or if an enclosing :func:`undo_scope` does, so that a refused adapter
    leaves the model as it was."""
    with undo_scope():
        undo = method.prepare_model(config, model) if method.prepare_model is not None else None
        if undo is not None:
            _UNDOS.get().append(undo)
        yield


def build_deltas(
    resolved: Resolved, shared_state: Mapping[str, nn.Module]
) -> tuple[dict[str, Delta], nn.Module | None]:
    """One delta per target of ``resolved``, and the module they share (``LayerMethod.make_shared``, VeRA's
    projections; ``None`` for most methods), built without touching the model.

    Args:
        resolved: The adapter's config and targets, from :func:`deltatune.resolve.resolve`. The dry run that bounds
            a loaded adapter's size passes meta-device copies of the targets here.
        shared_state: The shared modules of the model's other adapters, which ``make_shared`` may reuse.
    """
    method, config = resolved.method, resolved.config
    # a quantized target is seen through its dequantizing view (quant.delta_view), by every method alike
    targets = {name: quant.delta_view(base) for name, base in resolved.targets.items()}
    shared = None
    if method.make_shared is not None:
        shared = method.make_shared(config, targets, dict(shared_state))
    elif method.make_network is not None:
        shared = method.make_network(config, resolved.model, targets)
    extra = () if shared is None else (shared,)
    deltas = {name: method.make_delta(config, base, name, *extra) for name, base in targets.items()}
    for name, (source, base) in resolved.tied.items():  # after every target: a twin reads its source's delta
        deltas[name] = method.make_tied_delta(deltas[source], quant.delta_view(base), name)
    for name, (base, source) in resolved.extra.items():  # sources first: a twin shares its source's parameters
        deltas[name] = method.make_extra_delta(config, base, name, None if source is None else deltas[source])
    for name, owner in resolved.parameters.items():  # keyed "<module>.<parameter>", which no module name can be
        deltas[name] = method.make_parameter_delta(config, owner, name.rpartition(".")[2], name)
    return deltas, shared


def add_layer_adapter(
    model: nn.Module, resolved: Resolved, adapter_name: str, shared_state: nn.ModuleDict | None = None
) -> None:
    """Add adapter ``adapter_name`` to every target of ``resolved`` (already checked, so nothing here refuses a
    target). For a method with ``make_shared`` (VeRA), the adapter's shared module is stored in
    ``shared_state[adapter_name]`` (the ``PeftModel``'s ``base_model.shared_state``).

    Raises:
        ConfigError: the method needs ``shared_state`` and none was given (a model without the ``PeftModel``).
    """
    if (resolved.method.make_shared or resolved.method.make_network) is not None and shared_state is None:
        raise ConfigError(
            f"{resolved.config.peft_type.value} keeps tensors shared by all adapted layers, which live in the "
            f"PeftModel wrapper; use get_peft_model(model, config) instead"
        )
    quant.guard_model(model)  # before the first forward through an adapter: no training on repacked 4-bit weights
    deltas, shared = build_deltas(resolved, shared_state if shared_state is not None else {})
    for name, delta in deltas.items():
        if name in resolved.parameters:
            _add_parameter_delta(model, name.rpartition(".")[0], adapter_name, delta)
            continue
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            _set_child(model, name, module)
        module.add_delta(adapter_name, delta)
    if shared is not None:
        shared_state[adapter_name] = shared
    if resolved.parameters:  # a targeting mistake (attention only, a few layers) shows in these numbers
        params = [owner.get_parameter(n.rpartition(".")[2]) for n, owner in resolved.parameters.items()]
        _log.info(
            "adapter %r: target_parameters=%s adapted %d parameters (%d expert matrices): %s", adapter_name,
            resolved.config.target_parameters, len(params), sum(p.shape[0] if p.dim() == 3 else 1 for p in params),
            list(resolved.parameters),
        )


def _add_parameter_delta(model: nn.Module, module_name: str, adapter_name: str, delta: Delta) -> None:
    """Put a parameter-target delta into the adapter layer around ``module_name`` that adapts the same parameter, or
    into a new one wrapped around everything there so far (one layer per parameter: the first registered innermost,
    as ``resolve`` orders them)."""
    layer = model.get_submodule(module_name)
    while isinstance(layer, AdapterLayer):
        if any(d.parameter_name == delta.parameter_name for d in layer.deltas.values()):
            layer.add_delta(adapter_name, delta)
            return
        layer = layer.base_layer
    outer = AdapterLayer(model.get_submodule(module_name))
    _set_child(model, module_name, outer)
    outer.add_delta(adapter_name, delta)


def add_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str, tie: bool = False) -> list[str]:
    """Give adapter ``adapter_name`` a trainable copy of each module selected by ``names``. With ``tie`` (LoRA's
    ``ensure_weight_tying``) the modules whose weight is a selected module's (an LM head tied to the input embedding)
    get copies too, and all copies share what their originals share, so the tie holds while training and merged."""
    selected = find_modules_to_save(model, names)
    if tie:
        selected += [n for n in tied_modules(model, selected) if n not in selected]
    for name in selected:  # before any change: a quantized layer cannot train in full
        for path, module in model.get_submodule(name).named_modules(prefix=name):
            if quant.is_quantized(module):
                raise quant.QuantizationError(
                    f"modules_to_save {path!r} is a quantized {type(module).__name__}, which cannot be trained in "
                    f"full; adapt it with the method instead, or load that module unquantized"
                )
    memo: dict[int, object] | None = {} if tie else None
    for name in selected:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            _set_child(model, name, module)
        module.add_copy(adapter_name, memo)
    return selected


def tied_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The modules other than ``names`` whose ``weight`` is the very tensor of one of theirs (by identity)."""
    weights = {id(getattr(unwrap(model.get_submodule(n)), "weight", None)) for n in names} - {id(None)}
    return [n for n, m in iter_candidates(model)
            if n not in names and id(getattr(unwrap(m), "weight", None)) in weights]


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


def mark_trainable(model: nn.Module, trainable: Sequence[str], biases: BiasScope = "none") -> None:
    """Freeze everything, then unfreeze the deltas and module copies of the ``trainable`` adapters and the biases that
    ``biases`` selects (``targeting.trained_biases``: ``"all"``, every bias; ``"adapted"``, biases of adapted
    layers)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for name in trainable:
            if name in layer.deltas:
                delta = layer.deltas[name]
                delta.requires_grad_(True)
                for constant in delta.constants:
                    getattr(delta, constant).requires_grad_(False)
                for frozen in delta.frozen:
                    delta.get_parameter(frozen).requires_grad_(False)
        if biases == "adapted" and getattr(layer.base_layer, "bias", None) is not None and layer.active_adapters:
            layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in save_wrappers(model):
        for name in trainable:
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
    if biases == "all":
        # The model's own biases. Those inside wrappers follow their adapter (set above) or, in a modules_to_save
        # original, stay frozen: the original does not run while its trained copy is active.
        wrapped = {id(p) for _, w in save_wrappers(model) for p in w.parameters()}
        wrapped.update(id(p) for _, layer in adapter_layers(model) for p in layer.deltas.parameters())
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and id(param) not in wrapped:
                param.requires_grad_(True)


def merge(
    model: nn.Module, names: Sequence[str], safe_merge: bool = False, max_quantized_error: float | None = None,
    dequantize: bool = False,
) -> dict[str, float]:
    """Fold the deltas of ``names`` into the base weights of every adapter layer, all or nothing.

    ``safe_merge`` checks every layer for NaN/inf before any weight changes, so a refusal leaves the weights bit for
    bit as they were (unmerging is exact only up to rounding). Any other failure unmerges the layers this call merged
    before the error propagates.

    A quantized base layer is dequantized, merged and requantized (``AdapterLayer.merge``). Returns the measured
    error of that requantization per quantized layer (``quant.merge_error``: the share of the adapter's effect on
    the layer's outputs that was lost); with ``max_quantized_error``, a merge whose error would exceed it on any
    layer is refused, naming the layer and the figure, before any weight changes.
    """
    named = list(adapter_layers(model))
    pending = {path: [n for n in names if n in layer.deltas and n not in layer.merged_adapters] for path, layer in named}
    for path, layer in named:  # deltas that cannot merge at all refuse before any weight changes
        try:
            layer.check_merge_order(pending[path])
        except AdapterStateError as exc:
            raise AdapterStateError(f"{path}: {exc}") from None
        for name in pending[path]:
            try:
                layer.deltas[name].check_mergeable(layer.delta_base)
            except AdapterStateError as exc:  # same class (NotMergeableError stays a NotImplementedError too)
                raise type(exc)(f"cannot merge adapter {name!r} into {path}: {exc}") from None
    _check_shared_writes(model, named, pending)
    layers = [layer for _, layer in named]
    if safe_merge:
        for layer in layers:
            layer.check_finite_merge(names)
    if max_quantized_error is not None:
        for path, layer in named:
            if layer.quant_handler is not None and pending[path]:
                error = layer.quantized_merge(pending[path])[2]
                if error > max_quantized_error:
                    raise AdapterStateError(
                        f"merging {pending[path]} into {path} ({layer.quant_handler.describe(layer.base_layer)}) "
                        f"would lose {error:.1%} of the adapter's effect on the layer's outputs to requantization, "
                        f"above max_merge_error={max_quantized_error}; the model is unchanged. Merge into a "
                        f"dequantized base for an exact merge (merge_and_unload(quantized_base='dequantize'))"
                    )
    if dequantize:
        dequantize_bases(model)
    before: list[tuple[AdapterLayer, int]] = []
    try:
        for layer in layers:
            before.append((layer, len(layer.merged_adapters)))
            layer.merge(names)
    except Exception:
        for layer, count in before:
            layer.unmerge(keep=count)
        raise
    return {
        path: max(layer.merge_errors[n] for n in pending[path])
        for path, layer in named if layer.quant_handler is not None and pending[path]
    }


def _check_shared_writes(
    model: nn.Module, named: Sequence[tuple[str, AdapterLayer]], pending: Mapping[str, Sequence[str]]
) -> None:
    """Refuse a merge after which a parameter tensor that several modules hold would not compute, in each of them,
    what it did unmerged (``AdapterLayer.merge_writes`` names what a layer's merge writes, by identity):

    * two adapter layers would each have merged their own update into it (the copies ``layer_replication`` makes,
      adapted by an adapter without the ranges; an embedding and an LM head tied to it, each with a LoRA of its own):
      it would hold the sum, so each layer would compute the others' updates too (peft merges it so);
    * another module that holds it does not take that update (an LM head tied to an embedding that alone has a
      LoRA; a copy of a replicated layer the adapter left out): merged, it would compute the update as well.

    Tied twins that follow their source (``Delta.follows_source``) take its update: their one update merges once."""
    after = {path: layer.merged_adapters + list(pending[path]) for path, layer in named}
    writers: dict[int, tuple[str, str, list[str]]] = {}  # id(parameter) -> (layer path, its name there, adapters)
    for path, layer in named:
        now = [n for n in pending[path] if not layer.deltas[n].follows_source]
        if not now:  # merges made earlier that clash are not this call's doing
            continue
        for key, param in layer.merge_writes(after[path]).items():
            adapters = [n for n in after[path] if any(p is param for p in layer.merge_writes([n]).values())]
            other = writers.setdefault(id(param), (path, key, adapters))
            if other[0] != path:
                raise AdapterStateError(
                    f"cannot merge: {other[0]} (adapter(s) {other[2]}) and {path} (adapter(s) {adapters}) hold one "
                    f"shared tensor ({other[0]}'s {other[1]!r} is {path}'s {key!r}), and both would merge their own "
                    f"update into it, so each layer would compute the other's update too; the model is unchanged. "
                    f"{_KEEP_UNMERGED}"
                )
    if not writers:
        return
    for holder, takes in _holders(model, named, after):
        for key, param in holder.named_parameters(recurse=False):
            writer = writers.get(id(param))
            if writer is not None and sorted(takes.get(id(param), ())) != sorted(writer[2]):
                raise AdapterStateError(
                    f"cannot merge: {writer[0]} would merge adapter(s) {writer[2]} into its {writer[1]!r}, which is "
                    f"also {_module_name(model, holder)}'s {key!r} (a shared or tied weight), where adapter(s) "
                    f"{sorted(takes.get(id(param), ()))} apply; merged, that module would compute the update too, "
                    f"which it does not now; the model is unchanged. {_KEEP_UNMERGED}"
                )


_KEEP_UNMERGED = (
    "Keep the adapter(s) unmerged. For an embedding and an LM head tied to it, train the adapter with "
    "ensure_weight_tying=True and both in target_modules (one update for the tied pair, merged once)"
)


def _holders(
    model: nn.Module, named: Sequence[tuple[str, AdapterLayer]], after: Mapping[str, Sequence[str]]
) -> Iterator[tuple[nn.Module, dict[int, list[str]]]]:
    """The modules that compute with base parameters, each with the adapters whose update it takes into each of its
    parameters once ``after`` (layer path -> its merged adapters after this call) is merged, by ``id(parameter)``:
    those its adapter layers write into it, and the followed updates of tied twins. Adapter parameters (the deltas)
    and modules that do not run (a ``modules_to_save`` original while a trained copy runs in its place) are left
    out."""
    takes: dict[int, dict[int, list[str]]] = {}  # id(module) -> id(parameter) -> adapters
    skip: set[int] = set()
    for path, layer in named:
        owner = unwrap(layer.base_layer)
        own = takes.setdefault(id(owner), {})
        for name in after[path]:
            if layer.deltas[name].follows_source:
                written = dict(owner.named_parameters(recurse=False)).values()
            else:
                written = layer.merge_writes([name]).values()
            for param in written:
                own.setdefault(id(param), []).append(name)
        skip.update(id(m) for m in layer.deltas.modules())
    for _, wrapper in save_wrappers(model):
        skip.update(id(m) for m in wrapper.modules_to_save.modules())
        if wrapper.active_adapter is not None and not wrapper.disabled:
            skip.update(id(m) for m in wrapper.original_module.modules())
    for module in model.modules():
        if id(module) not in skip:
            yield module, takes.get(id(module), {})


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__)


def dequantize_bases(model: nn.Module) -> list[str]:
    """Replace the quantized base layer of every adapter layer by a dense ``nn.Linear`` holding its dequantized
    weight (``quant.dequantized_copy``), so that a following merge is exact; the paths changed. Adapter layers with
    merged adapters are refused (their weights already hold a requantized merge)."""
    named = [(path, layer) for path, layer in adapter_layers(model) if layer.quant_handler is not None]
    for path, layer in named:
        if layer.merged_adapters:
            raise AdapterStateError(
                f"{path} has adapters merged into its quantized weight; unmerge_adapter() before merging into a "
                f"dequantized base"
            )
    with torch.no_grad():
        for _, layer in named:
            layer.set_base(quant.dequantized_copy(layer.base_layer))
    return [path for path, _ in named]


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

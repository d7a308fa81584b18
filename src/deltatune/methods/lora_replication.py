"""LoRA's ``layer_replication`` (peft's meaning): the decoder layer list rebuilt deeper from ``[start, end)`` ranges
before the adapter is added, each entry a copy of its source layer holding the very same parameters, so the copies
cost no base memory and each gets an adapter of its own (the "expanded" models of Kim et al., 2023, SOLAR 10.7B,
§2.1, trained with LoRA).

The change is kept on the model (``_deltatune_layer_replication``, a :class:`Replication`) so that it can be put
back: by a refused adapter (``LayerMethod.prepare_model``'s undo), by ``unload()`` (the base model exactly: the
original layer list, the same module objects, and ``num_hidden_layers``) and by ``delete_adapter`` of the last
adapter that needs it (``LayerMethod.restore_model``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import AdapterStateError, ConfigError
from ..layers import AdapterLayer, ModulesToSaveWrapper, adapter_layers, save_wrappers

__all__: list[str] = []

_ATTRIBUTE = "_deltatune_layer_replication"


@dataclass
class Replication:
    """What ``layer_replication`` changed: ``holder.<attr>`` was ``layers`` and ``model_config.num_hidden_layers``
    was ``depth`` (``None``: the config has no such field)."""

    layer_map: list[list[int]]
    holder: nn.Module
    attr: str
    layers: nn.ModuleList  # the original list, out of the model while it is replicated
    model_config: Any
    depth: int | None

    def copies(self) -> nn.ModuleList:
        return getattr(self.holder, self.attr)

    def undo(self, model: nn.Module) -> None:
        """Put the original layers back, carrying over what the copies changed meanwhile and the originals cannot
        have seen (the parameters are shared, so they followed already): buffers moved with ``.to()`` and the
        train/eval mode. A layer the ranges left out was outside the model meanwhile: it follows the model's mode,
        but not a ``.to()`` made while the model was replicated. Done once: a failed load may both ``unload()`` and
        undo the scope it was built in."""
        if getattr(model, _ATTRIBUTE, None) is not self:
            return
        sources = [index for start, end in self.layer_map for index in range(start, end)]
        first: dict[int, nn.Module] = {}  # original index -> its first copy
        for index, copy_ in zip(sources, self.copies()):
            first.setdefault(index, copy_)
        self.layers.training = self.copies().training
        for index, original in enumerate(self.layers):
            if index in first:
                _follow(original, first[index])
            else:
                original.train(self.holder.training)
        setattr(self.holder, self.attr, self.layers)
        if self.depth is not None:
            self.model_config.num_hidden_layers = self.depth
        delattr(model, _ATTRIBUTE)


def _follow(original: nn.Module, twin: nn.Module) -> None:
    """Give ``original`` and its submodules the mode and buffers of their counterparts in its copy ``twin`` (seen
    through any adapter wrapper still around them)."""
    while isinstance(twin, (AdapterLayer, ModulesToSaveWrapper)):
        twin = twin.base_layer if isinstance(twin, AdapterLayer) else twin.original_module
    original.training = twin.training
    original._buffers.update({k: v for k, v in twin._buffers.items() if k in original._buffers})
    for name, child in original.named_children():
        if name in twin._modules:
            _follow(child, twin._modules[name])


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """Where the decoder layers are: peft's places (under any chain of ``.model``, then ``.bert``): ``layers``,
    ``encoder.layer`` or ``h``; returns the module holding the ``nn.ModuleList`` and its attribute."""
    while hasattr(model, "model"):
        model = model.model
    model = getattr(model, "bert", model)
    for path in ("layers", "encoder.layer", "h"):
        holder_path, _, attr = path.rpartition(".")
        holder = model.get_submodule(holder_path) if holder_path else model
        if isinstance(getattr(holder, attr, None), nn.ModuleList):
            return holder, attr
    raise ConfigError(
        f"layer_replication: found no decoder layer list in {type(model).__name__} (looked for 'layers', "
        f"'encoder.layer' and 'h', as peft does)"
    )


def replicate_layers(config: Any, model: nn.Module) -> Callable[[], None] | None:
    """``LayerMethod.prepare_model``: replicate the layers as ``config.layer_replication`` says, with ``layer_idx``
    renumbered (the KV cache indexes by it) and ``num_hidden_layers`` updated. Returns the undo.

    A second adapter with the same ranges finds the model already replicated and changes nothing.

    Raises:
        ConfigError: no layer list, a range beyond it, other adapters present, or different ranges than the
            adapter that replicated the model.
    """
    layer_map = config.layer_replication
    if not layer_map:
        return None
    done = getattr(model, _ATTRIBUTE, None)
    if done is not None:
        if done.layer_map != layer_map:
            raise ConfigError(f"layer_replication={layer_map} differs from {done.layer_map}, with which the model's "
                              f"layers were already replicated; use the same ranges for every adapter")
        return None
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("layer_replication must come with the model's first adapter (it copies the layers, and "
                          "the other adapters' layers would be copied with them)")
    holder, attr = _decoder_layers(model)
    layers = getattr(holder, attr)
    beyond = [pair for pair in layer_map if pair[1] > len(layers)]
    if beyond:
        raise ConfigError(f"layer_replication ranges {beyond} go beyond the model's {len(layers)} layers")
    copies = []
    for start, end in layer_map:
        for index in range(start, end):
            copy_ = _shared_copy(layers[index])
            for module in copy_.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(copies)
            copies.append(copy_)
    model_config = getattr(holder, "config", None) or getattr(model, "config", None)
    depth = getattr(model_config, "num_hidden_layers", None)
    setattr(holder, attr, nn.ModuleList(copies))
    if depth is not None:
        model_config.num_hidden_layers = len(copies)
    record = Replication([list(p) for p in layer_map], holder, attr, layers, model_config, depth)
    setattr(model, _ATTRIBUTE, record)
    return lambda: record.undo(model)


def restore_layers(model: nn.Module, remaining: Mapping[str, Any]) -> Callable[[], None] | None:
    """``LayerMethod.restore_model``: the undo of the replication once no adapter of ``remaining`` (name -> config)
    needs it; ``None`` while one's config has ``layer_replication`` (it shares the replicated layers), or when the
    model is not replicated.

    Raises:
        AdapterStateError: an adapter of ``remaining`` adapts the copies without a ``layer_replication`` of its own
            (its layers would go with the copies); nothing is changed.
    """
    record = getattr(model, _ATTRIBUTE, None)
    if record is None or any(getattr(c, "layer_replication", None) for c in remaining.values()):
        return None
    inside = {n for _, layer in adapter_layers(record.copies()) for n in layer.deltas}
    inside |= {n for _, wrapper in save_wrappers(record.copies()) for n in wrapper.modules_to_save}
    users = sorted(inside & set(remaining))
    if users:
        raise AdapterStateError(
            f"adapter(s) {users} adapt the layers that layer_replication={record.layer_map} copied, without a "
            f"layer_replication of their own, so the original layers cannot be put back while they exist: delete "
            f"{users} first, or unload() the model"
        )
    return lambda: record.undo(model)


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose every parameter is the original's tensor (weights shared, modules not)."""
    memo = {id(p): p for p in layer.parameters()}
    return copy.deepcopy(layer, memo)

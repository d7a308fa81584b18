"""The adapter-layer core shared by every layer method.

An :class:`AdapterLayer` replaces a target module in the model. It keeps the frozen module as ``base_layer`` and one
:class:`Delta` per adapter name in ``deltas``; the state it owns (which adapters are active, which are merged into the
base weight, whether adapters are disabled, which adapter each batch row uses) is the same for every method and lives
only here. A method contributes a ``Delta`` subclass: its parameters, its forward, and how it turns into a weight.

:class:`ModulesToSaveWrapper` does the same for ``modules_to_save``: a frozen original plus one trainable copy per
adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .errors import AdapterStateError

BASE_ADAPTER = "__base__"  # in ``adapter_names``: this row uses no adapter
T = TypeVar("T")

class RowPlan:
    """The adapter name of every row of the batches run inside one :func:`batch_adapters` block.

    The grouping of rows by adapter is the same for every adapted layer of a forward (and for every step of a
    ``generate()``), so it is built once per batch size and device and then shared, instead of being rebuilt as index
    tensors in each of the model's layers.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}
        self._memo: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}

    def memo(self, owners: tuple[Any, ...], make: Callable[[], T], extra: tuple[Any, ...] = ()) -> T:
        """``make()``, computed once per plan for the same ``owners`` (compared by identity: the row-index tensors
        :meth:`groups` hands out, adapter weights) and the same hashable ``extra``: what every adapted layer, or every
        step of a ``generate()``, would otherwise derive again, such as the group of each row."""
        key = (*(id(o) for o in owners), *extra)
        hit = self._memo.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], owners, strict=True)):  # ids are reused after GC
            hit = self._memo[key] = (owners, make())
        return hit[1]

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``(adapter name, row indices)`` for each name, in order of first appearance; indices on ``device``.

        A batch that is a whole multiple of ``len(names)`` (beam search, ``num_return_sequences``) repeats each name
        for its consecutive rows, as ``generate()`` expands inputs with ``repeat_interleave``.
        """
        key = (batch_size, device)
        if key not in self._groups:
            self._groups[key] = [(name, rows.to(device)) for name, rows in self._build(batch_size)]
        return self._groups[key]

    def _build(self, batch_size: int) -> list[tuple[str, torch.Tensor]]:
        if batch_size % len(self.names):
            raise AdapterStateError(
                f"adapter_names has {len(self.names)} entries but the batch has {batch_size} rows; give one name per row"
            )
        repeat = batch_size // len(self.names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
        return [(name, torch.tensor(r)) for name, r in rows.items()]


_batch_adapters: contextvars.ContextVar[RowPlan | None] = contextvars.ContextVar("batch_adapters", default=None)


def current_row_plan() -> RowPlan | None:
    """The plan of the enclosing :func:`batch_adapters` block, if any."""
    return _batch_adapters.get()


@contextlib.contextmanager
def batch_adapters(names: Sequence[str] | None) -> Iterator[None]:
    """Within the block, row ``i`` of every batch uses adapter ``names[i]`` (``"__base__"``: none); see
    :meth:`RowPlan.groups` for batches that are a multiple of ``len(names)``."""
    token = _batch_adapters.set(RowPlan(names) if names is not None else None)
    try:
        yield
    finally:
        _batch_adapters.reset(token)


class Delta(nn.Module):
    """One adapter's trainable change to one layer. Subclasses implement ``forward`` and ``delta_weight``.

    ``forward(x, base_out, base_layer)`` returns the layer's new output given its input and the base layer's output.
    A delta that acts on the layer's *input* (IA3 on feed-forward layers, OFT's rotation) sets ``transforms_input``:
    its :meth:`transform_input` then runs before the base layer, and ``base_out`` is the base layer's output for the
    transformed input.

    Merging defaults to ``W + delta_weight`` with the bias unchanged; methods whose effect is not additive (DoRA,
    IA3) override ``merge_weight`` / ``unmerge_weight``, and methods that change the bias ``merge_bias`` /
    ``unmerge_bias``.
    """

    transforms_input: bool = False
    # The base-layer parameter that merging folds this delta into (MultiheadAttention's is ``in_proj_weight``).
    weight_name: ClassVar[str] = "weight"
    # Set by a delta whose effect cannot be added to the base output because the base layer reads its weights itself
    # (MultiheadAttention uses ``in_proj_weight`` and ``out_proj.weight`` directly): the layer then runs the base
    # layer on the weights :meth:`patch_weights` gives (``torch.func.functional_call``) and never calls ``forward``.
    patches_weights: ClassVar[bool] = False
    # Parameters that never train and are not saved: constants peft registers as frozen parameters (AdaLoRA's
    # ``ranknum``), kept as parameters so that parameter counts agree with peft's.
    constants: ClassVar[tuple[str, ...]] = ()

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the base layer sees, for a delta with ``transforms_input``."""
        return x

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def patch_weights(self, weights: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """For a delta with ``patches_weights``: ``weights`` (parameter name inside ``base_layer`` -> the tensor the
        forward uses instead; a name absent means the parameter itself) with this delta merged in, differentiably."""
        raise NotImplementedError

    def attach(self, layer: AdapterLayer, name: str) -> None:
        """Called when this delta joins ``layer`` as adapter ``name``. A delta that also adapts a submodule of the
        base layer installs that part here, in an adapter layer of its own (LoRA on MultiheadAttention puts the
        ``out_proj`` update where peft's saved keys have it: ``<path>.base_layer.out_proj.lora_A.weight``)."""

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """``out`` (the base output of the whole batch) with the rows of each ``(delta, rows)`` group changed by that
        group's delta: the mixed-adapter batch. Every delta in ``groups`` is an instance of ``cls``.

        This default works for any delta: it runs each group's own ``forward`` on that group's rows and writes all
        groups back with a single copy of ``out``. Methods override it with something faster where their update can
        be added into the rows in place.
        """
        if not groups:
            return out
        parts = [delta(x.index_select(0, rows), out.index_select(0, rows), base_layer) for delta, rows in groups]
        return out.index_copy(0, torch.cat([rows for _, rows in groups]), torch.cat(parts))

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The additive change to ``base_layer.weight``, in that weight's own layout and dtype."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight + self.delta_weight(base_layer).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight - self.delta_weight(base_layer).to(weight.dtype)

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base layer's bias after merging (called only for a base layer that has one)."""
        return bias

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return bias

    def check_mergeable(self, base_layer: nn.Module) -> None:
        """Raise :class:`AdapterStateError`, saying why, when this delta cannot be folded into ``base_layer`` at all
        (a nonlinear adapter; a bias update for a layer without a bias). Merging asks every layer before it changes
        any, so a refusal leaves the model as it was."""

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for this delta (keys relative to it): its ``state_dict()`` without the
        ``constants``, unless the file format differs further (AdaLoRA saves only the singular triplets it kept)."""
        return {k: v for k, v in self.state_dict().items() if k not in self.constants}

    def train_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint holds for this delta besides the adapter file, so that a resumed run continues
        exactly (keys relative to the delta): nothing by default. A key that names a parameter holds it in full and
        replaces the file's tensor on resume (AdaLoRA's file keeps only the kept triplets, its optimizer state all of
        them); other keys are state kept outside the parameters (AdaLoRA's importance scores and allocation)."""
        return {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`train_state` returned; called after the parameters were loaded."""


class _Wrapper(nn.Module):
    """Attribute fallback shared by both wrappers: code that reads ``layer.weight`` or ``layer.in_features`` on a
    wrapped module (weight tying, dtype probes in modeling code) sees the wrapped module's attribute."""

    def _wrapped(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "original_module"):
                raise
            return getattr(self._wrapped(), name)


class AdapterLayer(_Wrapper):
    """A frozen ``base_layer`` plus named deltas, with the active / merged / disabled state every method shares."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def _wrapped(self) -> nn.Module:
        return self.base_layer

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_delta(self, name: str, delta: Delta) -> None:
        self.deltas[name] = delta
        delta.attach(self, name)

    def remove_delta(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.deltas[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.deltas]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            # adapter layers inside the base layer whose forward it never calls (MultiheadAttention's out_proj, see
            # Delta.attach) cannot undo their merge themselves
            for layer in (self, *(m for m in self.base_layer.modules() if isinstance(m, AdapterLayer))):
                if layer.merged_adapters:
                    layer.unmerge()
            return self.base_layer(x, *args, **kwargs)
        plan = _batch_adapters.get()
        if plan is not None:
            return self._mixed_forward(plan, x, *args, **kwargs)
        deltas = [self.deltas[n] for n in self.active_adapters if n not in self.merged_adapters]
        base_in = x
        for delta in deltas:
            if delta.transforms_input:
                base_in = delta.transform_input(base_in)
        weights: dict[str, torch.Tensor] = {}
        for delta in deltas:
            if delta.patches_weights:
                weights = delta.patch_weights(weights, self.base_layer)
        if weights:
            out = torch.func.functional_call(self.base_layer, weights, (base_in, *args), kwargs)
        else:
            out = self.base_layer(base_in, *args, **kwargs)
        for delta in deltas:
            if not delta.patches_weights:
                out = delta(x, out, self.base_layer)
        return out

    def _mixed_forward(self, plan: RowPlan, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each group of rows goes through its own adapter; rows marked ``__base__`` (or naming an adapter this layer
        does not hold) get the base output. Groups are handed to their delta class's ``batched_forward`` together, so
        a method can treat all of its adapters in one pass."""
        if self.merged_adapters:
            raise AdapterStateError("adapter_names cannot be used while adapters are merged; call unmerge_adapter()")
        out = self.base_layer(x, *args, **kwargs)
        by_class: dict[type[Delta], list[tuple[Delta, torch.Tensor]]] = {}
        input_side: list[tuple[Delta, torch.Tensor]] = []
        for name, rows in plan.groups(x.shape[0], x.device):
            if name != BASE_ADAPTER and name in self.deltas:
                delta = self.deltas[name]
                if delta.transforms_input:
                    input_side.append((delta, rows))
                else:
                    by_class.setdefault(type(delta), []).append((delta, rows))
        for cls, groups in by_class.items():
            out = cls.batched_forward(groups, x, out, self.base_layer)
        if input_side:  # these rows need the base layer run again on their own transformed input
            parts = []
            for delta, rows in input_side:
                x_rows = x.index_select(0, rows)
                parts.append(delta(x_rows, self.base_layer(delta.transform_input(x_rows), *args, **kwargs),
                                   self.base_layer))
            out = out.index_copy(0, torch.cat([rows for _, rows in input_side]), torch.cat(parts))
        return out

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @torch.no_grad()
    def check_merge(self, names: Sequence[str]) -> None:
        """Raise :class:`AdapterStateError` if merging ``names`` would put NaN/inf into the base weight or bias; the
        merged tensors are computed aside and the layer is not changed."""
        merged: dict[str, torch.Tensor] = {}  # weight name -> its value after the merges so far
        bias = self._bias()
        for name in names:
            if name in self.merged_adapters or name not in self.deltas:
                continue
            delta = self.deltas[name]
            weight = merged.get(delta.weight_name, getattr(self.base_layer, delta.weight_name).data)
            weight = merged[delta.weight_name] = delta.merge_weight(weight.clone(), self.base_layer)
            bias = None if bias is None else delta.merge_bias(bias.data.clone(), self.base_layer)
            if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
                raise AdapterStateError(
                    f"merging adapter {name!r} would put NaN/inf into the base weights; the model is unchanged"
                )

    @torch.no_grad()
    def merge(self, names: Sequence[str], safe_merge: bool = False) -> None:
        """Fold the named deltas into the base weight (and bias); ``safe_merge`` runs :meth:`check_merge` first."""
        if safe_merge:
            self.check_merge(names)
        bias = self._bias()
        for name in names:
            if name in self.merged_adapters or name not in self.deltas:
                continue
            delta = self.deltas[name]
            weight = getattr(self.base_layer, delta.weight_name)
            weight.data.copy_(delta.merge_weight(weight.data.clone(), self.base_layer))
            if bias is not None:
                bias.data.copy_(delta.merge_bias(bias.data.clone(), self.base_layer))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, keep: int = 0) -> None:
        """Undo merges, last merged first, until ``keep`` remain merged."""
        bias = self._bias()
        while len(self.merged_adapters) > keep:
            delta = self.deltas[self.merged_adapters.pop()]
            weight = getattr(self.base_layer, delta.weight_name)
            weight.data.copy_(delta.unmerge_weight(weight.data, self.base_layer))
            if bias is not None:
                bias.data.copy_(delta.unmerge_bias(bias.data, self.base_layer))


class ModulesToSaveWrapper(_Wrapper):
    """A frozen ``original_module`` plus one trainable copy per adapter in ``modules_to_save`` (peft's names, so that
    state-dict keys match peft's)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def _wrapped(self) -> nn.Module:
        return self.original_module

    def add_copy(self, name: str) -> None:
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def _module_for(self, name: str | None) -> nn.Module:
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        plan = _batch_adapters.get()
        if plan is None or self.disabled:
            return self._module_for(self.active_adapter)(x, *args, **kwargs)
        out = None
        for name, rows in plan.groups(x.shape[0], x.device):
            part = self._module_for(None if name == BASE_ADAPTER else name)(x[rows], *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise AdapterStateError(
                    f"adapter_names is not supported for modules_to_save module {type(self.original_module).__name__} "
                    f"whose output is a {type(part).__name__}"
                )
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module

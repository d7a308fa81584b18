"""Mixed-adapter batches: which adapter each batch row uses (``adapter_names=``), grouped once per batch.

``batch_adapters(names)`` opens a block in which row ``i`` of every batch uses adapter ``names[i]``; every adapted
layer reads the block's :class:`RowPlan` (:func:`current_row_plan`) for its groups of rows. This module knows
nothing of layers or methods: it sits below ``layers.py`` and the kernels, which both read it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from .errors import AdapterStateError

T = TypeVar("T")


class RowPlan:
    """The adapter name of every row of the batches run inside one :func:`batch_adapters` block.

    The grouping of rows by adapter is the same for every adapted layer of a forward (and for every step of a
    ``generate()``), so it is built once per batch size and device and then shared, instead of being rebuilt as index
    tensors in each of the model's layers. A caller that runs many forwards over the same rows (the serving engine's
    decode steps) passes one plan as ``adapter_names`` to all of them, so what it memoises is built once.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}
        self._memo: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

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
def batch_adapters(names: Sequence[str] | RowPlan | None) -> Iterator[None]:
    """Within the block, row ``i`` of every batch uses adapter ``names[i]`` (``"__base__"``: none); see
    :meth:`RowPlan.groups` for batches that are a multiple of ``len(names)``. A :class:`RowPlan` is used as it is."""
    plan = names if isinstance(names, RowPlan) or names is None else RowPlan(names)
    token = _batch_adapters.set(plan)
    try:
        yield
    finally:
        _batch_adapters.reset(token)


def row_slots(groups: Sequence[tuple[Any, torch.Tensor]], batch: int, device: torch.device) -> torch.Tensor:
    """``(B,)``: the index of each row's ``(owner, rows)`` group, or ``len(groups)`` for a row in none of them. Every
    adapted layer of a mixed batch asks this for the same groups, so inside :func:`batch_adapters` it is computed once
    per plan."""
    rows = tuple(r for _, r in groups)

    def make() -> torch.Tensor:
        counts = torch.tensor([len(r) for r in rows], device=device)
        slots = torch.full((batch,), len(rows), dtype=torch.long, device=device)
        slots[torch.cat(rows)] = torch.arange(len(rows), device=device).repeat_interleave(counts)
        return slots

    plan = current_row_plan()
    return make() if plan is None else plan.memo(rows, make)

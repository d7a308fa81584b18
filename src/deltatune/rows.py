"""Per-row data of a batch: which adapter each row uses (``adapter_names=``), grouped once per batch, and which task
each row belongs to (``task_ids=``, for methods that route by task: Poly).

``batch_adapters(names)`` opens a block in which row ``i`` of every batch uses adapter ``names[i]``; every adapted
layer reads the block's :class:`RowPlan` (:func:`current_row_plan`) for its groups of rows. ``batch_tasks(ids)`` does
the same for task indices (:func:`row_tasks`). This module knows nothing of layers or methods: it sits below
``layers.py`` and the kernels, which both read it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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
        repeat = _repeat("adapter_names", len(self.names), batch_size)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
        return [(name, torch.tensor(r)) for name, r in rows.items()]


def _repeat(what: str, entries: int, batch_size: int) -> int:
    """How many consecutive rows each of ``entries`` per-row values covers in a batch of ``batch_size`` rows: a
    whole multiple repeats each value, as ``generate()`` expands its inputs (beams, ``num_return_sequences``)."""
    if not entries or batch_size % entries:
        raise AdapterStateError(f"{what} has {entries} entries but the batch has {batch_size} rows; give one per row")
    return batch_size // entries


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


class _RowTasks:
    """The task index of every row inside one :func:`batch_tasks` block, expanded and moved per batch size and device
    once (every adapted layer of a forward, and every step of a ``generate()``, asks for the same)."""

    def __init__(self, task_ids: torch.Tensor) -> None:
        self.task_ids = task_ids
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, batch_size: int, device: torch.device) -> torch.Tensor:
        key = (batch_size, device)
        if key not in self._rows:
            repeat = _repeat("task_ids", len(self.task_ids), batch_size)
            self._rows[key] = self.task_ids.repeat_interleave(repeat).to(device)
        return self._rows[key]


_batch_tasks: contextvars.ContextVar[_RowTasks | None] = contextvars.ContextVar("batch_tasks", default=None)


@contextlib.contextmanager
def batch_tasks(task_ids: torch.Tensor | None) -> Iterator[None]:
    """Within the block, row ``i`` of every batch belongs to task ``task_ids[i]`` (a ``(n,)`` long tensor, checked by
    the caller); a batch that is a whole multiple of ``n`` rows repeats each index for its consecutive rows, as for
    :func:`batch_adapters`. ``None``: no task ids (the default)."""
    token = _batch_tasks.set(_RowTasks(task_ids) if task_ids is not None else None)
    try:
        yield
    finally:
        _batch_tasks.reset(token)


def row_tasks(batch_size: int, device: torch.device) -> torch.Tensor | None:
    """``(batch_size,)``: the task index of each row in the enclosing :func:`batch_tasks` block, on ``device``;
    ``None`` outside one."""
    tasks = _batch_tasks.get()
    return None if tasks is None else tasks.rows(batch_size, device)


def keep_row_context(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``checkpoint`` (a ``torch.utils.checkpoint``-like ``checkpoint(function, *args, **kwargs)``, as transformers
    keeps in each layer's ``_gradient_checkpointing_func``) made to run ``function`` in the context of the forward
    that called it, also when it is recomputed during backward, outside that forward's :func:`batch_adapters` and
    :func:`batch_tasks` blocks: the recomputed rows keep their adapters and tasks."""
    if getattr(checkpoint, "keeps_row_context", False):
        return checkpoint

    @functools.wraps(checkpoint)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return checkpoint(functools.partial(contextvars.copy_context().run, function), *args, **kwargs)

    run.keeps_row_context = True  # type: ignore[attr-defined]
    return run

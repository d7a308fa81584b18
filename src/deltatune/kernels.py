"""The tensor kernels of adapter forwards: adding an update into the base output without extra copies, LoRA's fused
low-rank product, and the batched low-rank kernels of mixed-adapter batches.

Mixed batches: every row of a batch adds its own adapter's ``scaling · B A x``, all adapters together in two batched
matmuls instead of a loop of small ops per adapter. Two layouts, picked by row length (:func:`add_low_rank_rows`):

* long rows (prefill): each row gathers its adapter's A and B and ``bmm`` runs over the rows — the gathered matmul of
  Punica (Chen et al., 2023) and S-LoRA (Sheng et al., 2023); it moves ``r·(in + out)`` weights per row;
* short rows (decoding): the rows of each adapter are gathered into one slice of an ``(adapters, rows, in)`` batch and
  ``bmm`` runs over the adapters; only the rows' activations move.

The stacked weights, and everything derived from the grouping of rows alone, are kept in the batch's
:class:`~deltatune.rows.RowPlan` in inference, so one ``generate()`` builds them once, not at every step and layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rows import current_row_plan, row_slots


def accumulate(out: torch.Tensor, update: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``out + alpha · update``, without the separate scaled copy of ``update`` that ``out + update * alpha`` makes.

    In place when autograd is off: ``out`` is the fresh output of the base layer (or of the previous delta) and
    nothing else holds it (except a forward hook on the base layer that keeps its output, which then sees the sum).
    With autograd on it stays out of place: ``out`` may be a view (a biased ``nn.Linear``'s is), and an in-place op
    on a view makes autograd clone the whole gradient in backward. An update kept in float32 next to a half-precision
    base is scaled before it is rounded to the base's dtype. A 0-dim tensor ``alpha`` (a LoRA scale prepared for
    compiled hot-swapping, ``hotswap.py``) multiplies: ``alpha=`` would read it back as a number, which breaks a
    compiled graph.
    """
    if isinstance(alpha, torch.Tensor):
        update, alpha = update * alpha, 1.0
    if update.dtype != out.dtype:
        return out + (update * alpha).to(out.dtype)
    if torch.is_grad_enabled():
        return torch.add(out, update, alpha=alpha)
    return out.add_(update, alpha=alpha)


def add_low_rank(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``out + alpha · xa bᵀ`` as one ``addmm``: the low-rank product accumulates straight into the output, with no
    intermediate ``(…, out)`` update tensor and no separate scaling pass (forward or backward). ``out`` is
    ``(..., out)``, ``xa`` ``(..., r)``, ``b`` ``(out, r)``; in place under the same rule as :func:`accumulate`.
    Mixed dtypes (a float32 adapter beside a half-precision base, or ``b`` under autocast, which in-place ops ignore)
    take the unfused path."""
    if not xa.dtype == b.dtype == out.dtype or not out.is_contiguous() or isinstance(alpha, torch.Tensor):
        return accumulate(out, F.linear(xa, b), alpha)
    out2d, xa2d = out.view(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1])  # (N, out), (N, r)
    if torch.is_grad_enabled():
        return torch.addmm(out2d, xa2d, b.T, alpha=alpha).view(out.shape)
    out2d.addmm_(xa2d, b.T, alpha=alpha)
    return out


def index_accumulate(out: torch.Tensor, rows: torch.Tensor, update: torch.Tensor,
                     alpha: float | torch.Tensor) -> torch.Tensor:
    """:func:`accumulate` into the batch rows ``rows`` of ``out`` only (``update`` has ``len(rows)`` rows). With
    autograd on (training on a mixed batch, which is rare) each call copies ``out``."""
    if update.dtype != out.dtype or isinstance(alpha, torch.Tensor):
        update, alpha = (update * alpha).to(out.dtype), 1.0
    if torch.is_grad_enabled():
        return out.index_add(0, rows, update, alpha=alpha)
    return out.index_add_(0, rows, update, alpha=alpha)


def add_sparse(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               values: torch.Tensor) -> torch.Tensor:
    """``out + x ΔWᵀ`` for a sparse ``ΔW`` holding ``values[k]`` at ``(rows[k], cols[k])``: one gather of the
    inputs and one ``index_add`` (``K`` products per row, no dense ``(out, in)`` update). ``out`` is ``(..., out)``,
    ``x`` ``(..., in)``, the other three ``(K,)``; computed in ``values``' dtype (SHiRA, Super-Tuning)."""
    products = x.to(values.dtype).index_select(-1, cols) * values  # (..., K)
    return out.index_add(-1, rows, products.to(out.dtype))  # (..., out)


@dataclass(frozen=True)
class LowRank:
    """One adapter's update ``scaling · B A``: ``a`` ``(r, in, ...)`` with the rank on dim 0, ``b`` ``(out, r, ...)``
    with the rank on dim 1 (the batched kernels take linear ones: ``(r, in)``, ``(out, r)``)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def add_low_rank_rows(groups: Sequence[tuple[LowRank, torch.Tensor]], x: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """``out`` (``(B, ..., out)``, contiguous) plus, for each ``(update, rows)`` group, ``update`` applied to those
    rows of ``x`` (``(B, ..., in)``); in place when autograd is off. All groups' factors share one dtype."""
    tokens_per_row = math.prod(out.shape[1:-1])
    long_rows = tokens_per_row >= max(f.rank for f, _ in groups)
    return (_gathered_low_rank if long_rows else _grouped_low_rank)(groups, x, out)


def _stack_by_rank(weights: list[torch.Tensor], rank_dim: int, rank: int, zero_entry: bool) -> torch.Tensor:
    """Per-adapter weights stacked on a new first dim, each zero-padded at the end of ``rank_dim`` (0 for A's
    ``(r, in)``, 1 for B's ``(out, r)``) up to ``rank``; with ``zero_entry`` an all-zero weight is appended last."""
    padded = [w if w.shape[rank_dim] == rank else F.pad(w, (0, 0, 0, rank - w.shape[0]) if rank_dim == 0
                                                        else (0, rank - w.shape[1]))
              for w in weights]
    if zero_entry:
        padded.append(torch.zeros_like(padded[0]))
    return torch.stack(padded)


def _stacked(groups: Sequence[tuple[LowRank, torch.Tensor]], rank: int,
             zero_entry: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' ``scaling · A`` as ``(G, r, in)`` and ``B`` as ``(G, out, r)``, zero-padded to ``rank`` (see
    :func:`_stack_by_rank`). In inference they are built once per :class:`~deltatune.rows.RowPlan`, i.e. once per
    ``generate()`` rather than at every step, and rebuilt if a weight changes in place."""

    def stacks() -> tuple[torch.Tensor, torch.Tensor]:
        a = _stack_by_rank([f.a * f.scaling for f, _ in groups], 0, rank, zero_entry)
        return a, _stack_by_rank([f.b for f, _ in groups], 1, rank, zero_entry)

    plan = current_row_plan()
    if plan is None or torch.is_grad_enabled():
        return stacks()
    weights = tuple(w for f, _ in groups for w in (f.a, f.b))
    rows = tuple(r for _, r in groups)
    versions = (*(w._version for w in weights), *(f.scaling for f, _ in groups), zero_entry)
    return plan.memo(weights + rows, stacks, versions)


def _gathered_low_rank(
    groups: Sequence[tuple[LowRank, torch.Tensor]], x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out`` plus every row's own ``scaling · B A x`` in two batched matmuls over the batch rows (the gathered
    matmul of Punica / S-LoRA): each row gathers its adapter's A and B (zero-padded to the largest rank; rows in no
    group get zeros) and ``baddbmm`` adds the update straight into that row's output, in place under the rule of
    :func:`accumulate`.

    It moves ``r·(in + out)`` gathered weights per row and pays when rows are long (prefill); for short rows
    (decoding) :func:`_grouped_low_rank` moves the activations instead. ``out`` must be contiguous; the adapters share
    one dtype. Adapters kept in float32 beside a half-precision base compute in float32, as each row alone would, and
    their update is rounded into ``out`` at the end.
    """
    batch, rank = out.shape[0], max(f.rank for f, _ in groups)
    slots = row_slots(groups, batch, out.device)  # (B,)
    a, b = _stacked(groups, rank, sum(len(rows) for _, rows in groups) < batch)  # (G[+1], r, in), (G[+1], out, r)
    return add_per_row_low_rank(out, x, a[slots], b[slots], 1.0)


def add_per_row_low_rank(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    """``out + alpha · b_i a_i x_i`` with each batch row ``i``'s own factors, in two batched matmuls: ``x``
    ``(B, ..., in)``, ``out`` ``(B, ..., out)``, ``a`` ``(B, r, in)``, ``b`` ``(B, out, r)``. The second matmul adds
    straight into ``out`` (``baddbmm``), in place under the rule of :func:`accumulate`. Used for gathered adapter
    weights (:func:`_gathered_low_rank`) and for factors that are themselves per row (Poly's routed mixtures).
    Factors in float32 beside a half-precision ``out`` (or under autocast) take the unfused path."""
    batch = out.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(a.dtype)  # (B, L, in)
    xa = torch.bmm(x3, a.transpose(1, 2))  # (B, L, r)
    b_rows = b.transpose(1, 2)  # (B, r, out)
    if not xa.dtype == b_rows.dtype == out.dtype or not out.is_contiguous():
        return accumulate(out, torch.bmm(xa, b_rows).view(out.shape), alpha)
    out3 = out.view(batch, -1, out.shape[-1])  # (B, L, out)
    if torch.is_grad_enabled():
        return torch.baddbmm(out3, xa, b_rows, alpha=alpha).view(out.shape)
    out3.baddbmm_(xa, b_rows, alpha=alpha)
    return out


def _group_layout(groups: Sequence[tuple[LowRank, torch.Tensor]], batch: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For :func:`_grouped_low_rank`: ``(G, m)`` row indices of each group padded to the largest group ``m`` with
    ``batch`` (an all-zero row appended to the input), the positions in ``G·m`` that are real rows, and those rows."""
    rows = tuple(r for _, r in groups)

    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = max(len(r) for r in rows)
        index = torch.full((len(rows), m), batch, dtype=torch.long, device=device)
        for g, r in enumerate(rows):
            index[g, : len(r)] = r
        valid = (index.view(-1) < batch).nonzero().view(-1)
        return index, valid, index.view(-1)[valid]

    plan = current_row_plan()
    return make() if plan is None else plan.memo(rows, make, ("layout",))


def _grouped_low_rank(
    groups: Sequence[tuple[LowRank, torch.Tensor]], x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out`` plus every row's own ``scaling · B A x`` for short rows (decoding): the rows of each adapter are
    gathered into one slice of a ``(G, m·L, in)`` batch (groups padded to the largest with zero rows), two batched
    matmuls against the stacked ``(G, r, in)`` / ``(G, out, r)`` weights give every group's update, and one indexed
    add puts them into their rows. A fixed handful of ops per layer whatever the number of adapters, and only the
    rows' activations move, not per-row copies of the weights."""
    batch, rank = out.shape[0], max(f.rank for f, _ in groups)
    index, valid, targets = _group_layout(groups, batch, out.device)
    a, b = _stacked(groups, rank, False)  # (G, r, in), (G, out, r)
    x3 = x.reshape(batch, -1, x.shape[-1]).to(a.dtype)  # (B, L, in)
    padded = torch.cat([x3, x3.new_zeros(1, *x3.shape[1:])])  # (B + 1, L, in)
    groups_x = padded[index].flatten(1, 2)  # (G, m·L, in)
    update = torch.bmm(torch.bmm(groups_x, a.transpose(1, 2)), b.transpose(1, 2))  # (G, m·L, out)
    update = update.view(-1, x3.shape[1], update.shape[-1]).index_select(0, valid)  # (n, L, out)
    out3 = out.view(batch, -1, out.shape[-1])  # (B, L, out)
    if update.dtype != out.dtype:
        update = update.to(out.dtype)
    if torch.is_grad_enabled():
        return out3.index_add(0, targets, update).view(out.shape)
    out3.index_add_(0, targets, update)
    return out

"""Poly / MHR: per-task routing over an inventory of LoRA "skills" (peft's ``POLY``).

Ponti et al., 2022, "Combining Modular Skills in Multitask Learning" (Polytropon, arXiv:2202.13914), §3: each adapted
Linear layer holds ``n_skills`` LoRA modules ``(A_s, B_s)``; each task ``t`` learns a routing vector ``Z_t`` over
them, and the task's update is the LoRA of the routed mixture ``A_t = Σ_s w_ts A_s``, ``B_t = Σ_s w_ts B_s``.
Caccia et al., 2022, "Multi-Head Adapter Routing for Cross-Task Generalization" (MHR, arXiv:2211.03831), §3: split
the input dimension of ``A`` (and the output dimension of ``B``) into ``n_splits`` heads, each routed on its own, so
a task combines skills per head. For row ``b`` of task ``t``::

    w_{t,q} = σ(Z_{t,q}) / Σ_s σ(Z_{t,q,s})         (n_splits, n_skills); Z = poly_router.module_logits[t]
    A_b[q·d_in + i, :] = Σ_s w_{t,q,s} A[q, s, i, :]   (in, r)    A: poly_lora_A (n_splits, n_skills, in/q, r)
    B_b[:, q·d_out + j] = Σ_s w_{t,q,s} B[q, s, :, j]  (r, out)   B: poly_lora_B (n_splits, n_skills, r, out/q)
    y_b = W x_b + (x_b A_b B_b) / r

In training the router draws relaxed Bernoulli samples instead of ``σ(Z)`` (a Gumbel-sigmoid with temperature 1,
Polytropon §3.2, independently for every row and layer), as peft does. ``init_weights=True`` zeroes ``B`` (a fresh
adapter is the base model); ``A`` is Kaiming-uniform per skill and head, the router logits uniform in ±1e-3.

Every forward and ``generate()`` of a ``PeftModel`` takes ``task_ids`` (one index below ``n_tasks`` per row; beams and
``num_return_sequences`` repeat them), which reach the layers through :func:`deltatune.rows.batch_tasks`. Each row's
mixture is a low-rank update of its own, added by the per-row kernel the mixed-adapter batches use
(:func:`deltatune.kernels.add_per_row_low_rank`). ``adapter_names`` rows work too: a Poly row takes its task id.
Merging is refused: the update depends on each row's task, so there is no single weight to fold in (peft has no merge
either). Layer type: ``nn.Linear``, as in peft. Saved keys, as peft: ``<path>.poly_lora_A``, ``<path>.poly_lora_B``,
``<path>.poly_router.module_logits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, NotMergeableError
from ..kernels import add_per_row_low_rank, index_accumulate
from ..layers import Delta
from ..registry import LayerMethod
from ..rows import row_tasks
from .common import check_divides, check_size, place_delta

__all__ = ["PolyConfig"]  # exported from deltatune

_EPS = 1e-12  # keeps the normalisation finite where every σ(Z) of a head underflows


@dataclass
class PolyConfig(LayerConfig):
    """Configuration of a Poly / MHR adapter (peft's field names and defaults). Shared targeting fields:
    ``target_modules``, ``exclude_modules``, ``modules_to_save`` (see ``LayerConfig``); ``target_modules=None`` takes
    LoRA's default per model type.

    Attributes:
        r: Rank of each skill's LoRA.
        init_weights: ``True``: ``poly_lora_B = 0`` (the base model). ``False``: Kaiming-uniform ``B`` too (a non-zero
            update, for tests).
        poly_type: The router; ``"poly"`` (the only one peft has).
        n_tasks: Number of tasks: rows of the routing matrix, and the bound of ``task_ids``.
        n_skills: Number of LoRA modules ("skills") per layer.
        n_splits: Heads the input (of ``A``) and output (of ``B``) dimensions are split into, each routed on its
            own; ``1`` is Polytropon, more is Multi-Head Routing. Must divide each target's in and out features.
    """

    peft_type: PeftType = field(default=PeftType.POLY, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")
    r: int = 8
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            check_size(name, getattr(self, name))
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (B zero) or False (random), got {self.init_weights!r}")
        if self.poly_type != "poly":
            raise ConfigError(f"poly_type must be 'poly' (the only router peft has), got {self.poly_type!r}")


class PolyRouter(nn.Module):
    """The routing matrix ``module_logits`` ``(n_tasks, n_splits·n_skills)`` (peft's module and parameter names)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.zeros(n_tasks, n_splits * n_skills))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``(len(task_ids), n_splits, n_skills)`` mixing weights, each head's summing to 1: from ``σ(Z)`` in eval,
        from relaxed Bernoulli samples of ``Z`` in training (one draw per row)."""
        logits = self.module_logits[task_ids].view(-1, self.n_splits, self.n_skills)
        if self.training:
            weights = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            weights = torch.sigmoid(logits)
        return weights / (weights.sum(dim=-1, keepdim=True) + _EPS)


class PolyDelta(Delta):
    """The skills of one layer and their router; each row adds the LoRA of its task's mixture, scaled by ``1 / r``."""

    def __init__(self, in_features: int, out_features: int, config: PolyConfig) -> None:
        super().__init__()
        q, s, r = config.n_splits, config.n_skills, config.r
        self.r = r
        self.poly_lora_A = nn.Parameter(torch.zeros(q, s, in_features // q, r))
        self.poly_lora_B = nn.Parameter(torch.zeros(q, s, r, out_features // q))
        self.poly_router = PolyRouter(config.n_tasks, q, s)

    def row_factors(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mixed factors for its task: ``a`` ``(B, r, in)`` and ``b`` ``(B, out, r)``, the layout of
        :func:`~deltatune.kernels.add_per_row_low_rank`. In eval, with fewer tasks than rows, every task's mixture
        is built once and gathered (training draws a routing sample per row)."""
        n_tasks = self.poly_router.module_logits.shape[0]
        if not self.training and n_tasks < len(task_ids):
            a, b = self.row_factors(torch.arange(n_tasks, device=task_ids.device))
            return a[task_ids], b[task_ids]
        w = self.poly_router(task_ids)  # (B, q, s)
        rows = len(task_ids)
        a = torch.einsum("bqs,qsdr->brqd", w, self.poly_lora_A).reshape(rows, self.r, -1)  # (B, r, in)
        b = torch.einsum("bqs,qsre->bqer", w, self.poly_lora_B).reshape(rows, -1, self.r)  # (B, out, r)
        return a, b

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        a, b = self.row_factors(_task_ids(x))
        return add_per_row_low_rank(base_out, x, a, b, 1.0 / self.r)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """``adapter_names`` rows: each Poly adapter's rows add their own tasks' updates."""
        task_ids = _task_ids(x)
        for delta, rows in groups:
            a, b = delta.row_factors(task_ids[rows])
            x_rows = x.index_select(0, rows)
            update = add_per_row_low_rank(x_rows.new_zeros(*x_rows.shape[:-1], out.shape[-1]), x_rows, a, b, 1.0)
            out = index_accumulate(out, rows, update, 1.0 / delta.r)
        return out

    def check_mergeable(self, base_layer: nn.Module) -> None:
        raise NotMergeableError(_NO_MERGE)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotMergeableError(_NO_MERGE)


_NO_MERGE = ("Poly adapters cannot be merged: each row's update depends on its task (task_ids), so there is no "
             "single weight to fold in; keep the PeftModel and pass task_ids")


def _task_ids(x: torch.Tensor) -> torch.Tensor:
    """The task index of each row of ``x`` (the enclosing ``batch_tasks`` block's), or a ``TypeError`` saying how to
    pass them."""
    task_ids = row_tasks(x.shape[0], x.device)
    if task_ids is None:
        raise TypeError(
            "a Poly adapter needs task_ids: one task index per row, passed to PeftModel's forward or generate, e.g. "
            "model(**inputs, task_ids=torch.tensor([0, 2])) (a layer run outside such a call, e.g. recomputed by "
            "gradient checkpointing during backward, has none)"
        )
    return task_ids


def check_target(config: PolyConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose in or out features ``n_splits`` does not divide (peft fails on the reshape)."""
    check_divides(name, f"n_splits={config.n_splits}", config.n_splits, base_layer,
                  "A's inputs and B's outputs are split into that many routed heads")


def make_delta(config: PolyConfig, base_layer: nn.Module, name: str) -> PolyDelta:
    """Build the Poly delta of ``base_layer`` (module ``name``)."""
    delta = PolyDelta(base_layer.in_features, base_layer.out_features, config)
    return place_delta(delta, base_layer.weight, lambda d: _init(d, config.init_weights))


def _init(delta: PolyDelta, zero_b: bool) -> None:
    """peft's init: every skill's A (and B unless zeroed) drawn as an ``nn.Linear`` weight of its shape (Kaiming-
    uniform with ``a=√5``: uniform in ``±1/√fan_in``), the router logits uniform in ±1e-3."""
    delta.poly_lora_A.uniform_(-1 / math.sqrt(delta.poly_lora_A.shape[2]), 1 / math.sqrt(delta.poly_lora_A.shape[2]))
    if zero_b:
        delta.poly_lora_B.zero_()
    else:
        delta.poly_lora_B.uniform_(-1 / math.sqrt(delta.r), 1 / math.sqrt(delta.r))
    delta.poly_router.module_logits.uniform_(-1e-3, 1e-3)


METHOD = LayerMethod(
    config_class=PolyConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
    num_tasks=lambda config: config.n_tasks,
    mergeable=False,
)

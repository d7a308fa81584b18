"""Super-Tuning: train the base weight's largest (or smallest) entries in place, optionally plus a LoRA ("Supra").

arXiv:2607.09287 (Super-Tuning), §3: the trainable support is chosen data-free by weight magnitude, the
``K = int(out · in · (1 − sparsity))`` entries of ``|W|`` with the largest magnitude (``select_top=False``: the
smallest, the paper's "-bottom" variants), taken by ``torch.topk`` over the row-major flattened ``(out, in)`` weight
exactly as peft takes them. ``supertuning_values[k]`` is the update at flat position ``indices[k]``; with ``r`` set
a LoRA of rank ``r`` is added on top (the paper's "Supra" hybrid):

    Δy[o] = Σ_k [indices_k // in = o] · values_k · x[indices_k mod in]  +  (lora_alpha / r) · B A x

computed as a gather and an ``index_add`` (``K`` products per row, no dense ``out × in`` update); merged
``W.flat[indices] += values`` plus ``(α/r) B A``.

Saved keys, peft's: ``<module>.supertuning_values`` ``(K,)``, ``<module>.supertuning_indices`` ``(K,)`` int32 (left
out with ``save_precomputed_indices=False``: then recomputed from the base weight on load, which must be the one
trained on) and, with ``r``, ``<module>.supertuning_lora_A.weight`` ``(r, in)`` / ``supertuning_lora_B.weight``
``(out, r)``. Loading checks that every index lies inside the weight. Init: values and ``B`` zero (the base model),
``A`` Kaiming-uniform (``a = √5``); ``init_weights=False`` draws values ``N(0, 1)`` and ``B`` like ``A``, for tests.

Layer type: ``nn.Linear``, as in peft. peft's ``SupertuningConfig`` has no ``exclude_modules``,
``layers_to_transform`` or ``layers_pattern``, so they are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, ConfigError, TargetError
from ..kernels import add_low_rank, add_sparse
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_dropout, check_scale, check_size, place_delta

__all__ = ["SupertuningConfig"]  # exported from deltatune


@dataclass
class SupertuningConfig(LayerConfig):
    """Configuration of a Super-Tuning adapter (peft's field names). Shared targeting fields: ``target_modules`` and
    ``modules_to_save`` (see ``LayerConfig``); peft's ``SupertuningConfig`` has no other.

    Attributes:
        sparsity: Share of each weight's entries left frozen, in ``[0, 1)``: ``0.99`` trains 1% of them.
        select_top: ``True``: train the largest-magnitude entries; ``False``: the smallest.
        r: LoRA rank of the "Supra" hybrid; ``None``: the sparse entries only.
        lora_alpha: The LoRA's scale numerator (``α/r``); ``None`` with ``r`` set becomes ``2·r`` (as peft writes
            it). Refused without ``r``.
        lora_dropout: Dropout on the LoRA's input during training.
        init_weights: ``True``: zero update (the base model). ``False``: random values and ``B``, for tests.
        save_precomputed_indices: Save the sparse positions in the file (``True``), or recompute them from the base
            weight on load (``False``: a smaller file, valid only on the very base weights trained on).
    """

    peft_type: PeftType = field(default=PeftType.SUPERTUNING, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules", "layers_to_transform", "layers_pattern")
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.r is None:
            if self.lora_alpha is not None:
                raise ConfigError("lora_alpha is set but r is None: the Supra LoRA needs an explicit r")
        else:
            check_size("r", self.r)
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r  # peft's default, written into the saved config as peft does
            check_scale("lora_alpha", self.lora_alpha)
        check_dropout("lora_dropout", self.lora_dropout)
        for name in ("select_top", "init_weights", "save_precomputed_indices"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _count(config: SupertuningConfig, base_layer: nn.Module) -> int:
    return int(base_layer.weight.numel() * (1 - config.sparsity))


class SupertuningDelta(Delta):
    """``Δy = x ΔWᵀ`` with ``ΔW`` non-zero only at ``supertuning_indices`` (flat), plus ``(α/r) B A x`` with ``r``."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int, r: int | None, alpha: float,
                 dropout: float, save_indices: bool) -> None:
        super().__init__()
        self.supertuning_values = nn.Parameter(torch.zeros(indices.shape[0]))
        # saved unless save_precomputed_indices=False, when the base weight gives them again on load (as in peft)
        self.register_buffer("supertuning_indices", indices, persistent=save_indices)
        self.out_features, self.in_features = out_features, in_features
        if r is not None:
            self.supertuning_lora_A = nn.Linear(in_features, r, bias=False)
            self.supertuning_lora_B = nn.Linear(r, out_features, bias=False)
            self.scaling = alpha / r
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.supertuning_indices.long()
        return flat // self.in_features, flat % self.in_features

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        out = add_sparse(base_out, x, *self._positions(), self.supertuning_values)
        if self.r is None:
            return out
        a = self.supertuning_lora_A.weight
        hidden = F.linear(self.dropout(x.to(a.dtype)), a)  # (..., r)
        return add_low_rank(out, hidden, self.supertuning_lora_B.weight, self.scaling)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        values = self.supertuning_values
        dense = values.new_zeros(self.out_features, self.in_features)  # (out, in)
        dense = dense.index_put(self._positions(), values, accumulate=True)
        if self.r is not None:
            dense = dense + self.scaling * (self.supertuning_lora_B.weight @ self.supertuning_lora_A.weight)
        return dense.to(base_layer.weight.dtype)

    def state_from_saved(self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        """The file's tensors unchanged, once its positions are known to be integers inside the weight (a wrong
        shape is left to the loader's shape check)."""
        indices = saved.get("supertuning_indices")
        if indices is None or indices.shape != self.supertuning_indices.shape:
            return saved
        if indices.is_floating_point() and not torch.equal(indices, indices.round()):
            raise AdapterLoadError("supertuning_indices holds non-integer values; the file is corrupt")
        flat = indices.to(torch.int64)
        if flat.numel() and not (0 <= flat.min() and flat.max() < self.out_features * self.in_features):
            raise AdapterLoadError(
                f"supertuning_indices points outside the {self.out_features} x {self.in_features} weight; the file "
                f"is corrupt or was not written for this model"
            )
        return saved

    def extra_repr(self) -> str:
        lora = "" if self.r is None else f", r={self.r}"
        return f"entries={self.supertuning_values.shape[0]} of {self.out_features}x{self.in_features}{lora}"


def magnitude_indices(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """``(k,)`` int32 flat positions of the ``k`` largest (or smallest) ``|weight|`` entries, in ``torch.topk``'s
    order (the order peft stores)."""
    return torch.topk(weight.detach().abs().flatten(), k=k, largest=largest).indices.to(torch.int32)


def check_target(config: SupertuningConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer so small that ``sparsity`` leaves none of its entries trainable.

    Raises:
        TargetError: ``int(out · in · (1 − sparsity)) < 1``.
    """
    if _count(config, base_layer) < 1:
        raise TargetError(
            f"{name}: sparsity={config.sparsity} leaves no trainable entry of its {base_layer.weight.numel()}; "
            f"lower sparsity"
        )


def make_delta(config: SupertuningConfig, base_layer: nn.Module, name: str) -> SupertuningDelta:
    """Build the Super-Tuning delta of ``base_layer`` (module ``name``) on its magnitude-selected entries."""
    weight = base_layer.weight
    k = _count(config, base_layer)
    if weight.device.type == "meta":  # a dry run that only counts sizes
        indices = torch.empty(k, dtype=torch.int32, device="meta")
    else:
        indices = magnitude_indices(weight, k, config.select_top)
    delta = SupertuningDelta(indices, base_layer.out_features, base_layer.in_features, config.r,
                             config.lora_alpha or 0.0, config.lora_dropout, config.save_precomputed_indices)

    def init(delta: SupertuningDelta) -> None:
        if not config.init_weights:
            delta.supertuning_values.normal_()
        if config.r is not None:
            nn.init.kaiming_uniform_(delta.supertuning_lora_A.weight, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(delta.supertuning_lora_B.weight)
            else:
                nn.init.kaiming_uniform_(delta.supertuning_lora_B.weight, a=math.sqrt(5))

    return place_delta(delta, weight, init)


METHOD = LayerMethod(
    config_class=SupertuningConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
)

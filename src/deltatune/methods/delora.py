"""DeLoRA: a low-rank update whose strength is a trained, bounded number apart from its direction.

Bini et al., 2025, "Decoupling Angles and Strength in Low-rank Adaptation" (arXiv:2503.18225), §3: LoRA's ``B A`` is
normalised rank by rank and given a single trainable scale ``λ``, so its Frobenius norm is at most ``λ`` times the
base weight's and training can turn the update (its "angle") without growing it:

    ΔW = (λ / r) · B diag(1 / (‖A_i‖ ‖Bᵀ_i‖)) A · diag(‖W_{:,j}‖)

with ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``, ``‖A_i‖`` the norm of row ``i`` of ``A``, ``‖Bᵀ_i‖`` of column ``i`` of ``B``
(both clamped at ``1e-4``, as in peft) and ``‖W_{:,j}‖`` the norm of the base weight's input column ``j``, taken
once when the adapter is made and kept with it (``delora_w_norm``), so the bound follows the base weight's scale.
Init: ``A`` Kaiming-uniform (``a = √5``), ``B = 0`` (the base model), ``λ = delora_lambda``; ``init_weights=False``
draws ``B`` like ``A`` (a non-zero update, for tests).

Saved keys, peft's: ``<module>.delora_A``, ``<module>.delora_B``, ``<module>.delora_lambda`` ``(1,)`` and
``<module>.delora_w_norm`` ``(in,)``. ``module_dropout`` is, as peft 0.21.2 applies it, an element dropout on the
adapter's input during training (its documentation speaks of dropping whole modules). Layer type: ``nn.Linear``, as
in peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType, validate_regex
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from ..targeting import pattern_key_regex, pattern_value
from .common import check_dropout, check_scale, check_size, check_size_pattern, place_delta

__all__ = ["DeloraConfig"]  # exported from deltatune

_NORM_FLOOR = 1e-4  # peft's clamp of the rank-wise norms


@dataclass
class DeloraConfig(LayerConfig):
    """Configuration of a DeLoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Rank of ``A`` and ``B``.
        delora_lambda: Initial ``λ``, the bound on ``‖ΔW‖`` relative to the base weight (trained).
        module_dropout: Dropout on the adapter's input during training (peft's implementation of this field).
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"delora_only"`` (biases of adapted layers).
        init_weights: ``True``: ``B = 0`` (the base model). ``False``: ``B`` random like ``A``, for tests.
        rank_pattern: ``{module-name pattern: r}`` overriding ``r`` for matching modules (regex on the name's dotted
            suffix, as LoRA's).
        lambda_pattern: ``{module-name pattern: λ}`` overriding ``delora_lambda`` likewise.
    """

    peft_type: PeftType = field(default=PeftType.DELORA, init=False)
    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_scale("delora_lambda", self.delora_lambda)
        check_dropout("module_dropout", self.module_dropout)
        if self.bias not in ("none", "all", "delora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'delora_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (B = 0) or False (random), got {self.init_weights!r}")
        check_size_pattern("rank_pattern", self.rank_pattern)
        if not isinstance(self.lambda_pattern, dict):
            raise ConfigError(f"lambda_pattern must be a dict of module-name pattern -> lambda, got "
                              f"{self.lambda_pattern!r}")
        for key, value in self.lambda_pattern.items():
            check_scale(f"lambda_pattern[{key!r}]", value)
            validate_regex(f"lambda_pattern key {key!r}", pattern_key_regex(key))


class DeloraDelta(Delta):
    """``Δy = (λ/r) · B diag(1/(‖A_i‖‖Bᵀ_i‖)) A (x ⊙ w_norm)``."""

    def __init__(self, in_features: int, out_features: int, r: int, dropout: float) -> None:
        super().__init__()
        self.delora_A = nn.Parameter(torch.zeros(r, in_features))
        self.delora_B = nn.Parameter(torch.zeros(out_features, r))
        self.delora_lambda = nn.Parameter(torch.zeros(1))
        self.register_buffer("delora_w_norm", torch.ones(in_features))  # saved, as in peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def rank_scale(self) -> torch.Tensor:
        """``(r,)``: ``(λ / r) / (‖A_i‖ ‖Bᵀ_i‖)``."""
        a_norm = self.delora_A.norm(dim=1).clamp(min=_NORM_FLOOR)
        b_norm = self.delora_B.norm(dim=0).clamp(min=_NORM_FLOOR)
        return self.delora_lambda / self.delora_A.shape[0] / (a_norm * b_norm)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        a = self.delora_A
        hidden = F.linear(self.dropout(x.to(a.dtype)) * self.delora_w_norm, a) * self.rank_scale()  # (..., r)
        return accumulate(base_out, F.linear(hidden, self.delora_B).to(base_out.dtype), 1.0)  # (..., out)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        weight = (self.delora_B * self.rank_scale()) @ self.delora_A * self.delora_w_norm  # (out, in)
        return weight.to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.delora_A.shape[1]}, out={self.delora_B.shape[0]}, r={self.delora_A.shape[0]}"


def make_delta(config: DeloraConfig, base_layer: nn.Module, name: str) -> DeloraDelta:
    """Build and initialise the DeLoRA delta of ``base_layer`` (module ``name``); see the module docstring's init."""
    r = pattern_value(config.rank_pattern, name, config.r)
    delta = DeloraDelta(base_layer.in_features, base_layer.out_features, r, config.module_dropout)
    weight = base_layer.weight

    def init(delta: DeloraDelta) -> None:
        nn.init.kaiming_uniform_(delta.delora_A, a=math.sqrt(5))
        if not config.init_weights:
            nn.init.kaiming_uniform_(delta.delora_B, a=math.sqrt(5))
        delta.delora_lambda.fill_(float(pattern_value(config.lambda_pattern, name, config.delora_lambda)))
        delta.delora_w_norm.copy_(weight.detach().float().norm(dim=0))  # (in,): each input column's norm

    return place_delta(delta, weight, init)


METHOD = LayerMethod(
    config_class=DeloraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
)

"""RoAd: rotate pairs of a layer's output features by learned, scaled 2-D rotations.

Liao et al., 2024, "RoAd: 2D Rotary Adaptation for Efficient Finetuning, Batching and Composability"
(arXiv:2409.00119), §3 (eq. 4): the base output ``h = W x + b`` is split into pairs and each pair turned by its own
2-D rotation with a scale, ``y = R h``. Only elementwise products are needed, so a mixed-adapter batch costs what one
adapter costs (§3.2). As in peft, the output is cut into groups of ``group_size`` features and feature ``i`` of a
group pairs with feature ``i + group_size/2``; with halves ``h₁``, ``h₂`` of a group:

    y₁ = c₁ ⊙ h₁ − s₁ ⊙ h₂,    y₂ = c₂ ⊙ h₂ + s₂ ⊙ h₁,    with c = α cos θ, s = α' sin θ'

(``c``, ``s`` are ``(out,)`` vectors, indexed like ``h``). The variants say how many numbers each feature gets:

* ``road_1``: ``road_theta`` / ``road_alpha`` are ``(out/2,)``: one angle and scale per pair (both halves of a group
  read the same ``group_size/2`` values), ``c = α cos θ``, ``s = α sin θ``;
* ``road_2``: ``(out,)``: one angle and scale per feature;
* ``road_4``: ``(2·out,)``: per group, ``group_size`` values for ``c`` then ``group_size`` for ``s`` (angles and
  scales each), ``c = α_c cos θ_c``, ``s = α_s sin θ_s``.

``θ = 0``, ``α = 1`` (the init) is the identity. ``init_weights=False``: ``θ ~ N(0, 0.5²)``, ``α ~ N(1, 0.5²)``.
Merging uses ``R (W x + b) = (R W) x + R b``: the rows of ``W`` and the bias are rotated by the same elementwise
formula, and unmerging applies the exact inverse of each pair's 2×2 matrix (not orthogonal once scaled).

Saved keys, peft's: ``<module>.road_theta`` and ``<module>.road_alpha``. Layer type: ``nn.Linear``, as in peft
(``out_features`` must be a multiple of ``group_size``). peft's ``RoadConfig`` has no ``bias``, ``exclude_modules``,
``layers_to_transform`` or ``layers_pattern``, so they are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_divides, check_size, place_delta

__all__ = ["RoadConfig"]  # exported from deltatune

# variant -> parameters per output feature
_SIZES = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(LayerConfig):
    """Configuration of a RoAd adapter (peft's field names). Shared targeting fields: ``target_modules`` and
    ``modules_to_save`` (see ``LayerConfig``); peft's ``RoadConfig`` has no other.

    Attributes:
        variant: ``"road_1"``, ``"road_2"`` or ``"road_4"``: ``out/2``, ``out`` or ``2·out`` angles (and as many
            scales) per layer (see the module docstring).
        group_size: Features per group; feature ``i`` pairs with ``i + group_size/2``. Even, and a divisor of every
            target's ``out_features``. It changes only the layout (speed in serving engines), not what can be learned.
        init_weights: ``True``: the identity (the base model). ``False``: random angles and scales, for tests.
    """

    peft_type: PeftType = field(default=PeftType.ROAD, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules", "layers_to_transform", "layers_pattern")
    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in _SIZES:
            raise ConfigError(f"variant must be 'road_1', 'road_2' or 'road_4', got {self.variant!r}")
        check_size("group_size", self.group_size)
        if self.group_size % 2:
            raise ConfigError(f"group_size must be even (features pair within a group), got {self.group_size}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (identity) or False (random), got {self.init_weights!r}")


def _halves(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(..., out) -> (..., groups, 2, group_size/2)``: the two halves of each group."""
    return t.unflatten(-1, (-1, 2, group_size // 2))


class RoadDelta(Delta):
    """``y = c ⊙ h + s ⊙ rotate_half(h)`` on the base output ``h`` (module docstring)."""

    def __init__(self, variant: str, group_size: int, out_features: int) -> None:
        super().__init__()
        size = int(_SIZES[variant] * out_features)
        self.road_theta = nn.Parameter(torch.zeros(size))
        self.road_alpha = nn.Parameter(torch.ones(size))
        self.variant, self.group_size = variant, group_size

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, s)``, each ``(out,)``: the diagonal and the off-diagonal of every pair's 2×2 matrix."""
        theta, alpha, g = self.road_theta, self.road_alpha, self.group_size
        if self.variant == "road_4":  # per group: g values for c, then g for s
            theta, alpha = theta.view(-1, 2, g), alpha.view(-1, 2, g)
            return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()
        if self.variant == "road_1":  # both halves of a group share the group's g/2 values
            theta, alpha = (t.view(-1, 1, g // 2).expand(-1, 2, -1).flatten() for t in (theta, alpha))
        return alpha * theta.cos(), alpha * theta.sin()

    def rotate(self, h: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``R h`` (``R⁻¹ h`` with ``inverse``) over the last dim of ``h`` ``(..., out)``."""
        c, s = (_halves(v, self.group_size) for v in self.columns())  # (groups, 2, g/2)
        if inverse:  # [[c₁, −s₁], [s₂, c₂]]⁻¹ = [[c₂, s₁], [−s₂, c₁]] / (c₁c₂ + s₁s₂)
            det = c[:, 0] * c[:, 1] + s[:, 0] * s[:, 1]
            c, s = c.flip(1) / det[:, None], -s / det[:, None]
        parts = _halves(h, self.group_size)
        swapped = torch.stack([-parts[..., 1, :], parts[..., 0, :]], dim=-2)  # (−h₂, h₁)
        return (parts * c + swapped * s).flatten(-3)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotate(base_out.to(self.road_theta.dtype)).to(base_out.dtype)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotate(weight.T.to(self.road_theta.dtype)).T.to(weight.dtype)  # R W

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotate(weight.T.to(self.road_theta.dtype), inverse=True).T.to(weight.dtype)

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotate(bias.to(self.road_theta.dtype)).to(bias.dtype)  # R b

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotate(bias.to(self.road_theta.dtype), inverse=True).to(bias.dtype)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, group_size={self.group_size}"


def check_target(config: RoadConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose output the groups do not tile.

    Raises:
        TargetError: ``group_size`` does not divide ``out_features``.
    """
    check_divides(name, f"group_size={config.group_size}", config.group_size, base_layer,
                  "the output is rotated in groups", sides=("out",))


def make_delta(config: RoadConfig, base_layer: nn.Module, name: str) -> RoadDelta:
    """Build the RoAd delta of ``base_layer`` (module ``name``): the identity, or random if not ``init_weights``."""
    delta = RoadDelta(config.variant, config.group_size, base_layer.out_features)
    return place_delta(delta, base_layer.weight, None if config.init_weights else _randomize)


def _randomize(delta: RoadDelta) -> None:
    delta.road_theta.normal_(0.0, 0.5)
    delta.road_alpha.normal_(1.0, 0.5)


METHOD = LayerMethod(
    config_class=RoadConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
)

"""HRA: multiply the frozen weight by a chain of trainable Householder reflections.

Yuan et al., 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation"
(arXiv:2405.17484), §3: ``W' = W H₁ H₂ ⋯ H_r`` with ``H_i = I − 2 u_i u_iᵀ / ‖u_i‖²``, the columns ``u_i`` of the
trainable ``U ∈ R^{d×r}`` (``d``: the dimension the weight reads). The product is orthogonal, so the update keeps the
angles between the weight's rows (as OFT does) while ``W' − W`` has rank at most ``r`` (as LoRA's). The strictly
orthogonal variant (``apply_GS``) first orthonormalises ``U`` by Gram-Schmidt into ``Q``, which makes the reflections
commute: ``W' = W (I − 2 Q Qᵀ)``.

What is stored and computed follows peft 0.21 so adapters load across libraries to equal outputs:

* ``hra_u`` is ``(d, r)``: ``d = in_features`` for a Linear, ``in_channels · k · k`` for a square ``k × k`` Conv2d
  (the kernel flattened as ``(out, C·k·k)``, peft's layout).
* init (``init_weights=True``, even ``r``): ``r/2`` Kaiming-uniform columns, each repeated twice, so each pair of equal
  reflections cancels and a fresh adapter is the base model (up to rounding); an odd ``r`` cannot pair up, and the
  columns are all random (with a warning, as peft). ``init_weights=False``: all random.
* a Linear runs the base layer on ``x (H₁ ⋯ H_r)ᵀ = x H_r ⋯ H₁``, reflecting the input rather than building the
  ``d × d`` product; a Conv2d adds ``conv(x, W R − W)``. Merging writes ``W R`` (unmerge: ``W Rᵀ``, its inverse).
  With several HRA adapters active at once on a Linear, the input is reflected by the first one first, so the
  unmerged output is ``W R₂ R₁`` where peft (and the merged weight) give ``W R₁ R₂``; one active adapter is exact.
* with ``apply_GS``, an untrained paired init has repeated columns, which Gram-Schmidt cannot orthogonalise: peft
  then normalises rounding noise, so neither library's fresh ``apply_GS`` adapter is the base model.

Layer types: ``nn.Linear`` and ``nn.Conv2d`` (square kernels, ``groups=1``), as in peft. Unlike peft's unmerged conv
(which reads only ``stride[0]`` / ``padding[0]`` and no dilation), a conv runs with its own settings: peft's merged
weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_size, place_delta

__all__ = ["HRAConfig"]  # exported from deltatune


@dataclass
class HRAConfig(LayerConfig):
    """Configuration of an HRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Number of Householder reflections per layer; even, for the default init to start at the base model.
        apply_GS: Orthonormalise the reflection vectors by Gram-Schmidt before use.
        init_weights: ``True``: paired columns (the base model at init). ``False``: random columns, for tests.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"hra_only"`` (biases of adapted layers).
    """

    peft_type: PeftType = field(default=PeftType.HRA, init=False)
    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        for name in ("apply_GS", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in ("none", "all", "hra_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'hra_only', got {self.bias!r}")


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """``(d, r) -> (d, r)``: orthonormal columns spanning ``u``'s, column ``i`` from ``u_i`` less its projections on
    the ones before."""
    basis = u[:, :1] / u[:, :1].norm()
    for i in range(1, u.shape[1]):
        v = u[:, i : i + 1]
        v = v - basis @ (basis.T @ v)  # (d, 1)
        basis = torch.cat([basis, v / v.norm()], dim=1)
    return basis


def reflect_rows(t: torch.Tensor, u: torch.Tensor, apply_gs: bool, *, reverse: bool = False) -> torch.Tensor:
    """``t H₁ H₂ ⋯ H_r`` over ``t``'s last dim (``(..., d)``), or ``t H_r ⋯ H₁`` with ``reverse``; with ``apply_gs``
    the single reflection ``t (I − 2 Q Qᵀ)``, its own inverse."""
    if apply_gs:
        q = gram_schmidt(u)  # (d, r)
        return t - 2 * (t @ q) @ q.T
    unit = u / u.norm(dim=0)  # (d, r)
    for i in reversed(range(unit.shape[1])) if reverse else range(unit.shape[1]):
        col = unit[:, i]  # (d,)
        t = t - 2 * (t @ col)[..., None] * col
    return t


class HRADelta(Delta):
    """The reflections shared by both layer types, acting on the ``d`` features the weight reads."""

    def __init__(self, features: int, config: HRAConfig) -> None:
        super().__init__()
        self.hra_u = nn.Parameter(torch.zeros(features, config.r))
        self.apply_gs = config.apply_GS

    def reflect(self, t: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
        return reflect_rows(t, self.hra_u, self.apply_gs, reverse=reverse)

    def rotated_weight(self, weight: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
        """``W R`` (``W Rᵀ`` with ``reverse``) in the adapter's dtype, ``weight`` flattened to ``(out, d)`` and back."""
        return self.reflect(weight.flatten(1).to(self.hra_u.dtype), reverse=reverse).view(weight.shape)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotated_weight(weight).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotated_weight(weight, reverse=True).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"d={self.hra_u.shape[0]}, r={self.hra_u.shape[1]}, apply_GS={self.apply_gs}"


class HRALinear(HRADelta):
    """``y = W R x + b``: the base layer runs on ``x Rᵀ``."""

    transforms_input = True

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.reflect(x.to(self.hra_u.dtype), reverse=True).to(x.dtype)  # (..., in)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out


class HRAConv2d(HRADelta):
    """``y = conv(x, W R) + b``, added to the base output as ``conv(x, W R − W)``."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight  # (out, C, k, k)
        change = self.rotated_weight(weight) - weight
        return base_out + base_layer._conv_forward(x.to(change.dtype), change, None).to(base_out.dtype)


def check_target(config: HRAConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse what peft's file layout cannot describe, and more Gram-Schmidt vectors than dimensions.

    Raises:
        TargetError: a grouped or non-square Conv2d, or ``apply_GS`` with ``r`` above the layer's dimension.
    """
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise TargetError(
                f"{name}: HRA cannot adapt a grouped convolution (groups={base_layer.groups}), as in peft; exclude it "
                f"from target_modules"
            )
        if base_layer.kernel_size[0] != base_layer.kernel_size[1]:
            raise TargetError(
                f"{name}: HRA adapts square kernels only (peft sizes hra_u as in_channels·k·k), got kernel_size="
                f"{tuple(base_layer.kernel_size)}"
            )
    if config.apply_GS and config.r > _features(base_layer):
        raise TargetError(
            f"{name}: apply_GS orthonormalises r={config.r} vectors in {_features(base_layer)} dimensions, which "
            f"cannot all be orthogonal; use r <= {_features(base_layer)}"
        )


def _features(base_layer: nn.Module) -> int:
    """``d``: the dimension the reflections act on."""
    return base_layer.weight[0].numel()  # in_features, or in_channels · k · k


def make_delta(config: HRAConfig, base_layer: nn.Module, name: str) -> HRADelta:
    """Build and initialise the HRA delta of ``base_layer`` (module ``name``); see the module docstring's init."""
    cls = HRAConv2d if isinstance(base_layer, nn.Conv2d) else HRALinear
    delta = cls(_features(base_layer), config)

    def init(delta: HRADelta) -> None:
        u = delta.hra_u
        if config.init_weights and config.r % 2 == 0:
            half = nn.init.kaiming_uniform_(torch.zeros(u.shape[0], config.r // 2), a=math.sqrt(5))
            u.copy_(half.repeat_interleave(2, dim=1))
        else:
            if config.init_weights:
                warnings.warn(
                    f"{name}: HRA's identity init pairs equal reflections, which an odd r={config.r} cannot do; "
                    f"starting from random reflections (the adapter changes the model at init), as peft does"
                )
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=HRAConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, nn.Conv2d),
    check_target=check_target,
)

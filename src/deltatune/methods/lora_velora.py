"""VeLoRA: LoRA whose ``A`` projection keeps a compressed copy of its input for backward instead of the input itself.

Miles et al., 2024, "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections" (arXiv 2405.17991), §3:
each input token ``x`` (``in`` features) is split into ``G = num_groups`` sub-tokens of ``d = ⌈in / G⌉`` features
(zero-padded), and each sub-token is kept only as its coordinate on one fixed unit vector ``v`` (``d``): forward saves
``c = [⟨xᵢ, v⟩]ᵢ`` (``G`` numbers per token instead of ``in``), backward rebuilds ``x̂ = scale · [cᵢ v]ᵢ`` (cut to
``in``) and computes ``∂L/∂A = gᵀ x̂`` from it. The forward output is plain LoRA's, so evaluation, merging and files
(besides ``v``) are LoRA's; only ``A``'s gradient is approximate.

``v`` (``lora_velora_embed``, ``(d,)``, a saved buffer as in peft) follows ``init_type``: ``"random"`` (a normalised
Gaussian, fixed), ``"batch_average"`` (the normalised mean sub-token of each training batch, refreshed every training
forward) or ``"batch_average_once"`` (taken from the first training batch after the adapter is built or loaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._lora_variant import LoraLinearLike, LoraVariant
from .common import check_size, layer_features

__all__ = ["VeloraConfig"]

_INIT_TYPES = ("batch_average", "batch_average_once", "random")


@dataclass
class VeloraConfig:
    """VeLoRA's compression (peft's ``VeloraConfig``).

    Attributes:
        num_groups: Sub-tokens per token ``G``: more keeps more of the input (and more memory).
        scale: Factor on the rebuilt input in backward.
        init_type: How ``v`` is chosen: ``"batch_average"``, ``"batch_average_once"`` or ``"random"``.
    """

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __post_init__(self) -> None:
        check_size("velora_config.num_groups", self.num_groups)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale < math.inf:
            raise ConfigError(f"velora_config.scale must be a positive finite number, got {self.scale!r}")
        if self.init_type not in _INIT_TYPES:
            raise ConfigError(f"velora_config.init_type must be one of {list(_INIT_TYPES)}, got {self.init_type!r}")


def sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` ``(..., in)`` as ``(tokens, G, d)`` sub-tokens, zero-padded to ``G·d`` features."""
    d = -(-x.shape[-1] // groups)
    return F.pad(x, (0, groups * d - x.shape[-1])).reshape(-1, groups, d)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` in fp32; the all-ones direction for a zero vector."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    return torch.ones_like(v) / math.sqrt(v.numel()) if norm == 0 else v / norm


class _CompressedProjection(torch.autograd.Function):
    """``x Aᵀ`` saving the sub-token coordinates ``c`` ``(tokens, G)`` rather than ``x`` for ``A``'s gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, v: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
        coords = torch.einsum("tgd,d->tg", sub_tokens(x, groups), v.to(x.dtype))
        ctx.save_for_backward(coords, a, v)
        ctx.x_shape, ctx.scale = x.shape, scale
        return F.linear(x, a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        coords, a, v = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, r)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ a.to(g.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            rebuilt = (coords.to(g.dtype)[..., None] * v.to(g.dtype)).flatten(1)[:, : ctx.x_shape[-1]]  # (tokens, in)
            grad_a = (g.T @ (rebuilt * ctx.scale)).to(a.dtype)
        return grad_x, grad_a, None, None, None


class VeloraVariant(LoraVariant):
    """A LoRA delta whose ``A`` keeps compressed activations (see the module docstring)."""

    field = "velora_config"
    sub_config = VeloraConfig

    def __init__(self, config: VeloraConfig) -> None:
        self.config = config
        self.initialized = config.init_type == "random"  # batch_average_once: set by the first training batch

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> VeloraVariant:
        velora: VeloraConfig = config.velora_config
        d = -(-layer_features(base_layer)[0] // velora.num_groups)
        weight = base_layer.weight  # v in the base weight's dtype, as peft keeps it
        v = torch.zeros(d, device=weight.device, dtype=weight.dtype)
        if velora.init_type == "random" and weight.device.type != "meta":
            v = _unit(torch.randn(d, device=weight.device)).to(weight.dtype)
        delta.register_buffer("lora_velora_embed", v)
        return cls(velora)

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        if not (delta.training and torch.is_grad_enabled()):
            return super().lora_forward(delta, x)
        if not self.initialized or self.config.init_type == "batch_average":
            with torch.no_grad():
                mean = sub_tokens(x.detach(), self.config.num_groups).flatten(0, 1).mean(0)  # (d,)
                delta.lora_velora_embed.copy_(_unit(mean))
            self.initialized = True
        xa = _CompressedProjection.apply(x, delta.lora_A.weight, delta.lora_velora_embed, self.config.num_groups,
                                         self.config.scale)
        return F.linear(xa, delta.lora_B.weight)

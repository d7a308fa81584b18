"""DoRA, weight-decomposed LoRA, as a variant strategy of a LoRA delta.

Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", §4.1: ``W' = m · (W₀ + ΔW) / ‖W₀ + ΔW‖`` per output
channel, with ``ΔW`` the LoRA update and a trainable magnitude ``m`` initialised to ``‖W₀ + ΔW‖`` (so a fresh adapter
is plain LoRA); §4.3: the norm is a constant in backward, which saves memory.

A LoRA delta holds a :class:`DoraVariant` when its adapter uses DoRA (``None`` for plain LoRA) and calls it from each
hook whose math DoRA changes: forward, merge, unmerge. The magnitude itself is a parameter of the LoRA delta, named
``lora_magnitude_vector`` and shaped as peft stores it, so that files interchange with peft and parameter counts agree;
the variant owns everything computed from it. This module sits beside ``lora.py`` and imports nothing from it: what it
reads from the delta is the :class:`LoraDeltaLike` protocol.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ..kernels import accumulate
from .common import channel_view


class LoraDeltaLike(Protocol):
    """What DoRA reads from the LoRA delta it rescales (implemented by ``methods/lora.py``'s ``LoraDelta``)."""

    scaling: float
    channel_dim: int  # the dimension of the layer's output that indexes output channels
    lora_magnitude_vector: nn.Parameter

    @property
    def adapter_dtype(self) -> torch.dtype: ...

    def dropout_active(self) -> bool: ...

    def canonical(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor: ...

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def lora_weight(self) -> torch.Tensor: ...

    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    def add_lora_weight(self, weight: torch.Tensor) -> torch.Tensor: ...

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor: ...


class _DoraRescale(torch.autograd.Function):
    """DoRA's per-channel rescaling of the LoRA output: ``y = lora_out + (s - 1) ⊙ z`` with ``z = lora_out - offset``
    and ``s = m / ‖W₀ + ΔW‖`` (the norm is a constant, DoRA §4.3).

    ``z`` is the adapted layer's output before rescaling and without the part that is not rescaled (the bias, and
    under dropout the base response to the dropped-out inputs); ``y = s ⊙ z + offset``. Written as a correction of
    ``lora_out``, a fresh adapter (``s = 1``) returns it bit for bit. The input gradient is ``g ⊙ s`` in one pass.

    Only the magnitude's gradient ``Σ g ⊙ z / ‖W₀ + ΔW‖`` needs a full-size tensor. Where the offset is the bias (no
    dropout), ``z = (y - offset) / s`` follows from the *output*, which is what is saved: the next op of most layers
    (an activation, a gating product, attention on the values) saves that same tensor anyway, so DoRA then costs no
    activation memory beyond LoRA's there. ``recompute_z`` rebuilds ``z`` from the layer input for the two cases
    where the output cannot give it back: a later op changed the output in place, or a channel's magnitude is 0.
    Under dropout the offset is a full tensor, and ``z`` itself is saved.
    """

    @staticmethod
    def parts(lora_out: torch.Tensor, offset: torch.Tensor | None, magnitude: torch.Tensor, norm: torch.Tensor,
              channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, s, s - 1)``; ``s`` shaped to broadcast along the channel dim and kept in the magnitude's dtype,
        ``s - 1`` (small near the start) taken before it is rounded to the output's dtype."""
        scale = channel_view(magnitude / norm, lora_out.ndim, channel_dim)  # (1, …, out, …, 1)
        z = lora_out if offset is None else lora_out - offset  # (..., out, ...)
        return z, scale, (scale - 1).to(lora_out.dtype)

    @staticmethod
    def forward(ctx, lora_out: torch.Tensor, offset: torch.Tensor | None, magnitude: torch.Tensor, norm: torch.Tensor,
                channel_dim: int, recompute_z: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        z, scale, scale_minus_one = _DoraRescale.parts(lora_out, offset, magnitude, norm, channel_dim)
        y = torch.addcmul(lora_out, z, scale_minus_one)
        ctx.save_for_backward(z if recompute_z is None else y)
        ctx.recompute_z, ctx.offset, ctx.scale, ctx.norm = recompute_z, offset, scale, norm
        ctx.offset_shape = None if offset is None else offset.shape
        ctx.channel_dim = channel_dim
        return y

    @staticmethod
    def _z(ctx) -> torch.Tensor:
        if ctx.recompute_z is None:
            return ctx.saved_tensors[0]
        try:
            (y,) = ctx.saved_tensors
        except RuntimeError:  # the output was modified in place after this op
            return ctx.recompute_z()
        if bool((ctx.scale == 0).any()):
            return ctx.recompute_z()
        return (y if ctx.offset is None else y - ctx.offset) / ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale, norm = ctx.scale, ctx.norm
        grad_offset = grad_magnitude = None
        if ctx.needs_input_grad[1]:
            grad_offset = (grad * (1 - scale)).sum_to_size(ctx.offset_shape).to(grad.dtype)
        if ctx.needs_input_grad[2]:
            dims = [d for d in range(grad.ndim) if d != ctx.channel_dim % grad.ndim]
            grad_magnitude = (grad * _DoraRescale._z(ctx)).sum(dims, dtype=norm.dtype) / norm
        return (grad * scale).to(grad.dtype), grad_offset, grad_magnitude, None, None, None


class DoraVariant:
    """DoRA's part of one LoRA delta: the magnitude's initialisation, the rescaled forward, merging and unmerging.

    Every method takes the LoRA ``delta`` it belongs to; the object itself keeps only the norm a merge divided by, so
    that unmerging inverts that exact merge.
    """

    def __init__(self) -> None:
        self._merged_norm: torch.Tensor | None = None

    @classmethod
    def for_delta(cls, delta: LoraDeltaLike, base_layer: nn.Module) -> DoraVariant:
        """Give ``delta`` its magnitude ``m = ‖W₀ + ΔW‖`` (so the adapter starts as plain LoRA) and return its variant.

        peft stores a convolution's magnitude as ``(1, out, 1, ...)`` and a linear one as ``(out,)``; the math reads
        it back with ``.flatten()``.
        """
        norm = cls.weight_norm(delta, base_layer)  # (out,)
        stored = norm if delta.channel_dim == -1 else channel_view(norm, base_layer.weight.ndim, delta.channel_dim)
        delta.lora_magnitude_vector = nn.Parameter(stored)
        return cls()

    @staticmethod
    @torch.no_grad()
    def weight_norm(delta: LoraDeltaLike, base_layer: nn.Module) -> torch.Tensor:
        """Per-output-channel norm of ``W₀ + ΔW``, shape ``(out,)``; a constant for autograd, as in DoRA §4.3."""
        weight = delta.canonical(base_layer.weight, base_layer).to(delta.adapter_dtype)
        return delta.add_lora_weight(weight).flatten(1).norm(dim=1)

    def forward(self, delta: LoraDeltaLike, x: torch.Tensor, base_out: torch.Tensor,
                base_layer: nn.Module) -> torch.Tensor:
        """``y = s ⊙ (W₀x + ΔWx) + b`` with ``s = m / ‖W₀ + ΔW‖``, as a rescaling of the LoRA output (see
        :class:`_DoraRescale` for what it keeps for backward); ``x`` is already the adapter's input (dtype, dropout)."""
        norm = self.weight_norm(delta, base_layer)  # (out,)
        magnitude = delta.lora_magnitude_vector.flatten()  # (out,)
        if delta.dropout_active():  # the base term must see the same dropped input as the update
            offset = (base_out - delta.base_no_bias(x, base_layer)).to(base_out.dtype)  # W₀(x - x̃) + b  (..., out)
        else:
            bias = getattr(base_layer, "bias", None)
            offset = None if bias is None else channel_view(bias, base_out.ndim, delta.channel_dim).to(base_out.dtype)
        lora_out = delta.add_update(base_out, x)  # (..., out)
        if torch.is_grad_enabled():
            recompute_z = None if delta.dropout_active() else functools.partial(_z_from_input, delta, x, base_layer,
                                                                                lora_out.dtype)
            return _DoraRescale.apply(lora_out, offset, magnitude, norm, delta.channel_dim, recompute_z)
        z, _, scale_minus_one = _DoraRescale.parts(lora_out, offset, magnitude, norm, delta.channel_dim)
        return lora_out.addcmul_(z, scale_minus_one)  # no autograd: in place, as in kernels.accumulate

    def merge_weight(self, delta: LoraDeltaLike, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """``m · (W₀ + ΔW) / ‖W₀ + ΔW‖`` in ``weight``'s layout; the norm is kept for :meth:`unmerge_weight`."""
        norm = self._merged_norm = self.weight_norm(delta, base_layer)
        merged = delta.canonical(weight, base_layer) + delta.lora_weight() * delta.scaling
        factor = (delta.lora_magnitude_vector.flatten() / norm).view(-1, *([1] * (merged.ndim - 1)))
        return delta.canonical((factor * merged).to(weight.dtype), base_layer)

    def unmerge_weight(self, delta: LoraDeltaLike, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        canonical = delta.canonical(weight, base_layer)
        factor = (delta.lora_magnitude_vector.flatten() / self._merged_norm).view(-1, *([1] * (canonical.ndim - 1)))
        orig = canonical / factor - delta.lora_weight() * delta.scaling
        return delta.canonical(orig.to(weight.dtype), base_layer)


@torch.no_grad()
def _z_from_input(delta: LoraDeltaLike, x: torch.Tensor, base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``W₀x + scaling · B A x`` (no bias): DoRA's ``z`` recomputed in backward (see :class:`_DoraRescale`)."""
    return accumulate(delta.base_no_bias(x, base_layer), delta.lora_forward(x), delta.scaling).to(dtype)

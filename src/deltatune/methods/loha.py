"""LoHa: a low-rank Hadamard product update ``ΔW = (α / r) · (W1a W1b) ⊙ (W2a W2b)``.

Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", §3:
the element-wise product of two rank-``r`` matrices can reach rank ``r²`` (Proposition 1) for the parameters of
two rank-``r`` LoRAs. For Conv1d/Conv2d with a kernel larger than 1, ``use_effective_conv2d`` rebuilds each factor
from a small core tensor and two mode matrices (Proposition 3) instead of flattening the kernel into the input dim.

Init (peft's): every factor Kaiming-uniform except ``hada_w2_b = 0``, so the second product and ``ΔW`` start at zero.

Layer types (as peft): ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (grouped convs included). Parameter names and
shapes follow peft so saved keys match: ``hada_w1_a`` ``(out, r)``, ``hada_w1_b`` ``(r, in·k)``, ``hada_w2_a``,
``hada_w2_b`` likewise; with the effective conv form ``hada_w{1,2}_a`` ``(r, out)``, ``hada_w{1,2}_b``
``(r, in)`` and cores ``hada_t1`` / ``hada_t2`` ``(r, r, k1, k2)`` (Conv1d: ``(r, r, k, 1)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PeftType
from ..registry import LayerMethod
from ._lycoris import LAYER_TYPES, LycorisConfig, LycorisDelta, build_delta, core_shape, layer_geometry, tucker

__all__ = ["LoHaConfig"]  # exported from deltatune


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (peft's field names and defaults); every field is described on
    :class:`~deltatune.methods._lycoris.LycorisConfig`."""

    peft_type: PeftType = field(default=PeftType.LOHA, init=False)


class _HadamardProduct(torch.autograd.Function):
    """``(W1a W1b) ⊙ (W2a W2b)`` that keeps only the four factors for backward and rebuilds each ``(out, in)``
    product there, instead of autograd holding both full-size products per layer for the whole forward."""

    @staticmethod
    def forward(ctx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)  # (out, r) @ (r, in) twice -> (out, in)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g1 = grad * (w2a @ w2b)  # d/d(W1a W1b): (out, in)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


class LoHaDelta(LycorisDelta):
    """LoHa on ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, config: LoHaConfig) -> None:
        super().__init__(r, alpha, config, rank_dropout_scale=True)  # peft's LoHa always rescales rank dropout
        out, in_, kernel, effective = layer_geometry(base_layer, config.use_effective_conv2d)
        self.hada_t1: nn.Parameter | None = None
        self.hada_t2: nn.Parameter | None = None
        if effective:
            self.hada_w1_a, self.hada_w2_a = (nn.Parameter(torch.empty(r, out)) for _ in range(2))
            self.hada_w1_b, self.hada_w2_b = (nn.Parameter(torch.empty(r, in_)) for _ in range(2))
            self.hada_t1, self.hada_t2 = (nn.Parameter(torch.empty(core_shape(r, kernel))) for _ in range(2))
        else:  # the kernel (if any) is flattened into the input dim: ΔW is (out, in·k) and reshapes to the base
            fan_in = in_ * math.prod(kernel)
            self.hada_w1_a, self.hada_w2_a = (nn.Parameter(torch.empty(out, r)) for _ in range(2))
            self.hada_w1_b, self.hada_w2_b = (nn.Parameter(torch.empty(r, fan_in)) for _ in range(2))

    def zero_at_init(self, init_weights: bool | str) -> str | None:
        return "hada_w2_b" if init_weights else None

    def raw_weight(self) -> torch.Tensor:
        if self.hada_t1 is None:
            return _HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        first = tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)  # (out, in, k1, k2)
        return first * tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)


def make_delta(config: LoHaConfig, base_layer: nn.Module, name: str) -> LoHaDelta:
    """Build and initialise the LoHa delta for ``base_layer`` (module ``name``), honouring rank/alpha patterns."""
    return build_delta(LoHaDelta, config, base_layer, name)


METHOD = LayerMethod(config_class=LoHaConfig, make_delta=make_delta, layer_types=LAYER_TYPES)

"""PEANuT: a weight-aware update — a small nonlinear network reads the frozen weight and writes its update.

Zhong et al., 2024, "PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers" (arXiv:2410.01870),
§3: instead of a free ``B A``, the update is a function of the base weight ``W ∈ R^{out×in}``, each input column
``W[:, j]`` mapped by an autoencoder-like network with residual connections:

    h₀ = σ(Wᵀ Aᵀ)                              (in, r),  A ∈ R^{r×out}
    hᵢ = σ(hᵢ₋₁ Eᵢᵀ)                            i = 1 … depth  (encoders Eᵢ ∈ R^{r×r})
    g₀ = h_depth;  gᵢ = σ(gᵢ₋₁ Dᵢᵀ) + h_{depth−i}   i = 1 … depth  (decoders Dᵢ ∈ R^{r×r})
    ΔW = scaling · (g_depth Bᵀ)ᵀ                (out, in),  B ∈ R^{out×r}

with ``σ`` the activation ``act_fn`` (a ``transformers`` ``ACT2FN`` name). ``depth = 0`` is ``ΔW = s·(σ(Wᵀ Aᵀ) Bᵀ)ᵀ``.
The forward adds ``x ΔWᵀ`` with ``ΔW`` rebuilt from the current weight at each call, as in peft. Merging uses the
weight from before any merge (``Delta.merges_from_original``), as peft does, so several merged adapters each read
``W₀`` and unmerging restores it exactly.

Init: ``A``, encoders and decoders Kaiming-uniform (``a = √5``), ``B = 0`` (the base model); ``init_weights=False``
draws ``B`` like ``A``, for tests. Saved keys, peft's: ``<module>.peanut_A.weight`` ``(r, out)``,
``<module>.peanut_B.weight`` ``(out, r)``, ``<module>.peanut_encoders.<i>.weight`` and
``<module>.peanut_decoders.<i>.weight`` ``(r, r)``. Layer type: ``nn.Linear``, as in peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_scale, check_size, place_delta

__all__ = ["PeanutConfig"]  # exported from deltatune


@dataclass
class PeanutConfig(LayerConfig):
    """Configuration of a PEANuT adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Width of the network's hidden layers.
        depth: Encoder / decoder layers between ``A`` and ``B`` (each side); 0: ``A`` then ``B``.
        act_fn: The activation, a ``transformers.activations.ACT2FN`` name (``"relu"``, ``"gelu"``, ...).
        scaling: Multiplier of the update.
        init_weights: ``True``: ``B = 0`` (the base model). ``False``: ``B`` random, for tests.
    """

    peft_type: PeftType = field(default=PeftType.PEANUT, init=False)
    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("depth", self.depth, allow_zero=True)
        if self.act_fn not in ACT2FN:
            raise ConfigError(f"act_fn must be one of transformers' ACT2FN names {sorted(ACT2FN)}, got "
                              f"{self.act_fn!r}")
        check_scale("scaling", self.scaling)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (B = 0) or False (random), got {self.init_weights!r}")


def _square_stack(r: int, depth: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(depth))


class PeanutDelta(Delta):
    """``Δy = x ΔWᵀ`` with ``ΔW`` the network's reading of the base weight (see the module docstring)."""

    merges_from_original: ClassVar[bool] = True  # ΔW reads W: every merge uses the weight from before any merge

    def __init__(self, out_features: int, r: int, depth: int, act_fn: str, scaling: float) -> None:
        super().__init__()
        self.peanut_A = nn.Linear(out_features, r, bias=False)
        self.peanut_encoders = _square_stack(r, depth)
        self.peanut_decoders = _square_stack(r, depth)
        self.peanut_B = nn.Linear(r, out_features, bias=False)
        self.act_fn, self.scaling = act_fn, scaling
        self.act = ACT2FN[act_fn]

    def update(self, weight: torch.Tensor) -> torch.Tensor:
        """``ΔW`` ``(out, in)`` for base weight ``weight``, in the adapter's dtype."""
        h = self.act(self.peanut_A(weight.T.to(self.peanut_A.weight.dtype)))  # (in, r)
        skips = []
        for encoder in self.peanut_encoders:
            skips.append(h)
            h = self.act(encoder(h))
        for decoder, skip in zip(self.peanut_decoders, reversed(skips)):
            h = self.act(decoder(h)) + skip
        return (self.peanut_B(h) * self.scaling).T  # (out, in)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        update = self.update(base_layer.weight)
        return accumulate(base_out, F.linear(x.to(update.dtype), update), 1.0)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.update(base_layer.weight).to(base_layer.weight.dtype)

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module,
                      original: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``W + ΔW(W₀)``: the update from the weight before any merge (``original``)."""
        weight = params["weight"]
        return {"weight": weight + self.update((original or params)["weight"]).to(weight.dtype)}

    def extra_repr(self) -> str:
        return f"r={self.peanut_A.out_features}, depth={len(self.peanut_encoders)}, act={self.act_fn}"


def make_delta(config: PeanutConfig, base_layer: nn.Module, name: str) -> PeanutDelta:
    """Build and initialise the PEANuT delta of ``base_layer`` (module ``name``); see the module docstring's init."""
    delta = PeanutDelta(base_layer.out_features, config.r, config.depth, config.act_fn, config.scaling)

    def init(delta: PeanutDelta) -> None:
        for linear in (delta.peanut_A, *delta.peanut_encoders, *delta.peanut_decoders):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(delta.peanut_B.weight)
        else:
            nn.init.kaiming_uniform_(delta.peanut_B.weight, a=math.sqrt(5))

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=PeanutConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
)

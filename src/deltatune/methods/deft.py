"""DeFT: replace a learned low-rank subspace of the weight's output space with injected content.

DEFT (Decompositional Efficient Fine-Tuning), as peft 0.21.2 implements it; PaRa (Chen et al., 2024, "PaRa:
Personalizing Text-to-Image Diffusion via Parameter Rank Reduction", arXiv:2406.05641, §3) is its pure-removal
special case. With a learned direction ``P ∈ R^{out×r}`` and injection ``R ∈ R^{r×in}``, the adapted weight is

    W' = (I − P_proj) W + s · Q_P R,    P_proj = Q_P rightᵀ

where ``decomposition_method`` gives ``(Q_P, right)``: ``"relu"``: ``(P, relu(P))`` (a non-orthogonal projection),
``"qr"``: ``(Q, Q)`` of the reduced QR of ``P`` (orthogonal). ``s = alpha / r`` when ``alpha`` is set (peft: any
falsy ``alpha``, 0 included, means ``s = 1``). The update factors through rank ``r``:

    ΔW = Q_P (s R − M),    M = rightᵀ W ∈ R^{r×in}

so the forward adds ``Q_P (s R dropout(x) − M x)`` with no ``out × out`` or ``out × in`` product (dropout acts on the
injection only); everything is computed in float32, as peft does, because QR is unreliable in half precision.
``para=True`` (PaRa) has no ``R``: ``ΔW = −Q_P M``, which removes a subspace and is not the identity at init.

Init: ``P ~ N(0, 0.02²)``; ``init_weights=True`` sets ``R = M / s`` so the adapter starts as the base model,
``False`` draws ``R ~ N(0, (0.02 · init_scale)²)``. The rank is capped at ``out`` (QR gives at most ``out``
columns), as in peft.

Merging reads ``W`` too (``M``), so several merged adapters each use the weight from before any merge
(``Delta.merges_from_original``), as peft computes them, and unmerging restores it exactly.

Saved keys, peft's: ``<module>.deft_P`` ``(out, r)`` and ``<module>.deft_R`` ``(r, in)`` (none with ``para``).
Layer types: ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``), as in peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from .common import (check_dropout, check_no_layers_with_regex, check_scale, check_size, layer_features, place_delta,
                     record_fan_in_fan_out)

__all__ = ["DeftConfig"]  # exported from deltatune

_INIT_STD = 0.02  # peft's std for P and for a random R (times init_scale)


@dataclass
class DeftConfig(LayerConfig):
    """Configuration of a DeFT adapter (peft's field names). Shared targeting fields: see ``LayerConfig`` (peft
    refuses ``layers_to_transform`` / ``layers_pattern`` with a regex ``target_modules``, and so does this).

    Attributes:
        r: Rank of the replaced subspace (capped at each layer's ``out``).
        decomposition_method: ``"relu"`` (``P relu(P)ᵀ``) or ``"qr"`` (an orthogonal projection).
        init_scale: Multiplies the std of a random ``R`` (``init_weights=False`` only).
        alpha: The injection is scaled by ``alpha / r``; ``None`` (or 0, as peft reads it): no scaling.
        para: PaRa: pure subspace removal (no ``R``); not the identity at init.
        fan_in_fan_out: Recorded as peft does (``True`` for GPT-2's ``Conv1D``); the layout is read from the layer.
        deft_dropout: Dropout on the injection's input during training.
        init_weights: ``True``: ``R`` chosen so the adapter starts as the base model. ``False``: random ``R``.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"deft_only"`` (biases of adapted layers).
    """

    peft_type: PeftType = field(default=PeftType.DEFT, init=False)
    r: int = 8
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: float | None = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        if self.decomposition_method not in _PROJECTIONS:
            raise ConfigError(f"decomposition_method must be 'relu' or 'qr', got {self.decomposition_method!r}")
        check_scale("init_scale", self.init_scale)
        if self.alpha is not None:
            check_scale("alpha", self.alpha)
        check_dropout("deft_dropout", self.deft_dropout)
        for name in ("para", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in ("none", "all", "deft_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'deft_only', got {self.bias!r}")
        check_no_layers_with_regex(self)


def _relu(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return p, torch.relu(p)


def _qr(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.linalg.qr(p).Q  # (out, r), reduced
    return q, q


# decomposition_method -> P (out, r) -> (Q_P, right), with the projector P_proj = Q_P rightᵀ
_PROJECTIONS = {"relu": _relu, "qr": _qr}


class DeftDelta(Delta):
    """``Δy = Q_P (s R dropout(x) − rightᵀ W x)`` in float32 (``R`` term absent for PaRa)."""

    merges_from_original: ClassVar[bool] = True  # ΔW reads W: every merge uses the weight from before any merge

    def __init__(self, in_features: int, out_features: int, r: int, method: str, para: bool, scaling: float,
                 dropout: float, transposed: bool) -> None:
        super().__init__()
        self.deft_P = nn.Parameter(torch.zeros(out_features, r))
        self.deft_R = None if para else nn.Parameter(torch.zeros(r, in_features))
        self.method, self.scaling, self.transposed = method, scaling, transposed
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_P, right)``, both ``(out, r)`` float32."""
        return _PROJECTIONS[self.method](self.deft_P.float())

    def removed(self, right: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``M = rightᵀ W``: ``(r, in)`` float32, ``weight`` in its stored layout."""
        w = weight.float()
        return right.T @ (w.T if self.transposed else w)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        q, right = self.projection()
        x32 = x.float()
        hidden = -F.linear(x32, self.removed(right, base_layer.weight))  # (..., r)
        if self.deft_R is not None:
            hidden = hidden + F.linear(self.dropout(x32), self.deft_R.float() * self.scaling)
        return accumulate(base_out, F.linear(hidden, q), 1.0)  # (..., out)

    def _update(self, weight: torch.Tensor) -> torch.Tensor:
        """``ΔW`` for base weight ``weight``, in its layout and dtype."""
        q, right = self.projection()
        m = self.removed(right, weight)
        inner = -m if self.deft_R is None else self.deft_R.float() * self.scaling - m  # (r, in)
        update = q @ inner  # (out, in)
        return (update.T if self.transposed else update).to(weight.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self._update(base_layer.weight)

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module,
                      original: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``W + ΔW(W₀)``: the update from the weight before any merge (``original``)."""
        return {"weight": params["weight"] + self._update((original or params)["weight"])}

    def extra_repr(self) -> str:
        out, r = self.deft_P.shape
        return f"out={out}, r={r}, method={self.method}, para={self.deft_R is None}"


def make_delta(config: DeftConfig, base_layer: nn.Module, name: str) -> DeftDelta:
    """Build and initialise the DeFT delta of ``base_layer`` (module ``name``); see the module docstring's init."""
    in_features, out_features = layer_features(base_layer)
    r = min(config.r, out_features)
    scaling = config.alpha / r if config.alpha else 1.0
    delta = DeftDelta(in_features, out_features, r, config.decomposition_method, config.para, scaling,
                      config.deft_dropout, isinstance(base_layer, Conv1D))
    weight = base_layer.weight

    def init(delta: DeftDelta) -> None:
        nn.init.normal_(delta.deft_P, mean=0.0, std=_INIT_STD)
        if delta.deft_R is None:
            return
        if config.init_weights:  # R = M / s: s R − M = 0, the base model
            delta.deft_R.copy_(delta.removed(delta.projection()[1], weight.detach()) / scaling)
        else:
            nn.init.normal_(delta.deft_R, mean=0.0, std=_INIT_STD * config.init_scale)

    return place_delta(delta, weight, init)


METHOD = LayerMethod(
    config_class=DeftConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    resolve_config=record_fan_in_fan_out,
)

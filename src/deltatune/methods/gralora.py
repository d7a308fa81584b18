"""GraLoRA: LoRA split into a ``k × k`` grid of small low-rank blocks, each input block exchanging with every output
block.

Jung et al., 2025, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning" (arXiv:2505.20355):
the input is cut into ``k`` blocks ``x_n`` (``in/k`` features) and the output into ``k`` blocks. Each input block has
its own ``A_n`` (``in/k × r``), whose ``r`` outputs are cut into ``k`` slices of ``s = r/k``; output block ``j``
reads slice ``j`` of every input block through its own ``B_j`` (``r × out/k``)::

    y_j = scaling · Σ_n (x_n A_n[:, j·s:(j+1)·s]) B_j[n·s:(n+1)·s, :]

so the update is ``k²`` independent rank-``s`` blocks, ``ΔWᵀ[n, j] = A_n[:, j·s…] B_j[n·s…]``, for the parameters of a
rank-``r`` LoRA, and each block's gradient depends only on its own input block (the paper's remedy for LoRA's gradient
entanglement). ``hybrid_r > 0`` adds a plain LoRA of that rank beside it (``gralora_A_general`` / ``_B_general``);
``scaling = alpha / (r + hybrid_r)``.

Saved keys, peft's: ``<module>.gralora_A`` ``(k, in/k, r)``, ``gralora_B`` ``(k, r, out/k)`` and with ``hybrid_r``
``gralora_A_general.weight`` ``(hybrid_r, in)`` / ``gralora_B_general.weight`` ``(out, hybrid_r)``. Init as in peft:
every ``A`` Kaiming-uniform (``a = √5``), every ``B`` zero (the base model) or, with ``init_weights=False``,
Kaiming-uniform too.

Layer types: ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``), as in peft; ``k`` must divide
both sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from .common import (
    check_divides, check_dropout, check_scale, check_size, layer_features, place_delta, record_fan_in_fan_out,
)

__all__ = ["GraloraConfig"]  # exported from deltatune


@dataclass
class GraloraConfig(LayerConfig):
    """Configuration of a GraLoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (``exclude_modules`` excepted: peft's ``GraloraConfig`` has no such field).

    Attributes:
        r: Total rank of the grid (each of the ``k²`` blocks has rank ``r / k``); a multiple of ``gralora_k``.
        hybrid_r: Rank of the plain LoRA added beside the grid (0: none).
        alpha: The update is scaled by ``alpha / (r + hybrid_r)``.
        gralora_dropout: Dropout on the adapter's input during training.
        gralora_k: ``k``, the number of blocks along each side; must divide every target's input and output size.
        fan_in_fan_out: Weight stored ``(in, out)``. Set from the target type (``Conv1D``: ``True``, ``Linear``:
            ``False``), as peft does; deltatune reads the layout from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"gralora_only"`` (biases of adapted
            layers).
        init_weights: ``True``: every ``B`` zero (the base model). ``False``: Kaiming-uniform ``B`` (a non-zero
            start, for tests).
    """

    peft_type: PeftType = field(default=PeftType.GRALORA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 32
    hybrid_r: int = 0
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("hybrid_r", self.hybrid_r, allow_zero=True)
        check_size("gralora_k", self.gralora_k)
        if self.r % self.gralora_k:
            raise ConfigError(f"r={self.r} must be a multiple of gralora_k={self.gralora_k} (each of the k x k blocks "
                              f"has rank r / k)")
        check_scale("alpha", self.alpha)
        check_dropout("gralora_dropout", self.gralora_dropout)
        if self.bias not in ("none", "all", "gralora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'gralora_only', got {self.bias!r}")


class GraloraDelta(Delta):
    """The ``k × k`` grid of rank-``r/k`` blocks (plus the optional hybrid LoRA) on a Linear or Conv1D."""

    def __init__(self, base_layer: nn.Module, config: GraloraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        k, r = config.gralora_k, config.r
        self.gralora_A = nn.Parameter(torch.zeros(k, self.in_features // k, r))
        self.gralora_B = nn.Parameter(torch.zeros(k, r, self.out_features // k))
        if config.hybrid_r:
            self.gralora_A_general = nn.Linear(self.in_features, config.hybrid_r, bias=False)
            self.gralora_B_general = nn.Linear(config.hybrid_r, self.out_features, bias=False)
        else:
            self.gralora_A_general = self.gralora_B_general = None
        self.scaling = config.alpha / (r + config.hybrid_r)
        self.dropout = nn.Dropout(config.gralora_dropout) if config.gralora_dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled ``(..., out)`` update for input ``x`` ``(..., in)``."""
        a, b = self.gralora_A, self.gralora_B
        k = a.shape[0]
        x = self.dropout(x.to(a.dtype))
        hidden = torch.einsum("...ni,nir->...nr", x.unflatten(-1, (k, -1)), a)  # (..., n, r): every input block
        hidden = hidden.unflatten(-1, (k, -1)).transpose(-3, -2).flatten(-2)  # (..., j, n·s): slice j of each n
        out = torch.einsum("...jr,jro->...jo", hidden, b).flatten(-2)  # (..., out)
        if self.gralora_A_general is not None:
            out = out + self.gralora_B_general(self.gralora_A_general(x))
        return out

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return accumulate(base_out, self.update(x), self.scaling)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        a, b = self.gralora_A, self.gralora_B
        k = a.shape[0]
        a5 = a.unflatten(-1, (k, -1))  # (n, in/k, j, s)
        b5 = b.unflatten(1, (k, -1))  # (j, n, s, out/k)
        weight = torch.einsum("nijs,jnso->nijo", a5, b5).reshape(self.in_features, self.out_features).T  # (out, in)
        if self.gralora_A_general is not None:
            weight = weight + self.gralora_B_general.weight @ self.gralora_A_general.weight
        weight = weight * self.scaling
        return (weight.T if self.transposed else weight).to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.gralora_A.shape[0]}, scaling={self.scaling:g}"


def check_target(config: GraloraConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose sizes ``gralora_k`` does not divide.

    Raises:
        TargetError: ``gralora_k`` does not divide the layer's input or output size.
    """
    check_divides(name, f"gralora_k={config.gralora_k}", config.gralora_k, base_layer,
                  "the weight is cut into a k x k grid")


def _kaiming(t: torch.Tensor, fan_in: int) -> None:
    """Kaiming-uniform with ``a = √5`` (torch's Linear default): ``U(±1/√fan_in)``."""
    bound = 1 / math.sqrt(fan_in)
    t.uniform_(-bound, bound)


def make_delta(config: GraloraConfig, base_layer: nn.Module, name: str) -> GraloraDelta:
    """Build and initialise the GraLoRA delta of ``base_layer`` (module ``name``)."""
    delta = GraloraDelta(base_layer, config)

    def init(delta: GraloraDelta) -> None:
        _kaiming(delta.gralora_A, delta.in_features // config.gralora_k)
        if not config.init_weights:
            _kaiming(delta.gralora_B, config.r)
        if delta.gralora_A_general is not None and config.init_weights:  # A: nn.Linear's own Kaiming init
            delta.gralora_B_general.weight.zero_()

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=GraloraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    check_target=check_target,
    resolve_config=record_fan_in_fan_out,
)

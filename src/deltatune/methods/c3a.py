"""C3A: a block-circulant weight update, applied through the FFT.

Chen et al., 2025, "Parameter-Efficient Fine-Tuning via Circular Convolution" (arXiv:2407.19342), §3: the update
``ΔW ∈ R^{out×in}`` is a grid of ``b × b`` circulant blocks, each defined by one length-``b`` kernel, so a layer
trains ``out · in / b`` numbers and its update is applied with FFTs, never formed. As peft computes it, block
``(i, j)`` with kernel ``w_ij`` is the circular cross-correlation

    (ΔW x)_{i·b+t} = (1/in) Σ_j Σ_l w_ij[l] · x_{j·b + (t + l) mod b},
    i.e.  ΔW[i·b+t, j·b+s] = w_ij[(s − t) mod b] / in,

computed per block row as ``irfft(Σ_j conj(rfft(w_ij)) ⊙ rfft(x_j))`` (the correlation theorem) in float32: the
FFT needs it (half precision only on some GPUs, bfloat16 not at all), as in peft.

``c3a_kernel`` is ``(out/b, in/b, b)``, saved as ``<module>.c3a_kernel`` (peft's key); ``b`` (``block_size``,
per module through ``block_size_pattern``) must divide both ``in`` and ``out``. Init (``init_weights``):
``"xavier_uniform"`` (peft's default, also for ``False``): ``U(±√3 · √(2/(in+out)))``; ``"kaiming_uniform"``:
``U(±√(1/in))``; ``"gaussian"``: ``N(0, 1)``; ``True``: zero (the base model). The default therefore changes the
model at init, as in peft.

Layer type: ``nn.Linear``, as in peft. With several adapters active on one layer each reads the layer's input (as
when merged); peft 0.21.2 feeds the second adapter the first one's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from ..targeting import DEFAULT_MLP_OUT_TARGETS, pattern_value
from .common import check_divides, check_size, check_size_pattern, place_delta

__all__ = ["C3AConfig"]  # exported from deltatune

_INITS = ("xavier_uniform", "kaiming_uniform", "gaussian")


@dataclass
class C3AConfig(LayerConfig):
    """Configuration of a C3A adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (``exclude_modules`` excepted: peft's ``C3AConfig`` has no such field).

    Attributes:
        block_size: ``b``, the size of each circulant block; must divide every target's ``in`` and ``out`` (the
            greatest common divisor of all of them is the safe choice). Larger means fewer parameters.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"c3a_only"`` (biases of adapted layers).
        block_size_pattern: ``{module-name pattern: b}`` overriding ``block_size`` for matching modules (a regex on
            the name's dotted suffix, as peft's ``rank_pattern``).
        init_weights: ``"xavier_uniform"`` (default; ``False`` means the same), ``"kaiming_uniform"``,
            ``"gaussian"``, or ``True`` for zero (the base model).
    """

    peft_type: PeftType = field(default=PeftType.C3A, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    block_size: int = 256
    bias: str = "none"
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool | str = "xavier_uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("block_size", self.block_size)
        check_size_pattern("block_size_pattern", self.block_size_pattern)
        if self.bias not in ("none", "all", "c3a_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'c3a_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool) and self.init_weights not in _INITS:
            raise ConfigError(
                f"init_weights must be True (zero), False or one of {list(_INITS)}, got {self.init_weights!r}"
            )


def _block_size(config: C3AConfig, name: str) -> int:
    return pattern_value(config.block_size_pattern, name, config.block_size)


class C3ADelta(Delta):
    """``Δy = ΔW x`` with the block-circulant ``ΔW`` of ``c3a_kernel`` ``(out/b, in/b, b)``, by FFT."""

    def __init__(self, out_blocks: int, in_blocks: int, block_size: int) -> None:
        super().__init__()
        self.c3a_kernel = nn.Parameter(torch.zeros(out_blocks, in_blocks, block_size))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` over the last dim of ``x`` ``(..., in)``, in float32: ``(..., out)``."""
        kernel = self.c3a_kernel.float()
        in_features = kernel.shape[1] * kernel.shape[2]
        spectrum = torch.fft.rfft(x.float().unflatten(-1, kernel.shape[1:]))  # (..., in/b, b/2+1)
        mixed = torch.einsum("...jk,ijk->...ik", spectrum, torch.fft.rfft(kernel).conj())  # (..., out/b, b/2+1)
        return torch.fft.irfft(mixed, n=kernel.shape[2]).flatten(-2) / in_features

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return accumulate(base_out, self.update(x).to(base_out.dtype), 1.0)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        kernel = self.c3a_kernel.float()
        out_blocks, in_blocks, b = kernel.shape
        shift = (torch.arange(b, device=kernel.device)[None, :] - torch.arange(b, device=kernel.device)[:, None]) % b
        blocks = kernel[..., shift]  # (out/b, in/b, b, b): block[t, s] = w[(s − t) mod b]
        weight = blocks.permute(0, 2, 1, 3).reshape(out_blocks * b, in_blocks * b) / (in_blocks * b)
        return weight.to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"c3a_kernel={tuple(self.c3a_kernel.shape)}"


def check_target(config: C3AConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose dimensions the block size does not divide.

    Raises:
        TargetError: ``block_size`` (after ``block_size_pattern``) does not divide ``in_features`` or
            ``out_features``.
    """
    b = _block_size(config, name)
    check_divides(name, f"block_size={b}", b, base_layer, "the weight is cut into b x b circulant blocks; "
                  "block_size_pattern can set one for this module")


def make_delta(config: C3AConfig, base_layer: nn.Module, name: str) -> C3ADelta:
    """Build and initialise the C3A delta of ``base_layer`` (module ``name``); see the module docstring's init."""
    b = _block_size(config, name)
    in_features, out_features = base_layer.in_features, base_layer.out_features
    delta = C3ADelta(out_features // b, in_features // b, b)

    def randomize(delta: C3ADelta) -> None:
        if config.init_weights == "gaussian":
            delta.c3a_kernel.normal_()
        elif config.init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / in_features)
            delta.c3a_kernel.uniform_(-bound, bound)
        else:  # "xavier_uniform" or False
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
            delta.c3a_kernel.uniform_(-bound, bound)

    return place_delta(delta, base_layer.weight, None if config.init_weights is True else randomize)


METHOD = LayerMethod(
    config_class=C3AConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
    default_targets=DEFAULT_MLP_OUT_TARGETS,
)

"""What LoHa and LoKr share (the LyCORIS family): config fields, scaling, rank / module dropout, conv geometry.

Both methods build a full-size update ``ΔW`` from small factors and add ``ΔW x`` with the base layer's own op
(``F.linear`` or the base conv with its stride, padding, dilation and groups), so merging is the default
``W + ΔW``. A method supplies only its factors and how they combine (:meth:`LycorisDelta.raw_weight`).

Training-time regularisers (from the LyCORIS library; Yeh et al., 2024, "Navigating Text-To-Image
Customization"), with peft's semantics so that seeded runs draw the same random numbers in both libraries:

* module dropout: with probability ``module_dropout`` a delta is skipped for the whole forward;
* rank dropout: each output row of ``ΔW`` is zeroed with probability ``rank_dropout`` (optionally rescaled by the
  kept fraction). Both act only in training mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..targeting import pattern_value
from .common import adapter_dtype, check_dropout, check_patterns, check_scale

#: The base layer types peft supports for LoHa and LoKr (not transformers' ``Conv1D``, not ``Conv3d``/embeddings).
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LycorisConfig(LayerConfig):
    """Fields LoHa and LoKr share (peft's names and defaults). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Rank of each low-rank factor.
        alpha: Scale numerator: the update is multiplied by ``alpha / r``.
        rank_dropout: Training only: probability of zeroing each output row of ``ΔW``.
        module_dropout: Training only: probability of skipping the whole delta in a forward.
        use_effective_conv2d: For Conv1d/Conv2d with a kernel larger than 1, factor the kernel with a small core
            tensor (FedPara, Hyeon-Woo et al., 2022, Proposition 3) instead of flattening it into the input dim.
        init_weights: ``True``: one factor is zero so a fresh adapter is the identity; ``False``: all random (a
            non-zero delta, for tests).
        rank_pattern: ``{module-name pattern: r}`` overriding ``r`` for matching modules (regex on the name suffix).
        alpha_pattern: ``{module-name pattern: alpha}`` overriding ``alpha`` likewise.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    _init_choices: ClassVar[tuple[Any, ...]] = (True, False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, (bool, str)) or self.init_weights not in self._init_choices:
            raise ConfigError(f"init_weights must be one of {list(self._init_choices)}, got {self.init_weights!r}")
        check_patterns(self.r, self.rank_pattern, self.alpha_pattern)
        check_scale("alpha", self.alpha)
        check_dropout("rank_dropout", self.rank_dropout)
        check_dropout("module_dropout", self.module_dropout, allow_one=True)


def layer_geometry(base_layer: nn.Module, use_effective_conv2d: bool) -> tuple[int, int, tuple[int, ...], bool]:
    """``(out, in, kernel, effective)`` of ``base_layer``: ``in`` per group for convs, ``kernel`` empty for Linear,
    ``effective`` whether the kernel gets its own core tensor (only for kernels larger than 1, as in peft)."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.out_features, base_layer.in_features, (), False
    kernel = tuple(base_layer.kernel_size)
    effective = use_effective_conv2d and any(k != 1 for k in kernel)
    return base_layer.out_channels, base_layer.in_channels // base_layer.groups, kernel, effective


def core_shape(r: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a Tucker core for ``kernel``: ``(r, r, k1, k2)``; a Conv1d kernel gets a trailing 1 (peft's
    layout), so its rebuilt factor is ``(out, in, k, 1)`` and reshapes to the base ``(out, in, k)``."""
    return (r, r, *kernel) if len(kernel) == 2 else (r, r, *kernel, 1)


def tucker(core: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """The conv factor rebuilt from a core and two mode matrices (FedPara, Proposition 3):
    ``core`` ``(r, r, k1, k2)``, ``w_out`` ``(r, out)``, ``w_in`` ``(r, in)`` -> ``(out, in, k1, k2)``."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, w_out, w_in)


class LycorisDelta(Delta):
    """A delta whose update is a full weight ``scaling · ΔW`` applied with the base layer's own op.

    Subclasses define :meth:`raw_weight` (the unscaled ``ΔW`` with as many elements as the base weight, in any shape
    that reshapes to it) and name the factor that is zero at init (:meth:`zero_at_init`).
    """

    def __init__(self, r: int, alpha: float, config: LycorisConfig, rank_dropout_scale: bool) -> None:
        super().__init__()
        self.r = r
        self.scaling = alpha / r
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.rank_dropout_scale = rank_dropout_scale

    def raw_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def zero_at_init(self, init_weights: bool | str) -> str | None:
        """Name of the parameter set to zero for ``init_weights`` (the others are Kaiming-uniform)."""
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return (self.raw_weight() * self.scaling).reshape(base_layer.weight.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        # The draw happens in every training forward, even for p = 0, as in peft: seeded runs stay in step.
        if self.training and not bool(torch.rand(1) > self.module_dropout):
            return base_out
        weight = self.delta_weight(base_layer)  # base weight layout: (out, in) or (out, in / groups, *kernel)
        if self.training and self.rank_dropout > 0:
            weight = weight * self._rank_mask(weight)
        x = x.to(weight.dtype)
        update = F.linear(x, weight) if isinstance(base_layer, nn.Linear) else base_layer._conv_forward(x, weight, None)
        return accumulate(base_out, update, 1.0)

    def _rank_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """``(out, 1, ...)``: 1 for kept output rows, 0 for dropped; divided by the kept fraction with
        ``rank_dropout_scale``. Drawn on the CPU as peft draws it. A draw that drops every row gives a zero update
        (peft divides by zero there)."""
        keep = (torch.rand(weight.shape[0]) > self.rank_dropout).to(weight.dtype)  # (out,)
        if self.rank_dropout_scale:
            keep = keep / keep.mean().clamp_min(1 / keep.numel())
        return keep.view(-1, *[1] * (weight.ndim - 1)).to(weight.device)


def build_delta(cls: type[LycorisDelta], config: LycorisConfig, base_layer: nn.Module, name: str) -> LycorisDelta:
    """Make ``cls``'s delta for module ``name`` (rank / alpha patterns applied), on the base weight's device, in
    float32 next to a half-precision base (as LoRA keeps it), initialised per ``config.init_weights``."""
    r = pattern_value(config.rank_pattern, name, config.r)
    alpha = pattern_value(config.alpha_pattern, name, config.alpha)
    delta = cls(base_layer, r, alpha, config)
    weight = base_layer.weight
    dtype = adapter_dtype(weight.dtype)
    delta.to(device=weight.device, dtype=dtype)
    if weight.device.type != "meta":
        zero = delta.zero_at_init(config.init_weights)
        with torch.no_grad():
            for param_name, param in delta.named_parameters():
                if param_name == zero:
                    param.zero_()
                else:
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
    return delta

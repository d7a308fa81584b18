"""LoKr: a Kronecker product update ``ΔW = (α / r) · W1 ⊗ W2``.

Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation" (LoKr;
after KronA, Edalati et al., 2022): each weight dimension is split into two factors, ``out = a·b`` and
``in = c·d`` (:func:`factorization`), and ``ΔW = W1 ⊗ W2`` with a small ``W1`` ``(a, c)`` and a larger ``W2``
``(b, d)``. The Kronecker product keeps the rank of ``W1`` times the rank of ``W2`` for very few parameters.

Which factors are themselves low-rank (peft's rule, kept so files interchange):

* ``W2`` is stored full (``lokr_w2``) when ``r ≥ max(b, d) / 2``, else as ``lokr_w2_a @ lokr_w2_b`` (rank ``r``), or,
  for a conv kernel larger than 1 with ``use_effective_conv2d``, as a core ``lokr_t2`` plus mode matrices;
* ``W1`` is stored full (``lokr_w1``) unless ``decompose_both`` and ``r < max(a, c) / 2``
  (then ``lokr_w1_a @ lokr_w1_b``).

For convs the kernel lives in ``W2`` (``(b, d, k…)``, or flattened into ``d·k`` when low-rank). Init (peft's):
``True`` zeros ``W1`` (``lokr_w1`` or ``lokr_w1_a``); ``"lycoris"`` zeros ``W2`` (``lokr_w2`` or ``lokr_w2_b``),
as the LyCORIS library does; ``False`` leaves all random. Layer types: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftType
from ..errors import ConfigError
from ..registry import LayerMethod
from ._lycoris import LAYER_TYPES, LycorisConfig, LycorisDelta, build_delta, core_shape, layer_geometry, tucker

__all__ = ["LoKrConfig"]  # exported from deltatune


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (peft's field names and defaults). Shared fields: see
    :class:`~deltatune.methods._lycoris.LycorisConfig`.

    Attributes:
        decompose_both: Also store ``W1`` as a rank-``r`` product when ``r`` is small against its dims.
        decompose_factor: Split each dimension as ``(factor, dim / factor)`` when ``factor`` divides it, else
            near its square root with the smaller part at most ``factor``; ``-1``: near the square root.
        rank_dropout_scale: Divide the rank-dropout mask by the fraction of rows it keeps.
        init_weights: ``True`` (``W1 = 0``), ``"lycoris"`` (``W2 = 0``) or ``False`` (all random).
    """

    peft_type: PeftType = field(default=PeftType.LOKR, init=False)
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    _init_choices: ClassVar[tuple[Any, ...]] = (True, False, "lycoris")

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = self.decompose_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor > 0):
            raise ConfigError(f"decompose_factor must be -1 (split near the square root) or a positive integer, "
                              f"got {factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m · n = dimension`` (peft's rule, which fixes saved shapes).

    A ``factor`` that divides ``dimension`` gives ``(factor, dimension / factor)`` as is. Otherwise ``m`` walks up
    the divisors of ``dimension`` while ``m < n`` and ``m ≤ factor`` (no bound for ``-1``), and the pair is returned
    smaller first: ``128 -> (8, 16)``, ``256 -> (16, 16)``, a prime ``p -> (1, p)``, ``(128, factor=4) -> (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    divisor = 2
    while m < n:
        while dimension % divisor:
            divisor += 1
        if divisor > limit:
            break
        m, n = divisor, dimension // divisor
        divisor += 1
    return min(m, n), max(m, n)


class LoKrDelta(LycorisDelta):
    """LoKr on ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, config: LoKrConfig) -> None:
        super().__init__(r, alpha, config, rank_dropout_scale=config.rank_dropout_scale)
        out, in_, kernel, effective = layer_geometry(base_layer, config.use_effective_conv2d)
        a, b = factorization(out, config.decompose_factor)
        c, d = factorization(in_, config.decompose_factor)
        self.lokr_w1 = self.lokr_w1_a = self.lokr_w1_b = None
        self.lokr_w2 = self.lokr_w2_a = self.lokr_w2_b = self.lokr_t2 = None
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = nn.Parameter(torch.empty(a, r)), nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        if r >= max(b, d) / 2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif effective:
            self.lokr_t2 = nn.Parameter(torch.empty(core_shape(r, kernel)))
            self.lokr_w2_a, self.lokr_w2_b = nn.Parameter(torch.empty(r, b)), nn.Parameter(torch.empty(r, d))
        else:  # the kernel (if any) is flattened into W2's input dim
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))

    def zero_at_init(self, init_weights: bool | str) -> str | None:
        if init_weights == "lycoris":
            return "lokr_w2" if self.lokr_w2 is not None else "lokr_w2_b"
        if init_weights:
            return "lokr_w1" if self.lokr_w1 is not None else "lokr_w1_a"
        return None

    def raw_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b  # (a, c)
        if self.lokr_w2 is not None:
            w2 = self.lokr_w2  # (b, d, *kernel)
        elif self.lokr_t2 is not None:
            w2 = tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)  # (b, d, k1, k2)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b  # (b, d·k)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]  # (a, c, 1, 1): the kernel comes from W2 alone
        # A full Conv1d W2 is 3-D while W1 stays 2-D: torch.kron then prepends W1's missing dim, a different
        # element order than the 4-D case; peft computes it this way, so files saved by either library rely on it.
        # kron views its operands: W2 needs standard strides, also on its size-1 dims (an einsum can leave odd
        # ones there, which .contiguous() accepts as they are); flatten + view gives them without a copy.
        return torch.kron(w1, w2.flatten().view(w2.shape))  # reshaped to the base weight by delta_weight


def make_delta(config: LoKrConfig, base_layer: nn.Module, name: str) -> LoKrDelta:
    """Build and initialise the LoKr delta for ``base_layer`` (module ``name``), honouring rank/alpha patterns."""
    return build_delta(LoKrDelta, config, base_layer, name)


METHOD = LayerMethod(config_class=LoKrConfig, make_delta=make_delta, layer_types=LAYER_TYPES)

"""WaveFT: learn a few coefficients of the weight update's 2-D wavelet transform and recover the update by the inverse.

Bilican et al., 2025, "Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets" (arXiv:2505.12532),
§3: ``ΔW = α · IDWT₂(C)`` where ``C`` holds the one-level wavelet coefficients of an ``(out, in)`` matrix, zero except
at ``n`` entries, whose values are the only trainable parameters; the wavelet's locality (unlike FourierFT's global
basis) lets a few coefficients make local, multi-scale changes. With ``use_idwt=False`` the sparse matrix itself is
the update (``ΔW = α · C``).

What is stored and computed follows peft 0.21 so adapters load across libraries to equal outputs:

* ``waveft_spectrum`` is ``(n,)``, the coefficients' values; their positions are not saved but regenerated from
  ``random_loc_seed`` exactly as FourierFT draws them (:func:`~deltatune.methods.fourierft.spectral_positions`).
* The coefficient matrix is padded to ``(H, W)`` = ``(out + L - 2, in + L - 2)`` rounded up to even sizes (``L``: the
  filter length; the inverse transform is ``L - 2`` shorter than twice its input), the positions shifted by half the
  padding; its quadrants are the bands ``cA`` (top left), ``cH`` (top right), ``cV`` (bottom left), ``cD`` (bottom
  right), and the inverse transform (:func:`~deltatune.methods._wavelets.inverse_dwt2`) is cropped to ``(out, in)``
  from its top-left (centred, the odd sample at the end). ``ΔW`` is computed in the spectrum's dtype; a ``Conv1D``
  (weight stored ``(in, out)``) merges ``ΔWᵀ``.
* init: zero with ``init_weights=True`` (peft's default: the base model), else ``N(0, 0.01²)``.

Wavelet families: Daubechies ``db1``–``db10``, symlets ``sym2``–``sym10`` and coiflets ``coif1``–``coif3``, computed
from their definitions (``methods/_wavelets.py``): every filter in peft 0.21's tables except ``coif4`` / ``coif5``,
whose tables there are not orthonormal filters (no definition reproduces them), which are refused, as are the names
peft's config accepts but cannot build (``db11``+, ``sym11``+, ``coif6``+).
``proportional_parameters=True`` shares a budget of ``n_frequency · #targets`` coefficients in proportion to each
target's ``in · out`` (at least one each, Python's rounding), as peft does; the shares are worked out from the
targets once per adapter (:class:`FrequencyBudget`, which holds no tensors and saves nothing).

Layer types: ``nn.Linear`` and transformers ``Conv1D``, as in peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..registry import LayerMethod
from ..targeting import DEFAULT_MLP_OUT_TARGETS, pattern_value
from . import _wavelets
from .common import (
    DenseDelta, check_scale, check_seed, check_size, check_size_pattern, layer_features, place_delta,
    record_fan_in_fan_out,
)
from .fourierft import spectral_positions

__all__ = ["WaveFTConfig"]  # exported from deltatune


@dataclass
class WaveFTConfig(LayerConfig):
    """Configuration of a WaveFT adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        n_frequency: Number of learned wavelet coefficients per layer (at most ``in · out``).
        scaling: ``α``, the factor on the reconstructed update (peft's default 25, its SDXL setting).
        wavelet_family: ``"db1"`` (Haar, the default) … ``"db10"``, ``"sym2"`` … ``"sym10"`` or ``"coif1"`` …
            ``"coif3"``; longer filters spread each coefficient over more entries and cost more time.
        use_idwt: ``True``: apply the inverse transform. ``False``: the sparse coefficients are the update itself.
        random_loc_seed: Seed of the CPU generator that draws the coefficients' positions (the same for every layer).
        fan_in_fan_out: Weight stored ``(in, out)``. Set from the target type (``Conv1D``: ``True``, ``Linear``:
            ``False``), as peft does; deltatune reads the layout from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"waveft_only"`` (biases of adapted
            layers).
        n_frequency_pattern: ``{module-name pattern: n}`` overriding ``n_frequency`` for matching modules (a regex on
            the name's dotted suffix, as peft's ``rank_pattern``).
        proportional_parameters: ``True``: each target gets its share of ``n_frequency · #targets`` in proportion to
            its ``in · out`` (at least 1), instead of ``n_frequency`` / ``n_frequency_pattern``.
        init_weights: ``True`` (peft's default): zero coefficients, the base model. ``False``: ``N(0, 0.01²)``.
    """

    peft_type: PeftType = field(default=PeftType.WAVEFT, init=False)
    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("n_frequency", self.n_frequency)
        check_scale("scaling", self.scaling)
        check_seed("random_loc_seed", self.random_loc_seed)
        if self.wavelet_family not in _wavelets.SUPPORTED:
            raise ConfigError(
                f"wavelet_family={self.wavelet_family!r} is not supported; deltatune supports "
                f"{', '.join(_wavelets.SUPPORTED)} (peft's coif4 / coif5 tables are not orthonormal filters)"
            )
        for name in ("use_idwt", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.proportional_parameters, bool):
            raise ConfigError(f"proportional_parameters must be True or False, got {self.proportional_parameters!r}")
        if self.bias not in ("none", "all", "waveft_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'waveft_only', got {self.bias!r}")
        check_size_pattern("n_frequency_pattern", self.n_frequency_pattern)


class WaveFTDelta(DenseDelta):
    """``Δy = x ΔWᵀ`` with ``ΔW = α · IDWT₂(C)`` ``(out, in)`` built from the sparse coefficients at every call."""

    def __init__(self, base_layer: nn.Module, n: int, config: WaveFTConfig, positions: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        self.scaling = config.scaling
        self.family = config.wavelet_family if config.use_idwt else None
        shrink = len(_wavelets.rec_lo(self.family)) - 2 if self.family else 0  # the inverse's boundary loss
        self.padded = tuple(size + shrink + (size + shrink) % 2 for size in (self.out_features, self.in_features))
        offsets = [(padded - size) // 2 for padded, size in zip(self.padded, (self.out_features, self.in_features))]
        if not self.family:
            self.padded, offsets = (self.out_features, self.in_features), [0, 0]
        self.waveft_spectrum = nn.Parameter(torch.zeros(n))
        shifted = positions + torch.tensor(offsets, dtype=positions.dtype, device=positions.device)[:, None]
        self.register_buffer("positions", shifted, persistent=False)  # (2, n) in the padded matrix, never saved

    def update(self) -> torch.Tensor:
        """``ΔW``: ``(out, in)`` in the spectrum's dtype."""
        spectrum = self.waveft_spectrum
        dense = spectrum.new_zeros(self.padded).index_put((self.positions[0], self.positions[1]), spectrum)
        if self.family is None:
            return dense * self.scaling
        h, w = self.padded[0] // 2, self.padded[1] // 2
        full = _wavelets.inverse_dwt2(dense[:h, :w], dense[:h, w:], dense[h:, :w], dense[h:, w:], self.family)
        top, left = (full.shape[0] - self.out_features) // 2, (full.shape[1] - self.in_features) // 2
        return full[top: top + self.out_features, left: left + self.in_features] * self.scaling

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, n={self.waveft_spectrum.shape[0]}, "
                f"wavelet={self.family or 'none'}")


class FrequencyBudget(nn.Module):
    """How many coefficients each target of one adapter trains (``{module name: n}``); no tensors, nothing saved."""

    def __init__(self, n_for: dict[str, int]) -> None:
        super().__init__()
        self.n_for = n_for


def make_budget(config: WaveFTConfig, targets: dict[str, nn.Module], others: dict[str, nn.Module]
                ) -> FrequencyBudget:
    """Each target's ``n``: its ``n_frequency_pattern`` value or ``n_frequency``, or with ``proportional_parameters``
    its share of ``n_frequency · #targets`` by ``in · out`` (see the module docstring).

    Raises:
        TargetError: a target's ``n`` exceeds the ``in · out`` entries of its weight.
    """
    sizes = {name: math.prod(layer_features(base)) for name, base in targets.items()}
    if config.proportional_parameters:
        total, budget = sum(sizes.values()), config.n_frequency * len(sizes)
        n_for = {name: max(1, round(size / total * budget)) for name, size in sizes.items()}
    else:
        n_for = {name: pattern_value(config.n_frequency_pattern, name, config.n_frequency) for name in sizes}
    for name, n in n_for.items():
        if n > sizes[name]:
            raise TargetError(
                f"{name}: n_frequency={n} exceeds the {sizes[name]} entries of its weight; use a smaller n_frequency "
                f"(or an n_frequency_pattern entry for this layer)"
            )
    return FrequencyBudget(n_for)


def make_delta(config: WaveFTConfig, base_layer: nn.Module, name: str, budget: FrequencyBudget) -> WaveFTDelta:
    """Build and initialise the WaveFT delta of ``base_layer`` (module ``name``) with its share of ``budget``."""
    n = budget.n_for[name]
    in_features, out_features = layer_features(base_layer)
    weight = base_layer.weight
    positions = (
        torch.empty(2, n, dtype=torch.long, device="meta")  # a dry run that only counts sizes
        if weight.device.type == "meta"
        else spectral_positions(out_features, in_features, n, config.random_loc_seed)
    )
    delta = WaveFTDelta(base_layer, n, config, positions)
    return place_delta(delta, weight, None if config.init_weights else _randomize)


def _randomize(delta: WaveFTDelta) -> None:
    delta.waveft_spectrum.normal_(0.0, 0.01)  # peft's small random start


METHOD = LayerMethod(
    config_class=WaveFTConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    resolve_config=record_fan_in_fan_out,
    make_shared=make_budget,
    default_targets=DEFAULT_MLP_OUT_TARGETS,
)

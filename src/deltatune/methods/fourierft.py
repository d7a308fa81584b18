"""FourierFT: learn a few entries of the weight update's 2-D spectrum and recover the update by an inverse DFT.

Gao et al., 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (ICML 2024, arXiv:2405.03003), §3:
``ΔW = α · Re(IDFT₂(F))`` where ``F ∈ C^{out×in}`` is zero except at ``n`` entries, whose (real) values are the only
trainable parameters. The entries' positions are drawn at random once and shared by every layer of one shape, so a
layer costs ``n`` parameters however large it is; ``α`` (``scaling``) makes up for the ``1/(out·in)`` of the inverse
transform.

What is stored and computed follows peft 0.21 so adapters load across libraries to equal outputs:

* ``fourierft_spectrum`` is ``(n,)``, the values at the positions; the positions are not saved but regenerated from
  ``random_loc_seed``: the first ``n`` entries of ``torch.randperm(out · in)`` from a CPU generator seeded with it,
  each flat index ``p`` read as row ``p // in``, column ``p % in`` of the ``(out, in)`` spectrum (peft's draw).
* ``ΔW`` is computed in float32 (``torch.fft`` has no half-precision transform on every device) and cast to the
  spectrum's dtype; a ``Conv1D`` (weight stored ``(in, out)``) merges ``ΔWᵀ``.
* init: the spectrum is ``N(0, 1)`` (peft's default, ``init_weights=False``: a fresh adapter already changes the
  model), or zero with ``init_weights=True`` (the base model).

Layer types: ``nn.Linear`` and transformers ``Conv1D``, as in peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..registry import LayerMethod
from ..targeting import DEFAULT_MLP_OUT_TARGETS, pattern_value
from .common import (
    DenseDelta, check_scale, check_seed, check_size, check_size_pattern, layer_features, place_delta,
    record_fan_in_fan_out,
)

__all__ = ["FourierFTConfig"]  # exported from deltatune


@dataclass
class FourierFTConfig(LayerConfig):
    """Configuration of a FourierFT adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        n_frequency: Number of learned spectral entries per layer (at most ``in · out``).
        scaling: ``α``, the factor on the inverse transform (the paper uses 100–300; peft's default 150).
        random_loc_seed: Seed of the CPU generator that draws the entries' positions (the same for every layer).
        fan_in_fan_out: Weight stored ``(in, out)``. Set from the target type (``Conv1D``: ``True``, ``Linear``:
            ``False``), as peft does; deltatune reads the layout from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"fourier_only"`` (biases of adapted
            layers).
        n_frequency_pattern: ``{module-name pattern: n}`` overriding ``n_frequency`` for matching modules (a regex on
            the name's dotted suffix, as peft's ``rank_pattern``).
        init_weights: ``False`` (peft's default): a random ``N(0, 1)`` spectrum. ``True``: zero, the base model.
    """

    peft_type: PeftType = field(default=PeftType.FOURIERFT, init=False)
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("n_frequency", self.n_frequency)
        check_scale("scaling", self.scaling)
        check_seed("random_loc_seed", self.random_loc_seed)
        if self.bias not in ("none", "all", "fourier_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'fourier_only', got {self.bias!r}")
        check_size_pattern("n_frequency_pattern", self.n_frequency_pattern)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (zero) or False (random), got {self.init_weights!r}")


def spectral_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """``(2, n)`` int64 rows and columns of the learned entries in the ``(out, in)`` spectrum: peft's draw."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTDelta(DenseDelta):
    """``Δy = x ΔWᵀ`` with ``ΔW = α · Re(IDFT₂(F))`` ``(out, in)`` built from the sparse spectrum at every call."""

    def __init__(self, base_layer: nn.Module, n: int, scaling: float, positions: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        self.scaling = scaling
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n))
        self.register_buffer("positions", positions, persistent=False)  # regenerated from the seed, never saved

    def update(self) -> torch.Tensor:
        """``ΔW``: ``(out, in)`` in the spectrum's dtype."""
        spectrum = self.fourierft_spectrum
        dense = spectrum.new_zeros(self.out_features, self.in_features, dtype=torch.float32)
        dense = dense.index_put((self.positions[0], self.positions[1]), spectrum.float())  # (out, in), n non-zero
        return (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.fourierft_spectrum.shape[0]}"


def check_target(config: FourierFTConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse more spectral entries than the layer's spectrum has.

    Raises:
        TargetError: ``n_frequency`` (or this module's ``n_frequency_pattern`` value) exceeds ``in · out``.
    """
    in_features, out_features = layer_features(base_layer)
    n = pattern_value(config.n_frequency_pattern, name, config.n_frequency)
    if n > in_features * out_features:
        raise TargetError(
            f"{name}: n_frequency={n} exceeds the {out_features} x {in_features} = {in_features * out_features} "
            f"entries of its spectrum; use a smaller n_frequency (or an n_frequency_pattern entry for this layer)"
        )


def make_delta(config: FourierFTConfig, base_layer: nn.Module, name: str) -> FourierFTDelta:
    """Build and initialise the FourierFT delta of ``base_layer`` (module ``name``)."""
    n = pattern_value(config.n_frequency_pattern, name, config.n_frequency)
    in_features, out_features = layer_features(base_layer)
    weight = base_layer.weight
    meta = weight.device.type == "meta"  # a dry run that only counts sizes
    positions = (
        torch.empty(2, n, dtype=torch.long, device="meta")
        if meta
        else spectral_positions(out_features, in_features, n, config.random_loc_seed)
    )
    delta = FourierFTDelta(base_layer, n, config.scaling, positions)
    return place_delta(delta, weight, None if config.init_weights else _randomize)


def _randomize(delta: FourierFTDelta) -> None:
    delta.fourierft_spectrum.normal_()


METHOD = LayerMethod(
    config_class=FourierFTConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    check_target=check_target,
    resolve_config=record_fan_in_fan_out,
    default_targets=DEFAULT_MLP_OUT_TARGETS,
)

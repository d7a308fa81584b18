"""Small pieces the methods share: config checks (sizes, scales, seeds, dropout probabilities, peft's per-module
``rank_pattern`` / ``alpha_pattern``), the adapter's dtype next to the base weight and :func:`place_delta` (the
common tail of every ``make_delta``), per-channel broadcasting, the ``(in, out)`` of a Linear or Conv1D and peft's
record of ``fan_in_fan_out``, :class:`DenseDelta` for methods whose whole update is rebuilt at each call (FourierFT,
WaveFT) and :class:`FactoredDelta` for those whose update is a product of two factors rebuilt at each call (VB-LoRA,
RandLoRA). (Adding an update into an output is in :mod:`deltatune.kernels`, the row-to-adapter
table of a mixed batch in :mod:`deltatune.rows`.)"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import validate_regex
from ..kernels import add_low_rank, index_accumulate
from ..layers import Delta
from ..errors import ConfigError, TargetError
from ..targeting import pattern_key_regex


def check_size(where: str, value: Any, *, allow_zero: bool = False) -> None:
    """Refuse a size (rank, bottleneck width, block size) that is not an integer in ``[1, 2**31)`` (``[0, …)`` with
    ``allow_zero``). The upper bound only stops a corrupt file from asking for absurd allocations."""
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 2**31:
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{where} must be a {kind} integer below 2**31, got {value!r}")


def check_dropout(where: str, value: Any, *, allow_one: bool = False) -> None:
    """Refuse a dropout probability outside ``[0, 1)`` (``[0, 1]`` with ``allow_one``: LyCORIS' module dropout may
    skip the adapter always); a probability of 1 would zero the adapter's input."""
    if allow_one:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where} must be in [0, 1], got {value!r}")
    elif not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} must be in [0, 1), got {value!r}")


def check_seed(where: str, value: Any) -> None:
    """Refuse a seed that a torch generator cannot take: anything but an integer in ``[-2**63, 2**64)``."""
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**64:
        raise ConfigError(f"{where} must be an integer in [-2**63, 2**64) (a torch generator seed), got {value!r}")


def check_scale(where: str, value: Any) -> None:
    """Refuse a scale factor (``lora_alpha``, ``scaling``) that is not a finite number within float32's range: torch
    cannot apply a larger factor to a float32 tensor (``add(..., alpha=1e308)`` raises), and a NaN or infinite one
    only turns every output into NaN. An integer must also fit int64, which is how torch takes a Python int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _FLOAT32_MAX \
            or (isinstance(value, int) and abs(value) >= 2**63):
        raise ConfigError(f"{where} must be a finite number of magnitude at most {_FLOAT32_MAX:.4g} (an integer: "
                          f"below 2**63), got {value!r}")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_patterns(rank: Any, rank_pattern: dict[str, Any], alpha_pattern: dict[str, Any]) -> None:
    """``r`` and every ``rank_pattern`` value are sizes, every ``alpha_pattern`` value a scale (:func:`check_scale`);
    every pattern key is a regex :func:`~deltatune.targeting.pattern_value` can use."""
    check_size("r", rank)
    for key, value in rank_pattern.items():
        check_size(f"rank_pattern[{key!r}]", value)
    for key, value in alpha_pattern.items():
        check_scale(f"alpha_pattern[{key!r}]", value)
    for name, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in patterns:
            validate_regex(f"{name} key {key!r}", pattern_key_regex(key))


def check_no_layers_with_regex(config: Any) -> None:
    """Refuse ``layers_to_transform`` / ``layers_pattern`` beside a regex ``target_modules``, for the methods whose
    peft config refuses the pair (DeFT, PSOFT), so that peft reads every saved config."""
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear" and (
            config.layers_to_transform is not None or config.layers_pattern is not None):
        raise ConfigError(f"layers_to_transform and layers_pattern cannot be used with a regex target_modules (peft's "
                          f"{type(config).__name__} refuses them); put the layer indices into the regex")


def check_size_pattern(where: str, patterns: Any) -> None:
    """A per-module size override (C3A's ``block_size_pattern``, WaveFT's ``n_frequency_pattern``): a dict whose keys
    are regexes :func:`~deltatune.targeting.pattern_value` can use and whose values are sizes (:func:`check_size`)."""
    if not isinstance(patterns, dict):
        raise ConfigError(f"{where} must be a dict of module-name pattern -> size, got {patterns!r}")
    for key, value in patterns.items():
        check_size(f"{where}[{key!r}]", value)
        validate_regex(f"{where} key {key!r}", pattern_key_regex(key))


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype a new adapter's parameters take next to a base weight of ``base_dtype``: float32 beside a
    half-precision base (small tensors, trained and kept in full precision, as peft's ``autocast_adapter_dtype``),
    else the base's own."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


D = TypeVar("D", bound=Delta)


def place_delta(delta: D, weight: torch.Tensor, init: Callable[[D], None] | None = None) -> D:
    """The last step of every ``make_delta``: fill ``delta``'s parameters with ``init`` (without autograd; skipped on
    the meta device, where a dry run only counts sizes), then move it next to the base ``weight`` in the
    :func:`adapter_dtype` of ``weight``'s dtype. ``init=None`` keeps the values the delta was built with."""
    if init is not None and weight.device.type != "meta":
        with torch.no_grad():
            init(delta)
    return delta.to(device=weight.device, dtype=adapter_dtype(weight.dtype))


C = TypeVar("C")


def record_fan_in_fan_out(config: C, model: nn.Module, targets: Mapping[str, nn.Module]) -> C:
    """A method's ``resolve_config`` that records ``fan_in_fan_out`` as peft does for the methods on Linear and
    Conv1D: from the layout of the *last* target (``Conv1D``: ``True``; ``Linear``: ``False``, even where the user
    wrote ``True``), so the saved config reads as peft's."""
    return dataclasses.replace(config, fan_in_fan_out=isinstance(list(targets.values())[-1], Conv1D))


def channel_view(v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """The ``(out,)`` vector ``v`` shaped to broadcast along ``channel_dim`` of an ``ndim``-dimensional output."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return v.view(shape)


def embed_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor a scaled embedding multiplies its looked-up rows by in its own forward (Gemma's
    ``*TextScaledWordEmbedding``: ``sqrt(hidden)``; BART-style ``*ScaledWordEmbedding``), which an update of those
    rows must be multiplied by too so that unmerged equals merged. Read from the module's ``embed_scale`` attribute
    as peft 0.21.2 reads it (``BaseTunerLayer._get_embed_scale``): a number becomes a 0-dim tensor of the weight's
    dtype, a one-element tensor is used as it is; without the attribute, ``None``. A larger tensor has no known
    meaning: it is not applied, with a warning (as peft)."""
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, (int, float)):
        weight = embedding.weight
        return torch.tensor(scale, dtype=weight.dtype, device=weight.device)
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            return scale
        warnings.warn(f"{type(embedding).__name__}.embed_scale has shape {tuple(scale.shape)}, not one value; the "
                      f"adapter's update of this embedding is not scaled by it (as in peft)", stacklevel=2)
    return None


def layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear or a transformers ``Conv1D`` (whose weight is stored ``(in, out)``)."""
    if isinstance(base_layer, Conv1D):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    return base_layer.in_features, base_layer.out_features


def check_divides(name: str, what: str, size: int, base_layer: nn.Module, why: str, *,
                  sides: tuple[str, ...] = ("in", "out")) -> None:
    """Refuse target ``name`` when ``size`` (the setting ``what``, e.g. ``"block_size=8"``) does not divide each of its
    ``sides`` (``"in"`` / ``"out"`` features of a Linear or Conv1D); ``why`` says what the method cuts into blocks.

    Raises:
        TargetError: naming the module, the setting and the sizes.
    """
    features = dict(zip(("in", "out"), layer_features(base_layer)))
    if any(features[side] % size for side in sides):
        sizes = " and ".join(f"{side}_features={features[side]}" for side in sides)
        raise TargetError(f"{name}: {what} must divide its {sizes} ({why}); choose one that divides every target's")


class DenseDelta(Delta):
    """``Δy = x ΔWᵀ`` for a Linear or Conv1D, with the whole ``ΔW`` ``(out, in)`` rebuilt from the method's
    parameters at every call (:meth:`update`: a sparse transform-domain spectrum, FourierFT, WaveFT); ``delta_weight``
    is ``ΔW`` in the layer's layout. Subclasses set ``transposed`` and implement :meth:`update`."""

    transposed: bool = False

    def update(self) -> torch.Tensor:
        """``ΔW``: ``(out, in)`` in the adapter's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        change = self.update()
        return base_out + F.linear(x.to(change.dtype), change).to(base_out.dtype)  # (..., out)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        change = self.update()
        return (change.T if self.transposed else change).to(base_layer.weight.dtype)


class FactoredDelta(Delta):
    """``Δy = scaling · second(first(x))`` for a Linear or Conv1D, with ``first`` ``(k, in)`` and ``second``
    ``(out, k)`` rebuilt from the method's parameters at every call (:meth:`factors`); ``ΔW = scaling · second ·
    first`` (transposed for a Conv1D). Subclasses set ``scaling``, ``transposed`` and ``dropout`` and implement
    :meth:`factors`."""

    scaling: float = 1.0
    transposed: bool = False
    dropout: nn.Module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)``: ``(k, in)`` and ``(out, k)``, in the adapter's dtype."""
        raise NotImplementedError

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first(dropout(x)), second)``: the ``(..., k)`` hidden state and the second factor."""
        first, second = self.factors()
        return F.linear(self.dropout(x.to(first.dtype)), first), second

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return add_low_rank(base_out, *self.hidden(x), self.scaling)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """Each group's update added straight into its rows of ``out``."""
        for delta, rows in groups:
            hidden, second = delta.hidden(x.index_select(0, rows))
            out = index_accumulate(out, rows, F.linear(hidden, second), delta.scaling)
        return out

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        first, second = self.factors()
        weight = (second @ first) * self.scaling  # (out, in)
        return (weight.T if self.transposed else weight).to(base_layer.weight.dtype)

"""VeRA: frozen random projections shared by all layers, adapted only through two trainable scaling vectors.

Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation", §3: ``h = W₀x + Λ_b B Λ_d A x`` where
``A ∈ R^{r×in}`` and ``B ∈ R^{out×r}`` are random, frozen and shared by every adapted layer, and only the
diagonals ``d ∈ R^r`` (init ``d_initial``) and ``b ∈ R^out`` (init zero: training starts from the base model) train.

One pair ``A`` / ``B`` is drawn per adapter, sized to the largest input and output dims among its targets; each
layer uses the top-left ``r × in`` / ``out × r`` corner. The pair is drawn on the CPU from a generator seeded with
``projection_prng_key``: ``A`` first, then ``B``, each Kaiming-uniform (gain √2, fan-in = second dim) — the draws
peft makes, so an adapter saved without its projections (``save_projection=False``) is rebuilt identically by
either library. With ``save_projection=True`` they are saved once per adapter as ``base_model.vera_A`` /
``base_model.vera_B`` (the pair lives in the core's per-adapter shared state, see ``LayerMethod.make_shared``), next
to each layer's ``vera_lambda_b`` / ``vera_lambda_d``.

As in peft, later VeRA adapters of a model reuse the first adapter's pair, so they must agree on ``r``,
``projection_prng_key`` and ``save_projection``, and every target must fit inside the pair.

Layer types: ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from ._projections import SeededTensors, draw, existing, max_features
from .common import check_dropout, check_scale, check_seed, check_size, layer_features, record_fan_in_fan_out

__all__ = ["VeraConfig"]  # exported from deltatune


@dataclass
class VeraConfig(LayerConfig):
    """Configuration of a VeRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (``exclude_modules`` excepted: peft's ``VeraConfig`` has no such field, so it is neither accepted nor written).

    Attributes:
        r: Rank of the shared projections; far larger than LoRA ranks, since it costs only ``r`` parameters a layer.
        projection_prng_key: Seed of the CPU generator that draws ``A`` and ``B``.
        save_projection: Save ``A`` and ``B`` with the adapter (safe everywhere); ``False`` relies on regenerating
            them from ``projection_prng_key``.
        vera_dropout: Dropout on the adapter's input during training.
        d_initial: Initial value of every entry of ``vera_lambda_d`` (§3; the paper recommends ≤ 0.1).
        fan_in_fan_out: Weight stored ``(in, out)``. Set automatically from the target type (``Conv1D``: ``True``,
            ``Linear``: ``False``), as peft does; deltatune reads the layout from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"vera_only"`` (biases of adapted layers).
        init_weights: ``True``: ``b = 0``, ``d = d_initial`` (the adapter starts as the base model). ``False``:
            ``b = 1``, ``d ~ N(0, 1)`` (a non-zero delta, for tests).
    """

    peft_type: PeftType = field(default=PeftType.VERA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_scale("d_initial", self.d_initial)
        check_seed("projection_prng_key", self.projection_prng_key)
        check_dropout("vera_dropout", self.vera_dropout)
        if self.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")


class VeraProjections(SeededTensors):
    """The frozen random pair ``A`` ``(r, max_in)`` / ``B`` ``(max_out, r)`` of one adapter, held once in the model's
    shared state; every layer reads its corner at call time, so it follows ``.to()`` without per-layer copies.
    Buffers named as peft saves them (``<prefix>_A`` / ``<prefix>_B``); persistent (saved) only with
    ``save_projection``. PVeRA keeps the same pair under its own prefix."""

    prefix: ClassVar[str] = "vera"
    method: ClassVar[str] = "VeRA"

    def __init__(self, a: torch.Tensor, b: torch.Tensor, prng_key: int, save_projection: bool) -> None:
        super().__init__({f"{self.prefix}_A": a, f"{self.prefix}_B": b}, prng_key, save_projection)

    @property
    def a(self) -> torch.Tensor:
        return getattr(self, f"{self.prefix}_A")

    @property
    def b(self) -> torch.Tensor:
        return getattr(self, f"{self.prefix}_B")

    @property
    def r(self) -> int:
        return self.a.shape[0]

    def corner(self, in_features: int, out_features: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:, :in]`` ``(r, in)`` and ``B[:out]`` ``(out, r)`` on ``like``'s device and dtype."""
        a = self.a[:, :in_features].to(device=like.device, dtype=like.dtype)
        b = self.b[:out_features].to(device=like.device, dtype=like.dtype)
        return a, b

    def check_fits(self, name: str, in_features: int, out_features: int) -> None:
        """Refuse (``TargetError``) module ``name`` when its corner would lie outside the pair."""
        if in_features > self.a.shape[1] or out_features > self.b.shape[0]:
            raise TargetError(
                f"{name}: a {in_features}->{out_features} layer does not fit the shared {self.method} projections of "
                f"{self.a.shape[1]}->{self.b.shape[0]} (made for the model's first {self.method} adapter, which later "
                f"ones share, as in peft); add the adapter with the larger targets first"
            )


def make_pair(
    kind: type[VeraProjections], config: VeraConfig, bases: Mapping[str, nn.Module], shared: Mapping[str, nn.Module]
) -> VeraProjections:
    """The adapter's projections (``kind``: VeRA's or PVeRA's): those of an existing adapter of the model's of the same
    kind (peft shares one pair), after checking that they fit; otherwise a new pair drawn from
    ``projection_prng_key`` (see the module docstring).

    Raises:
        ConfigError: ``r``, ``projection_prng_key`` or ``save_projection`` differ from the existing adapters'.
        TargetError: a target is larger than the existing pair.
    """
    pair = existing(shared, kind)
    if pair is not None:
        pair.check_agrees(kind.method, config, ("r", config.r, pair.r))
        for name, base in bases.items():
            pair.check_fits(name, *layer_features(base))
        return pair
    max_in, max_out = max_features(bases)

    def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
        a = nn.init.kaiming_uniform_(torch.empty(config.r, max_in), nonlinearity="relu", generator=generator)
        b = nn.init.kaiming_uniform_(torch.empty(max_out, config.r), nonlinearity="relu", generator=generator)
        return {"a": a, "b": b}

    tensors = draw(bases, {"a": (config.r, max_in), "b": (max_out, config.r)}, config.projection_prng_key, sample)
    return kind(tensors["a"], tensors["b"], config.projection_prng_key, config.save_projection)


def make_projections(
    config: VeraConfig, bases: Mapping[str, nn.Module], shared: Mapping[str, nn.Module]
) -> VeraProjections:
    """VeRA's pair: see :func:`make_pair`."""
    return make_pair(VeraProjections, config, bases, shared)


class VeraDelta(Delta):
    """``Λ_b B Λ_d A x`` on a Linear or Conv1D, with ``A`` and ``B`` read from the adapter's shared projections."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        self.vera_lambda_b = nn.Parameter(torch.empty(self.out_features))
        self.vera_lambda_d = nn.Parameter(torch.empty(projections.r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A plain reference, not a submodule: the pair is saved and moved once, with the model's shared state.
        object.__setattr__(self, "projections", projections)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        d = self.vera_lambda_d
        a, b = self.projections.corner(self.in_features, self.out_features, d)
        hidden = F.linear(self.dropout(x.to(d.dtype)), a) * d  # (..., r)
        return accumulate(base_out, F.linear(hidden, b) * self.vera_lambda_b, 1.0)  # (..., out)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        a, b = self.projections.corner(self.in_features, self.out_features, self.vera_lambda_d)
        weight = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)  # (out, in)
        return weight.T if self.transposed else weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.vera_lambda_d.shape[0]}"


def make_delta(config: VeraConfig, base_layer: nn.Module, name: str, projections: VeraProjections) -> VeraDelta:
    """Build and initialise the VeRA delta of ``base_layer`` (module ``name``) on the adapter's ``projections``."""
    delta = VeraDelta(base_layer, projections, config.vera_dropout)
    delta.to(device=base_layer.weight.device, dtype=projections.a.dtype)
    with torch.no_grad():
        if config.init_weights:
            delta.vera_lambda_b.zero_()
            delta.vera_lambda_d.fill_(config.d_initial)
        else:
            delta.vera_lambda_b.fill_(1.0)
            delta.vera_lambda_d.normal_()
    return delta


METHOD = LayerMethod(
    config_class=VeraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    resolve_config=record_fan_in_fan_out,
    make_shared=make_projections,
)

"""PVeRA: VeRA made probabilistic — the scaled random projection of the input gives the mean and log-variance of a
latent code, sampled during training (the reparametrisation trick) and taken at its mean for inference.

"PVeRA: Probabilistic Vector-based Random Matrix Adaptation" (arXiv:2512.07703, peft's ``PveraConfig``), on VeRA
(Kopiczko et al., 2024, arXiv:2310.11454): with frozen random ``A ∈ R^{2r×in}`` and ``B ∈ R^{out×r}`` shared by the
layers and trainable diagonals ``d ∈ R^{2r}``, ``b ∈ R^{out}``::

    (μ, log σ²) = split(Λ_d A x)          # r entries each
    z = μ + ε ⊙ exp(½ log σ²),  ε ~ N(0, I)   (training, or sample_at_inference)
    z = μ                                   (otherwise)
    h = W₀x + Λ_b B z

Merging folds in the mean path, ``ΔW = Λ_b B Λ_{d[:r]} A[:r]``, as peft does (a merged adapter no longer samples).
``ε`` comes from torch's global generator, or with ``generator_seed`` from a CPU generator per layer seeded with it
(peft's), so a seeded run samples the same noise in either library.

The pair is drawn per adapter, sized to the largest target dims, on a CPU generator seeded with
``projection_prng_key``: ``A`` then ``B``, Kaiming-uniform (gain √2), as peft draws them; saved with
``save_projection`` as ``base_model.pvera_A`` / ``pvera_B`` (VeRA's holder under PVeRA's names), next to each layer's
``pvera_lambda_b`` / ``pvera_lambda_d``. The model's PVeRA adapters must agree on the key and on ``save_projection``.
Init: ``b = 0``, ``d = d_initial`` (the base model); ``init_weights=False``: ``b = 1``, ``d ~ N(0, 1)``.

Layer types: ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``), as in peft.
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
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from ._projections import draw, existing, max_features
from .common import check_dropout, check_scale, check_seed, check_size, layer_features, record_fan_in_fan_out
from .vera import VeraProjections

__all__ = ["PveraConfig"]  # exported from deltatune


@dataclass
class PveraConfig(LayerConfig):
    """Configuration of a PVeRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (``exclude_modules`` excepted: peft's ``PveraConfig`` has no such field).

    Attributes:
        r: Size of the latent code (``A`` has ``2r`` rows: mean and log-variance).
        projection_prng_key: Seed of the CPU generator that draws ``A`` and ``B``.
        save_projection: Save ``A`` and ``B`` with the adapter; ``False`` regenerates them from the key.
        pvera_dropout: Dropout on the adapter's input during training.
        d_initial: Initial value of every entry of ``pvera_lambda_d``.
        fan_in_fan_out: Weight stored ``(in, out)``. Set from the target type (``Conv1D``: ``True``, ``Linear``:
            ``False``), as peft does; deltatune reads the layout from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"pvera_only"`` (biases of adapted layers).
        init_weights: ``True``: ``b = 0``, ``d = d_initial`` (the base model). ``False``: ``b = 1``, ``d ~ N(0, 1)``.
        sample_at_inference: Sample ``z`` in eval mode too (else the mean is used outside training).
        generator_seed: Seed of each layer's CPU generator for ``ε``; ``None`` uses torch's global generator.
    """

    peft_type: PeftType = field(default=PeftType.PVERA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_seed("projection_prng_key", self.projection_prng_key)
        check_dropout("pvera_dropout", self.pvera_dropout)
        check_scale("d_initial", self.d_initial)
        if self.generator_seed is not None:
            check_seed("generator_seed", self.generator_seed)
        if self.bias not in ("none", "all", "pvera_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'pvera_only', got {self.bias!r}")


class PveraProjections(VeraProjections):
    """``pvera_A`` ``(2r, max_in)`` / ``pvera_B`` ``(max_out, r)``: VeRA's holder under PVeRA's names."""

    prefix = "pvera"
    method = "PVeRA"


def make_projections(config: PveraConfig, bases: Mapping[str, nn.Module],
                     shared: Mapping[str, nn.Module]) -> PveraProjections:
    """The adapter's own pair, drawn from ``projection_prng_key`` (see the module docstring).

    Raises:
        ConfigError: ``projection_prng_key`` or ``save_projection`` differ from the model's other PVeRA adapters'.
    """
    other = existing(shared, PveraProjections)
    if other is not None:
        other.check_agrees("PVeRA", config)
    max_in, max_out = max_features(bases)

    def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
        a = nn.init.kaiming_uniform_(torch.empty(2 * config.r, max_in), nonlinearity="relu", generator=generator)
        b = nn.init.kaiming_uniform_(torch.empty(max_out, config.r), nonlinearity="relu", generator=generator)
        return {"a": a, "b": b}

    pair = draw(bases, {"a": (2 * config.r, max_in), "b": (max_out, config.r)}, config.projection_prng_key, sample)
    return PveraProjections(pair["a"], pair["b"], config.projection_prng_key, config.save_projection)


class PveraDelta(Delta):
    """``Λ_b B z`` with ``z`` the (sampled or mean) latent code of ``Λ_d A x``."""

    def __init__(self, base_layer: nn.Module, projections: PveraProjections, config: PveraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        self.pvera_lambda_b = nn.Parameter(torch.empty(self.out_features))
        self.pvera_lambda_d = nn.Parameter(torch.empty(2 * config.r))
        self.dropout = nn.Dropout(config.pvera_dropout) if config.pvera_dropout > 0 else nn.Identity()
        self.sample_at_inference = config.sample_at_inference
        self.generator = (None if config.generator_seed is None
                          else torch.Generator(device="cpu").manual_seed(config.generator_seed))
        # A plain reference, not a submodule: the pair is saved and moved once, with the model's shared state.
        object.__setattr__(self, "projections", projections)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """``z`` ``(..., r)`` for input ``x``: sampled in training (or with ``sample_at_inference``), else ``μ``."""
        d = self.pvera_lambda_d
        a, _ = self.projections.corner(self.in_features, self.out_features, d)
        mu, logvar = (F.linear(self.dropout(x.to(d.dtype)), a) * d).chunk(2, dim=-1)
        if not (self.training or self.sample_at_inference):
            return mu
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, dtype=std.dtype, generator=self.generator).to(std.device)
        return mu + eps * std

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        _, b = self.projections.corner(self.in_features, self.out_features, self.pvera_lambda_b)
        return accumulate(base_out, F.linear(self.latent(x), b) * self.pvera_lambda_b, 1.0)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The mean path: ``Λ_b B Λ_{d[:r]} A[:r]``."""
        d = self.pvera_lambda_d
        a, b = self.projections.corner(self.in_features, self.out_features, d)
        r = b.shape[1]
        weight = (self.pvera_lambda_b[:, None] * b) @ (d[:r, None] * a[:r])  # (out, in)
        return (weight.T if self.transposed else weight).to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.pvera_lambda_d.shape[0] // 2}"


def make_delta(config: PveraConfig, base_layer: nn.Module, name: str, projections: PveraProjections) -> PveraDelta:
    """Build and initialise the PVeRA delta of ``base_layer`` (module ``name``) on the adapter's ``projections``."""
    delta = PveraDelta(base_layer, projections, config)
    delta.to(device=base_layer.weight.device, dtype=projections.a.dtype)
    with torch.no_grad():
        if config.init_weights:
            delta.pvera_lambda_b.zero_()
            delta.pvera_lambda_d.fill_(config.d_initial)
        elif base_layer.weight.device.type != "meta":
            delta.pvera_lambda_b.fill_(1.0)
            delta.pvera_lambda_d.normal_()
    return delta


METHOD = LayerMethod(
    config_class=PveraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    resolve_config=record_fan_in_fan_out,
    make_shared=make_projections,
)

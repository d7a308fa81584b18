"""RandLoRA: a full-rank update from many frozen random low-rank bases, each scaled by two small trainable diagonals.

Albert et al., 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (ICLR 2025,
arXiv:2502.00987): ``ΔW = (α/r) Σ_{b=1}^{n} B_b Λ_b A Γ_b`` where the random bases ``B_b ∈ R^{max×r}`` (one per
``b``) and ``A ∈ R^{r×min}`` (one, shared) are frozen and shared by all layers, and only the diagonals ``Λ_b ∈ R^r``
(``randlora_lambda`` ``(r, n)``) and ``Γ_b ∈ R^min`` (``randlora_gamma`` ``(n, min)``) train. ``n = ⌈min/r⌉`` bases
make the sum full rank; ``min`` / ``max`` are the layer's smaller / larger dimension (``ΔW`` is transposed when the
output is the smaller one).

The layout follows peft 0.21 exactly, since it fixes which random vectors pair up: with ``A`` stored ``(r, 1, min)``
and ``B`` ``(max, n, r)``, the layer forms ``U_A = (λ[k, b] · A[k, 0, :] · γ[b, :])`` flattened to ``(r·n, min)``
(row ``k·n + b``) and ``U_B = B[:max, :n]`` flattened to ``(max, n·r)`` (column ``b·r + k``), and ``ΔW = (α/r) U_B
U_A`` (``(max, min)``; its transpose when ``out < in``). The two flattenings index the rank dimension differently;
that pairing is peft's, kept so adapters move between the libraries.

The bases are drawn once per adapter, sized by the largest target dims (``max``/``min`` of the elementwise largest
``(out, in)``), on a CPU generator seeded with ``projection_prng_key`` (``A`` first, then ``B``), as peft draws them:

* default: Kaiming-uniform (``a = √5``) in bfloat16 — peft draws in bfloat16 wherever accelerate reports bf16
  support (every CPU and bf16-capable GPU) and in float16 on older GPUs, which is what this follows — ``B`` as ``n``
  ``(max, 1, r)`` draws side by side; each tensor is then divided by its standard deviation;
* ``sparse`` / ``very_sparse``: uniform draws turned into ``{-1, 0, 1}`` with ``P(±1) = 1/(2s)`` each (Achlioptas's
  sparse projections; ``s = 3``, or ``s = √min`` for ``very_sparse``, which wins when both are set), then divided by
  their standard deviation.

Init: ``init_weights=True`` gives ``Λ = 0`` (the base model) and ``Γ = 1/max(n, min)``; ``False`` gives
``Λ ~ N(0, 1)`` and ``Γ = 1/max(in, out)``, as in peft. Saved keys: ``<module>.randlora_lambda`` /
``randlora_gamma``, and with ``save_projection`` the bases as ``base_model.randlora_A`` / ``randlora_B`` and, as peft
writes them, again under every layer (``<module>.randlora_A`` / ``_B``, the same tensors); loading reads the
model-level copy. Every RandLoRA adapter of a model draws its own bases, from the same
``projection_prng_key`` and with the same ``save_projection`` (peft refuses others).

Layer types: ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``), as in peft.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, ConfigError
from ..registry import LayerMethod
from ._projections import SeededTensors, draw, existing, max_features
from .common import (
    FactoredDelta, check_dropout, check_scale, check_seed, check_size, layer_features, record_fan_in_fan_out,
)

__all__ = ["RandLoraConfig"]  # exported from deltatune


@dataclass
class RandLoraConfig(LayerConfig):
    """Configuration of a RandLoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (``exclude_modules`` excepted: peft's ``RandLoraConfig`` has no such field).

    Attributes:
        r: Rank of each random basis; a layer uses ``⌈min(in, out)/r⌉`` of them, so a larger ``r`` means fewer
            bases and fewer trainable parameters.
        projection_prng_key: Seed of the CPU generator that draws the bases.
        save_projection: Save the bases with the adapter (safe everywhere); ``False`` regenerates them from
            ``projection_prng_key``.
        sparse: Ternary sparse bases (``P(±1) = 1/6`` each).
        very_sparse: Sparser ternary bases (``P(±1) = 1/(2√min)`` each); takes precedence over ``sparse``.
        randlora_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Weight stored ``(in, out)``. Set from the target type (``Conv1D``: ``True``, ``Linear``:
            ``False``), as peft does; deltatune reads the layout from the layer type.
        randlora_alpha: ``α``; the update is scaled by ``α / r`` (peft's default 640 is 20 × its default ``r``).
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"randlora_only"`` (biases of adapted
            layers).
        init_weights: ``True``: ``Λ = 0``, the base model. ``False``: ``Λ ~ N(0, 1)``, a non-zero start.
    """

    peft_type: PeftType = field(default=PeftType.RANDLORA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_seed("projection_prng_key", self.projection_prng_key)
        check_dropout("randlora_dropout", self.randlora_dropout)
        check_scale("randlora_alpha", self.randlora_alpha)
        if self.bias not in ("none", "all", "randlora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'randlora_only', got {self.bias!r}")


def _num_bases(min_dim: int, r: int) -> int:
    """``⌈min/r⌉``: enough rank-``r`` bases for a full-rank sum."""
    return -(-min_dim // r)


def _draw_dtype() -> torch.dtype:
    """The dtype peft draws the dense bases in: bfloat16 unless a CUDA device without bf16 support is present."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _dense_bases(r: int, n: int, min_dim: int, max_dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    dtype = _draw_dtype()

    def kaiming(*shape: int) -> torch.Tensor:
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5), generator=generator)

    a = kaiming(r, 1, min_dim)
    b = torch.cat([kaiming(max_dim, 1, r) for _ in range(n)], dim=1)
    return {"randlora_A": a / a.std(), "randlora_B": b / b.std()}


def _sparse_bases(r: int, n: int, min_dim: int, max_dim: int, generator: torch.Generator,
                  sparsity: float) -> dict[str, torch.Tensor]:
    def ternary(*shape: int) -> torch.Tensor:
        u = torch.rand(shape, generator=generator)
        t = torch.zeros(shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        return t

    a, b = ternary(r, 1, min_dim), ternary(max_dim, n, r)
    return {"randlora_A": a / a.std(), "randlora_B": b / b.std()}


class RandLoraBases(SeededTensors):
    """One adapter's frozen ``randlora_A`` ``(r, 1, min)`` and ``randlora_B`` ``(max, n, r)``."""


def make_bases(config: RandLoraConfig, bases: Mapping[str, nn.Module],
               shared: Mapping[str, nn.Module]) -> RandLoraBases:
    """The adapter's own random bases, drawn from ``projection_prng_key`` (see the module docstring).

    Raises:
        ConfigError: ``projection_prng_key`` or ``save_projection`` differ from the model's other RandLoRA adapters'.
    """
    other = existing(shared, RandLoraBases)
    if other is not None:
        other.check_agrees("RandLoRA", config)
    largest_in, largest_out = max_features(bases)
    min_dim, max_dim = min(largest_in, largest_out), max(largest_in, largest_out)
    n = _num_bases(min_dim, config.r)

    def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
        if config.very_sparse:
            return _sparse_bases(config.r, n, min_dim, max_dim, generator, math.sqrt(min_dim))
        if config.sparse:
            return _sparse_bases(config.r, n, min_dim, max_dim, generator, 3)
        return _dense_bases(config.r, n, min_dim, max_dim, generator)

    shapes = {"randlora_A": (config.r, 1, min_dim), "randlora_B": (max_dim, n, config.r)}
    return RandLoraBases(draw(bases, shapes, config.projection_prng_key, sample), config.projection_prng_key,
                         config.save_projection)


class RandLoraDelta(FactoredDelta):
    """``ΔW = (α/r) U_B U_A`` (transposed when ``out < in``) from the shared bases and this layer's ``Λ``, ``Γ``."""

    def __init__(self, base_layer: nn.Module, bases: RandLoraBases, config: RandLoraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        self.min_dim, self.max_dim = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        n = _num_bases(self.min_dim, config.r)
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, n))
        self.randlora_gamma = nn.Parameter(torch.zeros(n, self.min_dim))
        self.scaling = config.randlora_alpha / config.r
        self.dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        # A plain reference, not a submodule: the bases are saved and moved once, with the model's shared state.
        object.__setattr__(self, "bases", bases)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lam, gamma = self.randlora_lambda, self.randlora_gamma  # (r, n), (n, min)
        n = lam.shape[1]
        a = self.bases.randlora_A[:, :, : self.min_dim].to(device=lam.device, dtype=lam.dtype)  # (r, 1, min)
        b = self.bases.randlora_B[: self.max_dim, :n].to(device=lam.device, dtype=lam.dtype)  # (max, n, r)
        u_a = (lam[:, :, None] * a * gamma[None]).flatten(0, 1)  # (r·n, min), row k·n + b
        u_b = b.flatten(1)  # (max, n·r), column b·r + k
        if self.min_dim == self.in_features:
            return u_a, u_b  # x -> (r·n) -> out
        return u_b.T, u_a.T  # out < in: x (in = max) -> (n·r) -> out (= min)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bases={self.randlora_lambda.shape[1]}"

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """``Λ``, ``Γ`` and, with ``save_projection``, peft's per-layer copy of the shared bases."""
        state = super().saved_state_dict()
        if self.bases.save_projection:
            state.update({k: v.detach().clone() for k, v in self.bases.state_dict().items()})
        return state

    def state_from_saved(
        self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The per-layer copies of the shared bases checked against the file's model-level ones, which load them.

        Raises:
            AdapterLoadError: a per-layer copy without a model-level one, or differing from it.
        """
        state = dict(saved)
        for key in ("randlora_A", "randlora_B"):
            if key not in state:
                continue
            copy = state.pop(key)
            if key not in shared:
                raise AdapterLoadError(f"{key}: a per-layer copy of the shared bases, but the file has no "
                                       f"'base_model.{key}' (nor does its config save them)")
            if copy.dtype != shared[key].dtype or not torch.equal(copy, shared[key]):
                raise AdapterLoadError(f"{key}: this per-layer copy of the shared bases differs from "
                                       f"'base_model.{key}'; the file is inconsistent")
        return state


def make_delta(config: RandLoraConfig, base_layer: nn.Module, name: str, bases: RandLoraBases) -> RandLoraDelta:
    """Build and initialise the RandLoRA delta of ``base_layer`` (module ``name``) on the adapter's ``bases``."""
    delta = RandLoraDelta(base_layer, bases, config)
    delta.to(device=base_layer.weight.device, dtype=bases.randlora_A.dtype)
    if base_layer.weight.device.type != "meta":
        with torch.no_grad():
            if config.init_weights:
                delta.randlora_lambda.zero_()
                delta.randlora_gamma.fill_(1 / max(delta.randlora_gamma.shape))
            else:
                delta.randlora_lambda.normal_()
                delta.randlora_gamma.fill_(1 / delta.max_dim)
    return delta


METHOD = LayerMethod(
    config_class=RandLoraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    resolve_config=record_fan_in_fan_out,
    make_shared=make_bases,
)

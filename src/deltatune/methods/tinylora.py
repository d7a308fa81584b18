"""TinyLoRA: a LoRA-XS core ``R`` spanned by fixed random matrices, weighted by a tiny trainable vector.

Morris et al., 2026, "Learning to Reason in 13 Parameters" (arXiv:2602.04118), §3: as in LoRA-XS, the update lives
between the frozen top-``r`` singular factors of the base weight, ``ΔW = B R A``; ``R`` is not trained itself but
built from ``u`` fixed random ``r × r`` matrices ``P_i`` and a trainable vector ``v``, which several layers may share
(``weight_tying``), so an adapter can have as few as ``u`` parameters:

    W = U S Vᵀ,  A = √S_r V_rᵀ (r, in),  B = U_r √S_r (out, r),  R = Σ_i v_i P_i (r, r),  Δy = B R A dropout(x)

``r`` is capped at ``min(out, in)``; the SVD is float32 (``torch.linalg.svd``) of the weight in ``(out, in)`` layout.
``P_i ~ N(0, 1/r)`` from a CPU generator seeded with ``projection_seed + layer index`` (the target's position in model
order), as peft draws them. ``weight_tying`` ``t``: the ``n`` targets form ``max(1, round(n (1 - t)))`` groups of
consecutive targets (``⌊n / groups⌋`` each, the last taking the rest), one ``v`` per group. Init (peft's):
``v = 0`` (the base model); ``"uniform"``: ``U(-init_v_bound, init_v_bound)``; ``False``: peft leaves ``v``
uninitialised memory, here it is zero. On an ``nn.Embedding`` (weight ``(num, dim)``) ``B`` is ``(num, r)``, the
lookup ``B[ids]`` is dropped out, then ``R`` and ``A`` apply.

Saved keys, peft's: ``base_model.tinylora_v.<group>`` ``(u,)``; per layer ``<module>.tinylora_A`` / ``tinylora_B``
(the SVD factors, always saved, and read back from a file) and, with ``save_projection``, ``<module>.tinylora_P``
``(u, r, r)``; without it ``P`` is regenerated from the seed. All TinyLoRA adapters of one model must agree on
``save_projection`` (as in peft). Layer types: ``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding``.
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
from .common import (
    adapter_dtype, check_dropout, check_scale, check_seed, check_size, place_delta, record_fan_in_fan_out,
)

__all__ = ["TinyLoraConfig"]  # exported from deltatune


@dataclass
class TinyLoraConfig(LayerConfig):
    """Configuration of a TinyLoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (peft's ``TinyLoraConfig`` has no ``exclude_modules``).

    Attributes:
        r: Rank of the frozen SVD factors (at most ``min(out, in)`` per layer).
        u: Length of each trainable vector ``v`` (the number of random matrices ``P_i``).
        weight_tying: In ``[0, 1]``: ``0`` one ``v`` per layer, ``1`` one ``v`` for all, in between groups of
            consecutive layers.
        projection_seed: Seed of the ``P_i`` (plus the layer's index).
        save_projection: Save the ``P_i`` in the file (else they are regenerated from the seed).
        init_v_bound: Bound of ``v``'s uniform init.
        tinylora_dropout: Dropout on the adapter's input (on embeddings: on the looked-up ``B`` rows).
        fan_in_fan_out: Weight stored ``(in, out)``; set from the target type (``Conv1D``), as peft records it.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"tinylora_only"``.
        init_weights: ``True``: ``v = 0``. ``"uniform"``: ``U(-init_v_bound, init_v_bound)``. ``False``: zero here
            (peft leaves the memory uninitialised).
    """

    peft_type: PeftType = field(default=PeftType.TINYLORA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("u", self.u)
        if isinstance(self.weight_tying, bool) or not isinstance(self.weight_tying, (int, float)) \
                or not 0.0 <= self.weight_tying <= 1.0:
            raise ConfigError(f"weight_tying must be a number in [0, 1], got {self.weight_tying!r}")
        check_seed("projection_seed", self.projection_seed)
        check_scale("init_v_bound", self.init_v_bound)
        check_dropout("tinylora_dropout", self.tinylora_dropout)
        if self.bias not in ("none", "all", "tinylora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'tinylora_only', got {self.bias!r}")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "uniform"):
            raise ConfigError(f"init_weights must be True, False or 'uniform', got {self.init_weights!r}")
        for name in ("save_projection", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")


def group_of(index: int, count: int, weight_tying: float) -> int:
    """The ``v`` group of the ``index``-th of ``count`` targets (peft's rule, Python's ``round``)."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    return min(index // max(1, count // groups), groups - 1)


class SharedVectors(nn.Module):
    """The adapter's trainable vectors ``tinylora_v.<group>`` ``(u,)``, held once in the model's shared state (saved
    as ``base_model.tinylora_v.<group>``), and each target's ``(index, group)``."""

    def __init__(self, vectors: dict[str, torch.Tensor], places: dict[str, tuple[int, int]], save_projection: bool
                 ) -> None:
        super().__init__()
        self.tinylora_v = nn.ParameterDict({k: nn.Parameter(v) for k, v in vectors.items()})
        self.places = places
        self.save_projection = save_projection


def make_vectors(config: TinyLoraConfig, bases: Mapping[str, nn.Module], shared: Mapping[str, nn.Module]
                 ) -> SharedVectors:
    """One ``v`` per group of targets (targets in model order), initialised from torch's global generator."""
    for other in shared.values():
        if isinstance(other, SharedVectors) and other.save_projection != config.save_projection:
            raise ConfigError(f"save_projection={config.save_projection} differs from another TinyLoRA adapter's on "
                              f"this model; all must save their projections or none (as in peft)")
    weight = next(iter(bases.values())).weight
    places = {name: (i, group_of(i, len(bases), config.weight_tying)) for i, name in enumerate(bases)}
    vectors = {}
    for group in sorted({g for _, g in places.values()}):
        v = torch.zeros(config.u, device=weight.device, dtype=adapter_dtype(weight.dtype))
        if config.init_weights == "uniform" and weight.device.type != "meta":
            with torch.no_grad():
                v.uniform_(-config.init_v_bound, config.init_v_bound)
        vectors[str(group)] = v
    return SharedVectors(vectors, places, config.save_projection)


class TinyLoraDelta(Delta):
    """``Δy = B R A x`` (embedding: ``B[ids] R A``) with ``R = Σ_i v_i P_i`` from the shared ``v`` of its group."""

    def __init__(self, base_layer: nn.Module, shared: SharedVectors, group: int, r: int, u: int,
                 save_projection: bool, dropout: float) -> None:
        super().__init__()
        rows, cols = _oriented_shape(base_layer)
        self.register_buffer("tinylora_A", torch.zeros(r, cols))  # saved and loaded, as in peft
        self.register_buffer("tinylora_B", torch.zeros(rows, r))
        self.register_buffer("tinylora_P", torch.zeros(u, r, r), persistent=save_projection)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embedding = isinstance(base_layer, nn.Embedding)
        self.transposed = isinstance(base_layer, Conv1D)
        self.group = str(group)
        # A plain reference, not a submodule: v is saved, trained and moved once, with the shared state.
        object.__setattr__(self, "shared", shared)

    def core(self) -> torch.Tensor:
        """``R`` ``(r, r)``."""
        v = self.shared.tinylora_v[self.group]
        return torch.einsum("i,ijk->jk", v, self.tinylora_P.to(device=v.device, dtype=v.dtype))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        r_core, a, b = self.core(), self.tinylora_A, self.tinylora_B
        if self.embedding:
            update = self.dropout(F.embedding(x, b)) @ r_core.to(b.dtype) @ a  # (..., dim)
        else:
            hidden = F.linear(F.linear(self.dropout(x.to(a.dtype)), a), r_core.to(a.dtype))  # (..., r)
            update = F.linear(hidden, b)  # (..., out)
        return accumulate(base_out, update.to(base_out.dtype), 1.0)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        weight = self.tinylora_B @ self.core().to(self.tinylora_A.dtype) @ self.tinylora_A  # (out, in) / (num, dim)
        return (weight.T if self.transposed else weight).to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.tinylora_A.shape[0]}, u={self.tinylora_P.shape[0]}, group={self.group}"


def _oriented_shape(base_layer: nn.Module) -> tuple[int, int]:
    """The base weight's shape as the SVD sees it: ``(out, in)`` (``Conv1D`` transposed), ``(num, dim)``."""
    rows, cols = base_layer.weight.shape
    return (cols, rows) if isinstance(base_layer, Conv1D) else (rows, cols)


def make_delta(config: TinyLoraConfig, base_layer: nn.Module, name: str, shared: SharedVectors) -> TinyLoraDelta:
    """Build the TinyLoRA delta of ``base_layer`` (module ``name``): its SVD factors and seeded projections."""
    index, group = shared.places[name]
    r = min(config.r, *_oriented_shape(base_layer))
    delta = TinyLoraDelta(base_layer, shared, group, r, config.u, config.save_projection, config.tinylora_dropout)
    weight = base_layer.weight

    def init(delta: TinyLoraDelta) -> None:
        w = (weight.T if isinstance(base_layer, Conv1D) else weight).detach()
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = s[:r].to(w.dtype).sqrt()  # √S split between the factors, as peft does
        delta.tinylora_A.copy_(root.unsqueeze(1) * vh[:r].to(w.dtype))
        delta.tinylora_B.copy_(u[:, :r].to(w.dtype) * root.unsqueeze(0))
        generator = torch.Generator().manual_seed(config.projection_seed + index)
        delta.tinylora_P.copy_(torch.normal(0.0, 1.0 / r**0.5, size=(config.u, r, r), generator=generator))

    return place_delta(delta, weight, init)


METHOD = LayerMethod(
    config_class=TinyLoraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D, nn.Embedding),
    resolve_config=record_fan_in_fan_out,
    make_shared=make_vectors,
)

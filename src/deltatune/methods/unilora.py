"""Uni-LoRA: every LoRA factor of the model read out of one shared trainable vector.

Li et al., 2025, "Uni-LoRA: One Vector Is All You Need" (arXiv:2506.00799), §3: all LoRA parameters of an adapter,
flattened into one vector of length ``D``, are the image ``P θ_d`` of a single trainable vector ``θ_d`` (length
``d ≪ D``) under a fixed random projection ``P`` whose rows are one-hot with a ``1/√n_j`` weight, ``n_j`` the number
of positions that read entry ``j`` (an isometry, §3.3). Per layer:

    A[i, k] = θ_d[idx_A[i, k]] / √n(idx_A[i, k])     (r, in)        B likewise     (out, r)
    Δy = B A dropout(x)

The assignment is peft's balanced one (each entry read ``⌊D/d⌋`` or ``⌈D/d⌉`` times): ``⌊D/d⌋`` copies of
``0..d-1``, then ``D mod d`` distinct extra entries drawn with ``numpy.random.default_rng(proj_seed).choice``, the
whole shuffled by the same generator; position ``p`` of the flattened space goes to the layers in model order, each
taking its ``A`` (row-major) then its ``B``. It is regenerated from ``proj_seed`` (numpy's generator, so bit-identical
to peft's) unless ``save_indices`` writes it to the file. Init: ``θ_d ~ U(-init_theta_d_bound, init_theta_d_bound)``
(``init_weights=False``: ``N(0, 1)``), from torch's global generator.

Saved keys, peft's: ``base_model.unilora_theta_d`` ``(d,)``; with ``save_indices``, also per layer
``<module>.unilora_indices_A`` / ``_B`` (int64) and ``<module>.unilora_scales_A`` / ``_B``. Layer types:
``nn.Linear`` and transformers ``Conv1D``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, ConfigError
from ..registry import LayerMethod
from .common import (
    FactoredDelta, adapter_dtype, check_dropout, check_scale, check_size, layer_features, record_fan_in_fan_out,
)

__all__ = ["UniLoraConfig"]  # exported from deltatune


@dataclass
class UniLoraConfig(LayerConfig):
    """Configuration of a Uni-LoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (peft's ``UniLoraConfig`` has no ``exclude_modules``).

    Attributes:
        r: Rank of every layer's ``A`` and ``B``.
        proj_seed: Seed of numpy's generator that assigns the entries of ``θ_d`` to the factors' positions.
        theta_d_length: Length ``d`` of the shared trainable vector ``θ_d``.
        unilora_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Weight stored ``(in, out)``; set from the target type (``Conv1D``), as peft records it.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"unilora_only"``.
        init_theta_d_bound: ``θ_d ~ U(-bound, bound)`` at init.
        init_weights: ``True``: the uniform init. ``False``: ``θ_d ~ N(0, 1)`` (tests).
        save_indices: Also save each layer's assignment and scales, so the file does not depend on regenerating
            them.
    """

    peft_type: PeftType = field(default=PeftType.UNILORA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("theta_d_length", self.theta_d_length)
        seed = self.proj_seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**128:
            raise ConfigError(f"proj_seed must be a non-negative integer below 2**128 (a numpy generator seed), got "
                              f"{seed!r}")
        check_dropout("unilora_dropout", self.unilora_dropout)
        check_scale("init_theta_d_bound", self.init_theta_d_bound)
        if self.init_theta_d_bound <= 0:
            raise ConfigError(f"init_theta_d_bound must be positive, got {self.init_theta_d_bound!r}")
        if self.bias not in ("none", "all", "unilora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'unilora_only', got {self.bias!r}")
        for name in ("init_weights", "save_indices", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear" and (
                self.layers_to_transform is not None or self.layers_pattern is not None):
            raise ConfigError("layers_to_transform / layers_pattern cannot be used when target_modules is a regex "
                              "string (as in peft)")


def balanced_assignment(count: int, length: int, seed: int) -> torch.Tensor:
    """``(count,)`` int64 entries of ``θ_d`` for the flattened factors: peft's balanced, seeded assignment (see the
    module docstring), drawn with numpy's ``default_rng(seed)`` exactly as peft draws it."""
    import numpy as np  # a dependency of transformers; only Uni-LoRA needs it

    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


class ThetaVector(nn.Module):
    """The adapter's trainable ``unilora_theta_d`` ``(d,)``, held once in the model's shared state (saved as
    ``base_model.unilora_theta_d``), and the assignment of its entries to each target, made once for all targets
    (it depends on every target's size and on their order) and handed to each delta as it is built."""

    def __init__(self, theta: torch.Tensor, assignments: dict[str, tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.unilora_theta_d = nn.Parameter(theta)
        self.assignments = assignments  # name -> (indices_A, indices_B, scales_A, scales_B), consumed by make_delta


def make_theta(config: UniLoraConfig, bases: Mapping[str, nn.Module], shared: Mapping[str, nn.Module]
               ) -> ThetaVector:
    """A new ``θ_d`` for the adapter (each adapter has its own, as in peft) and the targets' assignments."""
    weight = next(iter(bases.values())).weight
    dtype, length, r = adapter_dtype(weight.dtype), config.theta_d_length, config.r
    shapes = {}
    for name, base in bases.items():
        in_features, out_features = layer_features(base)
        shapes[name] = ((r, in_features), (out_features, r))
    total = sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes.values())
    flat = balanced_assignment(total, length, config.proj_seed)
    inv_sqrt = torch.zeros(length)
    counts = torch.bincount(flat, minlength=length)
    inv_sqrt[counts > 0] = counts[counts > 0].float().rsqrt()
    assignments, start = {}, 0
    for name, (shape_a, shape_b) in shapes.items():
        index_a = flat[start:start + shape_a[0] * shape_a[1]].view(shape_a)
        start += index_a.numel()
        index_b = flat[start:start + shape_b[0] * shape_b[1]].view(shape_b)
        start += index_b.numel()
        assignments[name] = (index_a, index_b, inv_sqrt[index_a], inv_sqrt[index_b])
    theta = torch.empty(length, device=weight.device, dtype=dtype)
    if weight.device.type != "meta":  # a dry run only counts sizes
        with torch.no_grad():
            if config.init_weights:
                theta.uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
            else:
                theta.normal_()
    return ThetaVector(theta, assignments)


class UniLoraDelta(FactoredDelta):
    """``Δy = B A x`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` gathered from the shared ``θ_d`` and scaled."""

    def __init__(self, base_layer: nn.Module, theta: ThetaVector, assignment: tuple[torch.Tensor, ...],
                 config: UniLoraConfig) -> None:
        super().__init__()
        self.transposed = isinstance(base_layer, Conv1D)
        self.dropout = nn.Dropout(config.unilora_dropout) if config.unilora_dropout > 0 else nn.Identity()
        persistent = config.save_indices  # saved only with save_indices, as in peft
        for key, value in zip(("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
                              assignment):
            self.register_buffer(key, value.clone(), persistent=persistent)
        # A plain reference, not a submodule: θ_d is saved, trained and moved once, with the shared state.
        object.__setattr__(self, "theta", theta)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.theta.unilora_theta_d.to(self.unilora_scales_A.device)
        a = theta[self.unilora_indices_A] * self.unilora_scales_A.to(theta.dtype)
        b = theta[self.unilora_indices_B] * self.unilora_scales_B.to(theta.dtype)
        return a, b

    def state_from_saved(self, saved: dict[str, torch.Tensor], shared: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The file's tensors, once its saved indices (``save_indices``) are known to lie inside ``θ_d``."""
        length = self.theta.unilora_theta_d.shape[0]
        for key in ("unilora_indices_A", "unilora_indices_B"):
            index = saved.get(key)
            if index is None or tuple(index.shape) != tuple(getattr(self, key).shape):
                continue  # absent or mis-shaped: the loader's own checks say so
            if index.is_floating_point() or (index.numel() and not (0 <= index.min() and index.max() < length)):
                raise AdapterLoadError(f"{key} must hold integer entries of theta_d in [0, {length}); the file is "
                                       f"corrupt or was not written for this config")
        return saved

    def extra_repr(self) -> str:
        r, in_features = self.unilora_indices_A.shape
        return f"in={in_features}, out={self.unilora_indices_B.shape[0]}, r={r}"


def make_delta(config: UniLoraConfig, base_layer: nn.Module, name: str, theta: ThetaVector) -> UniLoraDelta:
    """Build the Uni-LoRA delta of ``base_layer`` (module ``name``) on the adapter's ``θ_d``."""
    delta = UniLoraDelta(base_layer, theta, theta.assignments.pop(name), config)
    return delta.to(device=base_layer.weight.device, dtype=theta.unilora_theta_d.dtype)


METHOD = LayerMethod(
    config_class=UniLoraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    resolve_config=record_fan_in_fan_out,
    make_shared=make_theta,
)

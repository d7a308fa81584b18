"""SHiRA: train a fixed, sparse set of the base weight's own entries.

Bhardwaj et al., 2024, "Sparse High Rank Adapters" (arXiv:2406.13175), §3: the update ``ΔW`` is non-zero only on a
mask of ``K`` entries chosen before training, so it is high-rank yet touches ~1-2% of the weight, and switching
adapters rewrites only those entries. As in peft, ``K = r · (in + out)`` (a LoRA of rank ``r``'s parameter count)
and the mask is random: ``randperm(out · in)`` drawn from a CPU generator (seeded with ``random_seed``, or torch's
default seed for ``None``, as peft draws it), its first ``K`` flat positions in the ``(out, in)`` weight, in
row-major order. ``shira_weight[k]`` is the update at the ``k``-th masked position:

    Δy[o] = Σ_k [rows_k = o] · shira_weight[k] · x[cols_k]

computed as a gather and an ``index_add`` (``K`` products per row, no dense ``out × in`` update); merged
``W[rows, cols] += shira_weight``.

Saved keys, peft's: ``<module>.shira_weight`` ``(K,)`` and ``<module>.shira_indices`` ``(2, K)`` int32 (rows, then
columns), so a file carries its mask and loads whatever seed made it; loading checks that every index lies inside
the weight. ``init_weights=True``: zero (the base model); ``False``: ``N(0, 1)``, for tests.

Layer type: ``nn.Linear``, as in peft. peft's ``mask_type`` other than ``"random"`` needs a Python mask function set
on the config object (``config.mask_fn``), which a saved config cannot carry; it is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, ConfigError, TargetError
from ..kernels import add_sparse
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_size, place_delta

__all__ = ["ShiraConfig"]  # exported from deltatune


@dataclass
class ShiraConfig(LayerConfig):
    """Configuration of a SHiRA adapter (peft's field names). Shared targeting fields: ``target_modules`` and
    ``modules_to_save`` (see ``LayerConfig``); peft's ``ShiraConfig`` has no other.

    Attributes:
        r: Sets the number of trained entries per layer, ``r · (in + out)`` (as many as a rank-``r`` LoRA); it does
            not limit the update's rank. ``r · (in + out)`` may not exceed ``in · out``.
        mask_type: ``"random"``: a random mask drawn from ``random_seed`` (peft's only built-in mask).
        random_seed: Seed of the CPU generator that draws the mask; ``None``: torch's default generator seed (as in
            peft, so also reproducible).
        fan_in_fan_out: peft's field; SHiRA adapts no layer stored ``(in, out)``, so it has no effect.
        init_weights: ``True``: zero (the base model). ``False``: ``N(0, 1)`` entries, for tests.
    """

    peft_type: PeftType = field(default=PeftType.SHIRA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules", "layers_to_transform", "layers_pattern")
    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        if self.mask_type != "random":
            raise ConfigError(
                f"mask_type={self.mask_type!r} is not supported: only 'random' (peft's other mask types need a Python "
                f"mask function set on the config object, which no saved config carries)"
            )
        seed = self.random_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64):
            raise ConfigError(
                f"random_seed must be None or an integer in [-2**63, 2**64) (a torch generator seed), got {seed!r}"
            )
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (zero) or False (random), got {self.init_weights!r}")


def random_mask_indices(out_features: int, in_features: int, k: int, seed: int | None) -> torch.Tensor:
    """``(2, k)`` int32 rows and columns of peft's random mask: the first ``k`` of a CPU ``randperm`` of the
    ``out · in`` flat positions, sorted (row-major)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:k].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class ShiraDelta(Delta):
    """``Δy = x ΔWᵀ`` with ``ΔW`` non-zero only at ``shira_indices``."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int) -> None:
        super().__init__()
        self.shira_weight = nn.Parameter(torch.zeros(indices.shape[1]))
        self.register_buffer("shira_indices", indices)  # saved: the file carries its mask, as in peft
        self.out_features, self.in_features = out_features, in_features

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        rows, cols = self.shira_indices.long()
        return add_sparse(base_out, x, rows, cols, self.shira_weight)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        rows, cols = self.shira_indices.long()
        dense = self.shira_weight.new_zeros(self.out_features, self.in_features)
        return dense.index_put((rows, cols), self.shira_weight, accumulate=True).to(base_layer.weight.dtype)

    def state_from_saved(self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        """The file's tensors unchanged, once its mask is known to lie inside the weight (a wrong shape is left to
        the loader's shape check)."""
        indices = saved.get("shira_indices")
        if indices is None or indices.shape != self.shira_indices.shape:
            return saved
        if indices.is_floating_point() and not torch.equal(indices, indices.round()):  # peft's Windows files: float
            raise AdapterLoadError("shira_indices holds non-integer values; the file is corrupt")
        rows, cols = indices.to(torch.int64)
        if rows.numel() and not (0 <= rows.min() and rows.max() < self.out_features and 0 <= cols.min()
                                 and cols.max() < self.in_features):
            raise AdapterLoadError(
                f"shira_indices points outside the {self.out_features} x {self.in_features} weight; the file is "
                f"corrupt or was not written for this model"
            )
        return saved

    def extra_repr(self) -> str:
        return f"entries={self.shira_weight.shape[0]} of {self.out_features}x{self.in_features}"


def _count(config: ShiraConfig, base_layer: nn.Module) -> int:
    return config.r * (base_layer.in_features + base_layer.out_features)


def check_target(config: ShiraConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer with fewer entries than ``r · (in + out)``.

    Raises:
        TargetError: ``r · (in + out) > in · out``.
    """
    in_features, out_features = base_layer.in_features, base_layer.out_features
    if _count(config, base_layer) > in_features * out_features:
        largest = in_features * out_features // (in_features + out_features)
        raise TargetError(
            f"{name}: r={config.r} asks for r·(in+out) = {_count(config, base_layer)} trained entries, more than its "
            f"{out_features} x {in_features} weight has; use r <= {largest}"
        )


def make_delta(config: ShiraConfig, base_layer: nn.Module, name: str) -> ShiraDelta:
    """Build the SHiRA delta of ``base_layer`` (module ``name``) on peft's random mask."""
    weight = base_layer.weight
    out_features, in_features = base_layer.out_features, base_layer.in_features
    k = _count(config, base_layer)
    if weight.device.type == "meta":  # a dry run that only counts sizes
        indices = torch.empty(2, k, dtype=torch.int32, device="meta")
    else:
        indices = random_mask_indices(out_features, in_features, k, config.random_seed)
    delta = ShiraDelta(indices, out_features, in_features)
    return place_delta(delta, weight, None if config.init_weights else _randomize)


def _randomize(delta: ShiraDelta) -> None:
    delta.shira_weight.normal_()


METHOD = LayerMethod(
    config_class=ShiraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
)

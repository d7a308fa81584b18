"""MiSS: one trainable shard shared by every block of the weight (peft's successor of Bone).

Kang, "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure" (arXiv:2409.15371, first
released as "Bone: Block-Affine Adaptation of Large Language Models"), §3: split ``W ∈ R^{out×in}`` along its input
into blocks of ``r`` columns and add the same trainable shard to every block. Its forward needs no ``out × in``
update: the input's ``r``-chunks are summed first, ``Δy = (Σ_k x_k) D`` with ``x_k ∈ R^r`` and ``D ∈ R^{r×out}``, so a
layer costs ``r · out`` parameters and one ``r``-wide matmul. Three variants, chosen by ``init_weights`` as in peft:

* balance (``True``, or ``False`` for a random start): ``miss_block`` ``D`` is ``(r, out)``;
  ``ΔW[o, k·r + j] = D[j, o]``. An ``in`` that ``r`` does not divide is zero-padded to a multiple of ``r`` (the last
  block is partial, the merged update its first columns).
* ``"mini"``: ``miss_block`` is ``(r, mini_r)`` and is tiled ``out / mini_r`` times along the output, so the shard is
  shared across output blocks too (``out`` must be a multiple of ``mini_r``).
* ``"bat"`` (Block Affine Transformation, the Bone form): ``miss_block`` ``B`` is ``(out/r, r, r)``, one ``r × r``
  matrix per output block ``i``, and every ``r × r`` block of the weight becomes ``W_ij (I + B_i) + B_i``: the update
  reads the base weight (both dims must be multiples of ``r``). Unmerging inverts it, ``(W'_ij − B_i)(I + B_i)⁻¹``.

All variants start at zero (the base model) with ``init_weights`` other than ``False``, whose ``(r, out)`` block is
Kaiming-uniform (``a = √5``), as in peft. Saved key: ``<module>.miss_block``, peft's. With several ``"bat"`` adapters
active at once, each update here reads the base weight, where peft's forward chains them (one active adapter is exact).

Layer types: ``nn.Linear`` only, as in peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_divides, check_dropout, check_size, place_delta

__all__ = ["MissConfig"]  # exported from deltatune

_VARIANTS = (True, False, "bat", "mini")


@dataclass
class MissConfig(LayerConfig):
    """Configuration of a MiSS adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Shard size along the input (balance, mini), or the block size of ``"bat"``; at most ``in_features``.
        miss_dropout: Dropout on the adapter's input during training.
        mini_r: Width of the ``"mini"`` shard along the output; must divide every target's ``out_features``.
        init_weights: The variant: ``True`` (balance, zero init), ``False`` (balance, random init, for tests),
            ``"bat"`` or ``"mini"`` (see the module docstring).
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"MiSS_only"`` / ``"miss_only"`` (biases of
            adapted layers).
    """

    peft_type: PeftType = field(default=PeftType.MISS, init=False)
    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("mini_r", self.mini_r)
        check_dropout("miss_dropout", self.miss_dropout)
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in _VARIANTS):
            raise ConfigError(f"init_weights must be True, False, 'bat' or 'mini', got {self.init_weights!r}")
        if self.bias not in ("none", "all", "MiSS_only", "miss_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'MiSS_only', got {self.bias!r}")


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """``(out, in) -> (out/r, in/r, r, r)``: block ``[i, j]`` is rows ``i·r…``, columns ``j·r…``."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_blocks`."""
    n_out, n_in, r, _ = blocks.shape
    return blocks.transpose(1, 2).reshape(n_out * r, n_in * r)


class MissDelta(Delta):
    """Balance and mini: ``Δy = (Σ_k x_k) D`` with ``D`` the ``(r, out)`` shard (mini: tiled along the output)."""

    def __init__(self, shape: tuple[int, ...], out_features: int, dropout: float) -> None:
        super().__init__()
        self.miss_block = nn.Parameter(torch.zeros(shape))
        self.out_features = out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def r(self) -> int:
        return self.miss_block.shape[0]

    def shard(self) -> torch.Tensor:
        """``D``: ``(r, out)``."""
        block = self.miss_block
        return block.repeat(1, self.out_features // block.shape[1])

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        d = self.shard()
        x = self.dropout(x.to(d.dtype))
        x = F.pad(x, (0, -x.shape[-1] % self.r))  # (..., in padded to a multiple of r)
        summed = x.unflatten(-1, (-1, self.r)).sum(dim=-2)  # (..., r)
        return base_out + (summed @ d).to(base_out.dtype)  # (..., out)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        in_features = base_layer.weight.shape[1]
        tiled = self.shard().T.repeat(1, -(-in_features // self.r))  # (out, ≥ in): D repeated per input block
        return tiled[:, :in_features].to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"miss_block={tuple(self.miss_block.shape)}"


class MissBat(MissDelta):
    """``"bat"``: every ``r × r`` block ``W_ij`` of the weight becomes ``W_ij (I + B_i) + B_i``."""

    def update(self, weight: torch.Tensor) -> torch.Tensor:
        """``ΔW`` for base weight ``weight``: blocks ``W_ij B_i + B_i``, in the adapter's dtype."""
        b = self.miss_block  # (out/r, r, r)
        blocks = _blocks(weight.to(b.dtype), b.shape[-1])  # (out/r, in/r, r, r)
        return _unblocks(blocks @ b[:, None] + b[:, None])

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        change = self.update(base_layer.weight)  # (out, in)
        return base_out + F.linear(self.dropout(x.to(change.dtype)), change).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.update(base_layer.weight).to(base_layer.weight.dtype)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return (weight.to(self.miss_block.dtype) + self.update(weight)).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        b = self.miss_block[:, None]  # (out/r, 1, r, r)
        eye = torch.eye(b.shape[-1], device=b.device, dtype=b.dtype)
        merged = _blocks(weight.to(b.dtype), b.shape[-1])
        return _unblocks(torch.linalg.solve(eye + b, merged - b, left=False)).to(weight.dtype)  # (W' − B)(I + B)⁻¹


def check_target(config: MissConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer the variant's blocks do not fit, before anything is allocated.

    Raises:
        TargetError: ``r`` above ``in_features``; for ``"bat"`` a dimension ``r`` does not divide; for ``"mini"`` an
            ``out_features`` ``mini_r`` does not divide.
    """
    in_features, out_features = base_layer.in_features, base_layer.out_features
    if config.r > in_features:
        raise TargetError(f"{name}: r={config.r} exceeds its in_features={in_features}; use r <= {in_features}")
    if config.init_weights == "bat":
        check_divides(name, f"r={config.r}", config.r, base_layer, "init_weights='bat' splits the weight into r x r "
                      "blocks")
    if config.init_weights == "mini":
        check_divides(name, f"mini_r={config.mini_r}", config.mini_r, base_layer,
                      "init_weights='mini' tiles the shard along the output", sides=("out",))


def make_delta(config: MissConfig, base_layer: nn.Module, name: str) -> MissDelta:
    """Build the MiSS delta of ``base_layer`` (module ``name``) for the variant ``config.init_weights`` names."""
    out_features, r = base_layer.out_features, config.r
    if config.init_weights == "bat":
        delta: MissDelta = MissBat((out_features // r, r, r), out_features, config.miss_dropout)
    elif config.init_weights == "mini":
        delta = MissDelta((r, config.mini_r), out_features, config.miss_dropout)
    else:
        delta = MissDelta((r, out_features), out_features, config.miss_dropout)
    return place_delta(delta, base_layer.weight, _randomize if config.init_weights is False else None)


def _randomize(delta: MissDelta) -> None:
    nn.init.kaiming_uniform_(delta.miss_block, a=math.sqrt(5))


METHOD = LayerMethod(
    config_class=MissConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
)

"""BD-LoRA, block-diagonal LoRA: one of the two factors is block-diagonal, so a tensor-parallel server needs no
communication for the adapter.

Wang et al., 2025, "Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor Parallel LoRA Serving"
(arXiv 2510.23346), §3: with a layer sharded by columns (q/k/v, up/gate) a block-diagonal ``B`` keeps each shard's
output local; with a layer sharded by rows (o, down) a block-diagonal ``A`` does. With ``n`` blocks:

* block-diagonal ``A``: ``A = diag(A₁ … Aₙ)``, ``Aᵢ`` of shape ``(r/n, in/n)``; ``(Ax)ᵢ = Aᵢ xᵢ`` on the ``i``-th
  chunk of the input;
* block-diagonal ``B``: ``B = diag(B₁ … Bₙ)``, ``Bᵢ`` of shape ``(out/n, r/n)``.

peft's config (``use_bdlora=BdLoraConfig(...)``) names which modules get which form by substring of the module's
full name; its storage keeps only the blocks, stacked: ``lora_A.weight`` ``(r, in/n)`` (block ``i`` in rows
``i·r/n …``) or ``lora_B.weight`` ``(out, r/n)``, which is what is saved. As in peft, a block-diagonal ``A`` starts
Kaiming-uniform (``a = 0``) and a block-diagonal ``B`` at zero, whatever ``init_lora_weights`` says; merging adds the
full block-diagonal product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..targeting import pattern_value
from ._lora_variant import LoraLinearLike, LoraVariant
from .common import check_size

__all__ = ["BdLoraConfig"]


@dataclass
class BdLoraConfig:
    """Which modules get a block-diagonal factor (peft's ``BdLoraConfig``).

    Attributes:
        target_modules_bd_a: Substrings of module names whose ``A`` is block-diagonal (row-sharded layers:
            ``o_proj``, ``down_proj``).
        target_modules_bd_b: Substrings of module names whose ``B`` is block-diagonal (column-sharded layers:
            ``q_proj``, ``k_proj``, ``v_proj``, ``up_proj``, ``gate_proj``).
        nblocks: Number of blocks: the tensor-parallel degree of the server.
        match_strict: Refuse a target that matches neither list (``False``: such a target gets plain LoRA).
    """

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        check_size("use_bdlora.nblocks", self.nblocks)
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)):
                raise ConfigError(f"use_bdlora.{name} must be a list of module-name substrings, got {value!r}")
        both = set(self.target_modules_bd_a or ()) & set(self.target_modules_bd_b or ())
        if both:
            raise ConfigError(f"use_bdlora: {sorted(both)} in both target_modules_bd_a and target_modules_bd_b")


def _side(config: BdLoraConfig, name: str) -> str | None:
    """``"A"``, ``"B"`` or ``None``: which factor of module ``name`` is block-diagonal (peft: ``pattern in name``)."""
    in_a = any(p in name for p in config.target_modules_bd_a or ())
    in_b = any(p in name for p in config.target_modules_bd_b or ())
    if in_a and in_b:
        raise TargetError(f"{name}: use_bdlora matches it in both target_modules_bd_a and target_modules_bd_b")
    return "A" if in_a else "B" if in_b else None


def _block_product(x: torch.Tensor, weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """``x @ diag(W₁ … Wₙ)ᵀ`` for stacked blocks ``weight`` ``(n·p, q)``: chunk ``i`` of ``x`` ``(..., n·q)`` meets
    block ``i`` only; returns ``(..., n·p)``."""
    blocks = weight.view(nblocks, -1, weight.shape[1])  # (n, p, q)
    chunks = x.unflatten(-1, (nblocks, -1))  # (..., n, q)
    return torch.einsum("...nq,npq->...np", chunks, blocks).flatten(-2)


def _block_diagonal(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The full matrix ``diag(W₁ … Wₙ)`` ``(n·p, n·q)`` of stacked blocks ``(n·p, q)``."""
    return torch.block_diag(*weight.chunk(nblocks))


class BdloraVariant(LoraVariant):
    """A LoRA delta with a block-diagonal ``A`` or ``B`` (see the module docstring)."""

    field = "use_bdlora"
    sub_config = BdLoraConfig

    def __init__(self, side: str | None, nblocks: int) -> None:
        self.side, self.nblocks = side, nblocks

    @classmethod
    def check_target(cls, config: Any, base_layer: nn.Module, name: str) -> None:
        bd: BdLoraConfig = config.use_bdlora
        side = _side(bd, name)
        if side is None:
            if bd.match_strict:
                raise TargetError(f"{name}: matches neither use_bdlora.target_modules_bd_a nor target_modules_bd_b; "
                                  f"add it to one, or set match_strict=False to give it plain LoRA")
            return
        if not isinstance(base_layer, nn.Linear):
            raise TargetError(f"{name}: use_bdlora supports nn.Linear layers only, not {type(base_layer).__name__}")
        r = pattern_value(config.rank_pattern, name, config.r)
        sizes = {"r": r, "in_features" if side == "A" else "out_features":
                 base_layer.in_features if side == "A" else base_layer.out_features}
        bad = {k: v for k, v in sizes.items() if v % bd.nblocks}
        if bad:
            raise TargetError(f"{name}: use_bdlora with nblocks={bd.nblocks} needs {', '.join(bad)} divisible by it "
                              f"(block-diagonal {side}), got {bad}")

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> BdloraVariant:
        bd: BdLoraConfig = config.use_bdlora
        side = _side(bd, name)
        like = delta.lora_A.weight
        if side == "A":  # (r, in/n), Kaiming-uniform as peft's block-diagonal layer
            delta.lora_A = nn.Linear(like.shape[1] // bd.nblocks, delta.r, bias=False, device=like.device,
                                     dtype=like.dtype)
            if like.device.type != "meta":
                with torch.no_grad():
                    nn.init.kaiming_uniform_(delta.lora_A.weight)
        elif side == "B":  # (out, r/n), zero
            out = delta.lora_B.weight.shape[0]
            delta.lora_B = nn.Linear(delta.r // bd.nblocks, out, bias=False, device=like.device, dtype=like.dtype)
            if like.device.type != "meta":
                with torch.no_grad():
                    nn.init.zeros_(delta.lora_B.weight)
        return cls(side, bd.nblocks)

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        a, b = delta.lora_A.weight, delta.lora_B.weight
        xa = _block_product(x, a, self.nblocks) if self.side == "A" else x @ a.T  # (..., r)
        return _block_product(xa, b, self.nblocks) if self.side == "B" else xa @ b.T  # (..., out)

    def lora_weight(self, delta: LoraLinearLike) -> torch.Tensor:
        a, b = delta.lora_A.weight, delta.lora_B.weight
        if self.side == "A":
            a = _block_diagonal(a, self.nblocks)  # (r, in)
        elif self.side == "B":
            b = _block_diagonal(b, self.nblocks)  # (out, r)
        return b @ a

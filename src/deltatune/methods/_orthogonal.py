"""What the orthogonal methods share (OFT, BOFT): Cayley blocks, applying a block-diagonal matrix without building
it, and multiplicative block dropout. Rotations act on rows: ``t @ diag(blocks)``."""

from __future__ import annotations

import torch


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """(Near-)orthogonal ``(n, b, b)`` blocks from skew-symmetric ``q``: the exact Cayley transform
    ``(I − Q)(I + Q)⁻¹`` for ``neumann_terms=None``, else peft's truncated series for OFT: ``I + 2Q`` for 2 terms,
    else ``I + 2Q + … + 2Qᵐ + Qᵐ⁺¹`` with ``m = max(2, terms − 2)``."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # (I − Q)(I + Q)⁻¹
    rot, power = eye + 2 * q, q
    if neumann_terms == 2:
        return rot
    for _ in range(max(2, neumann_terms - 2) - 1):  # + 2Q², …, 2Qᵐ
        power = power @ q
        rot = rot + 2 * power
    return rot + power @ q  # + Qᵐ⁺¹


def rotate_rows(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``t @ diag(blocks)`` over the last dim: ``(..., n·b)`` with ``(n, b, b)`` blocks, without building the matrix."""
    parts = t.unflatten(-1, (blocks.shape[0], blocks.shape[-1]))  # (..., n, b)
    return torch.einsum("...nk,nkc->...nc", parts, blocks).flatten(-2)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """``blocks`` ``(n, b, b)`` with ``int(p · n)`` of them, drawn at random, replaced by the identity: the
    multiplicative dropout of OFT and BOFT (a dropped block leaves its features unrotated)."""
    dropped = torch.randperm(blocks.shape[0], device=blocks.device)[: int(p * blocks.shape[0])]
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return blocks.index_copy(0, dropped, eye.expand(len(dropped), -1, -1))

"""BOFT: orthogonal finetuning with a butterfly-factorised rotation and a trainable output scale.

Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (arXiv:2311.06243), §4:
OFT's dense orthogonal ``R`` (``W' = W Rᵀ``, see :mod:`deltatune.methods.oft`) is written as a product of ``m``
sparse orthogonal butterfly factors, ``R = B_m ⋯ B_1``, so a few blocks reach every pair of features the way the
Cooley-Tukey FFT does. Each factor is a block-diagonal matrix of ``D`` Cayley blocks of size ``b``, conjugated by a
fixed permutation: ``B_i = P_i diag(C_i1, …, C_iD) P_iᵀ``. ``m = 1`` is block-diagonal OFT. The paper's ``s``
(§4.3, "magnitude") scales each output channel. Here, with ``d`` the features the weight reads (a Linear's
``in_features``, a conv's ``in_channels · k · k``):

* ``y = s ⊙ (W (Rᵀ-rotated x)) + b``, i.e. the base layer runs on ``x R`` (a row) and its bias-free output is scaled
  by ``s``; merged ``W' = diag(s) W Rᵀ``, bias unchanged; unmerged with ``W = diag(1/s) W' R``.
* Each block is the exact Cayley transform ``(I − S)(I + S)⁻¹`` of ``S = (C − Cᵀ)/2``, with ``C`` stored in full.
  ``C = 0`` (the init) gives ``R = I`` and ``s = 1``: the base model. ``init_weights=False``: ``C ~ N(0, 0.1²)``,
  ``s ~ N(1, 0.1²)``.
* ``P_i`` (``i = 0 … m−1``) splits the ``d`` features into groups of ``b · 2^i`` and, inside each group, moves the
  ``b/2``-wide chunks with even index in front of those with odd index (``P_0 = I``). peft builds ``R`` as
  ``B_{m−1} ⋯ B_0`` with these ``P_i``; here it is applied as gathers and batched block products, never as a
  ``d × d`` matrix.
* Block dropout (``boft_dropout``): in training, one butterfly factor drawn at random gets ``int(p · D)`` of its
  blocks set to the identity, as in peft.

Saved keys, peft's: ``<module>.boft_R`` ``(m, D, b, b)`` and ``<module>.boft_s`` (``(out, 1)`` on a Linear,
``(1, out)`` on a Conv2d). Layer types: ``nn.Linear`` and square-kernel, ungrouped ``nn.Conv2d`` (peft's); a conv
computes with its merged kernel (added as ``conv(x, W' − W)``), which is peft's output for stride/padding-only convs.

Differences from peft 0.21.2: peft builds the butterfly only through a CUDA extension; where that does not compile
(every CPU machine) it silently uses ``m = 1`` whatever the config says, and writes ``boft_R`` as ``(1, D, b, b)``.
Here ``boft_n_butterfly_factor`` always means what it says, so such a file (config ``m > 1``, tensor ``m = 1``) is
refused on load by its shape. With several adapters active on one layer peft rotates by the last one first
(``x R₂ R₁``), where this core chains input transforms first-active-first (``x R₁ R₂``); one active adapter, merging
and mixed batches are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from ._orthogonal import cayley, drop_blocks, rotate_rows
from .common import channel_view, check_dropout, check_size, place_delta

__all__ = ["BOFTConfig"]  # exported from deltatune


@dataclass
class BOFTConfig(LayerConfig):
    """Configuration of a BOFT adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        boft_block_size: Size ``b`` of every Cayley block. Give either this or ``boft_block_num`` and set the other to
            0: ``b × D`` must equal each target's dimension ``d``.
        boft_block_num: Number ``D`` of blocks per butterfly factor.
        boft_n_butterfly_factor: Number ``m`` of butterfly factors; 1 is block-diagonal OFT. With ``m > 1``, ``b``
            and ``D`` must be even, ``D`` a multiple of ``2^(m−1)`` (so ``d`` one of ``b · 2^(m−1)``).
        boft_dropout: Probability of setting a block to the identity during training (multiplicative dropout).
        fan_in_fan_out: peft's field; BOFT adapts no layer stored ``(in, out)`` (GPT-2's ``Conv1D`` is refused, as in
            peft), so it has no effect.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"boft_only"`` (biases of adapted layers).
        init_weights: ``True``: ``R = I``, ``s = 1`` (the base model). ``False``: random blocks and scale, for tests.
    """

    peft_type: PeftType = field(default=PeftType.BOFT, init=False)
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("boft_block_size", self.boft_block_size, allow_zero=True)
        check_size("boft_block_num", self.boft_block_num, allow_zero=True)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"give exactly one of boft_block_size={self.boft_block_size} and boft_block_num={self.boft_block_num}, "
                f"the other 0 (their product is each layer's dimension), e.g. BOFTConfig(boft_block_size=4)"
            )
        check_size("boft_n_butterfly_factor", self.boft_n_butterfly_factor)
        if self.boft_n_butterfly_factor > 32:  # 2**(m-1) must divide D < 2**31
            raise ConfigError(f"boft_n_butterfly_factor must be at most 32, got {self.boft_n_butterfly_factor}")
        check_dropout("boft_dropout", self.boft_dropout)
        if self.bias not in ("none", "all", "boft_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'boft_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (identity) or False (random), got {self.init_weights!r}")


def block_layout(config: BOFTConfig, features: int) -> tuple[int, int] | str:
    """``(D, b)`` for a layer whose rotated dimension is ``features``, or why the config does not fit it."""
    m = config.boft_n_butterfly_factor
    size = config.boft_block_size or (features // config.boft_block_num if features % config.boft_block_num == 0
                                      else 0)
    if size == 0 or features % size:
        given = f"boft_block_size={config.boft_block_size}" if config.boft_block_size else \
            f"boft_block_num={config.boft_block_num}"
        return f"{given} does not divide its dimension {features}"
    num = features // size
    if m > 1 and (num % 2 ** (m - 1) or size % 2 or num % 2):
        return (f"boft_n_butterfly_factor={m} needs an even block size ({size}) and a block count ({num}) that is a "
                f"multiple of 2**{m - 1} = {2 ** (m - 1)}")
    return num, size


def butterfly_perm(features: int, block_size: int, factor: int) -> torch.Tensor:
    """The index ``π`` of ``P_factor`` (``P[k, π[k]] = 1``): in each group of ``b · 2^factor`` features, the
    ``b/2``-wide chunks with even index first, then those with odd index (the identity for ``factor = 0``)."""
    index = torch.arange(features)
    if factor == 0:
        return index
    chunk = block_size // 2
    pairs = index.view(-1, block_size * 2**factor // (2 * chunk), 2, chunk)  # (groups, chunk pairs, even|odd, chunk)
    return pairs.transpose(1, 2).flatten()


class BOFTDelta(Delta):
    """The butterfly rotation ``R`` on ``d`` features and the output scale ``s``, shared by both layer types."""

    def __init__(self, factors: int, blocks: int, block_size: int, out_features: int, conv: bool, dropout: float):
        super().__init__()
        features = blocks * block_size
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, block_size, block_size))
        self.boft_s = nn.Parameter(torch.ones((1, out_features) if conv else (out_features, 1)))
        self.dropout = dropout
        perms = torch.stack([butterfly_perm(features, block_size, i) for i in range(factors)])  # (m, d)
        self.register_buffer("perm", perms, persistent=False)
        self.register_buffer("inverse_perm", perms.argsort(dim=1), persistent=False)

    def scale(self) -> torch.Tensor:
        """``s`` as an ``(out,)`` vector."""
        return self.boft_s.flatten()

    def blocks(self, dropout: bool = False) -> torch.Tensor:
        """The ``(m, D, b, b)`` orthogonal blocks; with ``dropout`` (in training) one factor loses some blocks."""
        c = self.boft_R
        blocks = cayley((c - c.transpose(-1, -2)).flatten(0, 1) / 2, None).view(c.shape)
        if dropout and self.training and self.dropout > 0:
            i = int(torch.randint(blocks.shape[0], ()))
            blocks = torch.cat([blocks[:i], drop_blocks(blocks[i], self.dropout)[None], blocks[i + 1:]])
        return blocks

    def rotate(self, t: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``t @ R`` (``t @ Rᵀ`` with ``transpose``) over the last dim, ``R = B_{m−1} ⋯ B_0``,
        ``B_i = P_i diag(blocks[i]) P_iᵀ``: ``t @ B_i`` gathers by ``π⁻¹``, rotates, gathers by ``π``."""
        order = range(blocks.shape[0]) if transpose else reversed(range(blocks.shape[0]))
        for i in order:
            b = blocks[i].transpose(-1, -2) if transpose else blocks[i]
            t = rotate_rows(t[..., self.inverse_perm[i]], b)[..., self.perm[i]]
        return t

    def transformed_weight(self, weight: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``diag(s) W Rᵀ`` (``diag(1/s) W R`` with ``inverse``), ``weight`` flattened to ``(out, d)``; in the
        adapter's dtype and ``weight``'s shape."""
        w = weight.flatten(1).to(self.boft_R.dtype)
        blocks = self.blocks()
        if inverse:
            return self.rotate(w / self.scale()[:, None], blocks).view(weight.shape)
        return (self.rotate(w, blocks, transpose=True) * self.scale()[:, None]).view(weight.shape)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.transformed_weight(weight).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.transformed_weight(weight, inverse=True).to(weight.dtype)

    def extra_repr(self) -> str:
        m, num, size, _ = self.boft_R.shape
        return f"factors={m}, blocks={num}, block_size={size}"


class BOFTLinear(BOFTDelta):
    """``y = s ⊙ (W (x R)) + b``: the base layer runs on ``x R``; its bias-free output is scaled."""

    transforms_input = True

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x.to(self.boft_R.dtype), self.blocks(dropout=True)).to(x.dtype)  # (..., in)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        s = self.scale().to(base_out.dtype)
        if base_layer.bias is None:
            return base_out * s
        return (base_out - base_layer.bias) * s + base_layer.bias


class BOFTConv2d(BOFTDelta):
    """``y = conv(x, diag(s) W Rᵀ) + b``, added to the base output as ``conv(x, W' − W)``."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight  # (out, C, k, k)
        w = weight.flatten(1).to(self.boft_R.dtype)
        merged = self.rotate(w, self.blocks(dropout=True), transpose=True) * channel_view(self.scale(), 2, 0)
        change = merged.view(weight.shape) - weight
        return base_out + base_layer._conv_forward(x.to(change.dtype), change, None).to(base_out.dtype)


def _features(base_layer: nn.Module) -> int:
    """``d``: the dimension ``R`` acts on (``in_features``, or ``in_channels · k · k``)."""
    return base_layer.weight[0].numel()


def check_target(config: BOFTConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer the blocks do not fit and convolutions peft's layout cannot describe, before any allocation.

    Raises:
        TargetError: a grouped or non-square Conv2d; a block size / count / butterfly factor that does not fit ``d``.
    """
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise TargetError(f"{name}: BOFT cannot adapt a grouped convolution (groups={base_layer.groups}), as in "
                              f"peft; exclude it from target_modules")
        if base_layer.kernel_size[0] != base_layer.kernel_size[1]:
            raise TargetError(f"{name}: BOFT adapts square kernels only (peft sizes the rotation as "
                              f"in_channels·k·k), got kernel_size={tuple(base_layer.kernel_size)}")
    layout = block_layout(config, _features(base_layer))
    if isinstance(layout, str):
        raise TargetError(f"{name}: {layout}")


def make_delta(config: BOFTConfig, base_layer: nn.Module, name: str) -> BOFTDelta:
    """Build the BOFT delta of ``base_layer`` (module ``name``): ``R = I``, ``s = 1``, or random if not
    ``init_weights``."""
    blocks, size = block_layout(config, _features(base_layer))
    conv = isinstance(base_layer, nn.Conv2d)
    cls = BOFTConv2d if conv else BOFTLinear
    delta = cls(config.boft_n_butterfly_factor, blocks, size, base_layer.weight.shape[0], conv, config.boft_dropout)
    return place_delta(delta, base_layer.weight, None if config.init_weights else _randomize)


def _randomize(delta: BOFTDelta) -> None:
    nn.init.normal_(delta.boft_R, mean=0.0, std=0.1)
    nn.init.normal_(delta.boft_s, mean=1.0, std=0.1)


METHOD = LayerMethod(
    config_class=BOFTConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, nn.Conv2d),
    check_target=check_target,
)

"""OFT: multiply the frozen weight by a trainable block-diagonal orthogonal matrix.

Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", §3: finetune ``W' = R W`` with an
orthogonal ``R``, which keeps the angles between neurons (the hyperspherical energy) of the pretrained layer. ``R`` is
block-diagonal, ``diag(R₁, …, R_r)``, to cut parameters, and each block is the Cayley transform of a skew-symmetric
``Q`` (``(I + Q)(I − Q)⁻¹``), so ``Q = 0`` (the init) gives ``R = I``: the base model. Constrained OFT (COFT) keeps
``‖Q‖`` within ``eps`` so that ``R`` stays near the identity.

What is stored and computed follows peft 0.21 so adapters load across libraries to equal outputs:

* ``oft_R.weight`` (``oft_embedding_R.weight`` on embeddings) is ``(blocks, b(b−1)/2)``: each row is the strict upper
  triangle of one block's ``Q`` in row-major order (``Q = U − Uᵀ``); with ``block_share`` one row serves every block.
* ``R`` rotates the features the weight reads: a Linear's input (``y = W (x R) + b``, merged ``W' = W Rᵀ``), a conv
  kernel flattened as ``(out, C·kh·kw)`` (merged ``W' = W Rᵀ``), an embedding's output rows (``W' = W R``).
* ``use_cayley_neumann`` (the default) replaces the inverse by peft's truncated series: ``I + 2Q`` for 2 terms, else
  ``I + 2Q + … + 2Qᵐ + Qᵐ⁺¹`` with ``m = max(2, terms − 2)``. Without it, ``R = (I − Q)(I + Q)⁻¹`` exactly. The two
  branches give inverse rotations for the same ``Q``: both are peft's conventions, kept as they are.
* COFT projects each block's ``Q`` onto the ball ``‖Q‖_F ≤ eps / √blocks`` before each use and writes the result back
  into the parameter (a projected-gradient step).

Layer types: ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``, as in peft; GPT-2's ``Conv1D`` is refused, as peft
refuses it. Conv2d differs from peft 0.21.2 on purpose: peft rotates unfolded input patches and folds them back by
summation, so for kernels larger than 1×1 a fresh adapter already changes the output and its unmerged output differs
from its own merged weight. Here a conv computes with the merged kernel ``W Rᵀ`` (peft's merge), which keeps the base
output at init; files are exchanged unchanged and equal peft's merged model (and its unmerged one for 1×1 kernels).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from ._orthogonal import cayley, drop_blocks, rotate_rows
from .common import adapter_dtype, check_dropout, check_size

__all__ = ["OFTConfig"]  # exported from deltatune

# Terms of the truncated Cayley-Neumann series; each is one batched matmul per forward. The bound stops a config file
# from making every forward run for hours (peft's default is 5).
_MAX_NEUMANN_TERMS = 1024


@dataclass
class OFTConfig(LayerConfig):
    """Configuration of an OFT adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Number of diagonal blocks per layer. Give either ``r`` or ``oft_block_size`` and set the other to 0, since
            ``r × oft_block_size`` must equal the rotated dimension (a Linear's in_features, an embedding's dim, a
            conv's in_channels·kh·kw). A value that does not divide a layer's dimension is moved, with a warning, to
            the nearest divisor (ties: the smaller), as peft does, so peft's files load.
        oft_block_size: Size ``b`` of each block; parameters per block: ``b(b−1)/2``. Same divisor rule as ``r``.
        module_dropout: During training, this fraction of each layer's blocks is set to the identity (multiplicative
            dropout). peft 0.21.2 stores this field but never applies it.
        fan_in_fan_out: peft's field; OFT adapts no layer stored ``(in, out)``, so it has no effect.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"oft_only"`` (biases of adapted layers).
        init_weights: ``True``: ``Q = 0`` (``R = I``, the base model). ``False``: ``Q ~ N(0, 0.1²)``, for tests.
        coft: Constrained OFT: keep each ``Q`` within the ``eps`` ball.
        eps: COFT's radius (scaled by ``1/√blocks``); only read with ``coft``.
        block_share: One block, shared by all blocks of a layer.
        use_cayley_neumann: Truncated Neumann series instead of the exact inverse (faster, orthogonal only
            approximately).
        num_cayley_neumann_terms: Terms of that series.
    """

    peft_type: PeftType = field(default=PeftType.OFT, init=False)
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size"):
            check_size(name, getattr(self, name), allow_zero=True)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"give exactly one of r={self.r} and oft_block_size={self.oft_block_size}, the other 0 (r × "
                f"oft_block_size is each layer's dimension), e.g. OFTConfig(oft_block_size=32) or OFTConfig(r=8, "
                f"oft_block_size=0); a file with r but no oft_block_size is from peft < 0.14, whose OFT format "
                f"is not supported"
            )
        check_dropout("module_dropout", self.module_dropout)
        if self.bias not in ("none", "all", "oft_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (identity) or False (random), got {self.init_weights!r}")
        if self.coft and not self.eps > 0:
            raise ConfigError(f"eps must be positive with coft=True (it is the allowed size of Q), got {self.eps!r}")
        if self.use_cayley_neumann and not (
            isinstance(self.num_cayley_neumann_terms, int)
            and 2 <= self.num_cayley_neumann_terms <= _MAX_NEUMANN_TERMS
        ):
            raise ConfigError(
                f"num_cayley_neumann_terms must be an integer in [2, {_MAX_NEUMANN_TERMS}] (with fewer the rotation is "
                f"always the identity; each term costs a matrix product per forward, peft's default is 5), got "
                f"{self.num_cayley_neumann_terms!r}"
            )


# --- the rotation, as pure functions of the packed parameter ------------------------------------------------------

def skew_symmetric(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(n, b(b−1)/2) -> (n, b, b)``: each row fills the strict upper triangle (row-major) of ``U``; ``Q = U − Uᵀ``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], block_size, block_size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(1, 2)


def project_coft(packed: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each block's ``Q`` back onto ``‖Q‖_F ≤ eps / √n`` (``‖Q‖_F = √2 ‖row‖`` for a packed row)."""
    radius = eps / packed.shape[0] ** 0.5
    norm = packed.norm(dim=1, keepdim=True) * 2**0.5  # (n, 1)
    return packed * (radius / norm).clamp(max=1.0)  # norm 0 gives inf, clamped: unchanged


def nearest_divisor(n: int, wanted: int) -> int:
    """peft's rule for an ``r`` / ``oft_block_size`` that does not divide ``n``: the closest divisor, the smaller on a
    tie (``n`` itself for ``wanted >= n``)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - wanted), d))


def block_layout(config: OFTConfig, features: int, name: str) -> tuple[int, int]:
    """``(blocks, block_size)`` of module ``name`` whose rotated dimension is ``features``."""
    wanted, field_name = (config.oft_block_size, "oft_block_size") if config.oft_block_size else (config.r, "r")
    value = wanted if features % wanted == 0 and wanted <= features else nearest_divisor(features, wanted)
    if value != wanted:
        warnings.warn(
            f"{name}: {field_name}={wanted} does not divide its dimension {features}; using {value} (the nearest "
            f"divisor, as peft does). Choose a divisor of every target's dimension to silence this."
        )
    return (features // value, value) if field_name == "oft_block_size" else (value, features // value)


class _Packed(nn.Module):
    """Holds the packed skew-symmetric parameter as ``weight``, so saved keys read ``…oft_R.weight`` as in peft."""

    def __init__(self, rows: int, block_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2))


class OFTDelta(Delta):
    """The rotation shared by every layer type: ``blocks`` orthogonal ``b × b`` blocks acting on ``features``."""

    container = "oft_R"

    def __init__(self, config: OFTConfig, features: int, name: str) -> None:
        super().__init__()
        self.blocks, self.block_size = block_layout(config, features, name)
        setattr(self, self.container, _Packed(1 if config.block_share else self.blocks, self.block_size))
        self.coft, self.eps, self.module_dropout = config.coft, config.eps, config.module_dropout
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None

    @property
    def packed(self) -> nn.Parameter:
        return getattr(self, self.container).weight

    def rotation(self, dropout: bool = False) -> torch.Tensor:
        """The ``(blocks, b, b)`` orthogonal blocks; rotated rows are ``x @ diag(blocks)``. ``dropout``: set a random
        ``module_dropout`` fraction of the (unshared) blocks to the identity, during training."""
        if self.coft:
            with torch.no_grad():
                self.packed.copy_(project_coft(self.packed, self.eps))
        rot = cayley(skew_symmetric(self.packed, self.block_size), self.neumann_terms)  # (rows, b, b)
        if dropout and self.training and self.module_dropout > 0 and rot.shape[0] > 1:
            rot = drop_blocks(rot, self.module_dropout)
        return rot.expand(self.blocks, -1, -1)

    def weight_blocks(self, dropout: bool = False) -> torch.Tensor:
        """Blocks ``M`` with merged weight rows ``= rows @ diag(M)``: ``Rᵀ`` where the weight reads rotated inputs."""
        return self.rotation(dropout).transpose(1, 2)

    @staticmethod
    def rotated_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``weight`` with its rows flattened to the rotated dimension, times ``diag(blocks)``; in the blocks' dtype
        and ``weight``'s shape."""
        return rotate_rows(weight.flatten(1).to(blocks.dtype), blocks).view(weight.shape)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.rotated_weight(weight, self.weight_blocks()).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        # the true inverse, not the transpose: the Neumann series is only near-orthogonal
        return self.rotated_weight(weight, torch.linalg.inv(self.weight_blocks())).to(weight.dtype)


class OFTLinear(OFTDelta):
    """``y = W (x R) + b``: the base layer runs on the rotated input."""

    transforms_input = True

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        rot = self.rotation(dropout=True)
        return rotate_rows(x.to(rot.dtype), rot).to(x.dtype)  # (..., in)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out


class OFTConv2d(OFTDelta):
    """``y = conv(x, W Rᵀ) + b`` with the kernel flattened as ``(out, C·kh·kw)``, added to the base output as
    ``conv(x, W Rᵀ − W)`` so the base layer's own computation is kept."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight  # (out, C, kh, kw)
        change = self.rotated_weight(weight, self.weight_blocks(dropout=True)) - weight
        return base_out + base_layer._conv_forward(x, change.to(x.dtype), None)


class OFTEmbedding(OFTDelta):
    """Each looked-up row ``e`` becomes ``e R`` (peft rotates the embedding output); merged ``W' = W R``."""

    container = "oft_embedding_R"

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        rot = self.rotation(dropout=True)
        return rotate_rows(base_out.to(rot.dtype), rot).to(base_out.dtype)  # (..., dim)

    def weight_blocks(self, dropout: bool = False) -> torch.Tensor:
        return self.rotation(dropout)


def _features(base_layer: nn.Module) -> int:
    """The dimension ``R`` acts on."""
    if isinstance(base_layer, nn.Embedding):
        return base_layer.embedding_dim
    if isinstance(base_layer, nn.Conv2d):
        return base_layer.weight[0].numel()  # in_channels · kh · kw
    return base_layer.in_features


def check_target(config: OFTConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a grouped convolution: its kernel does not read all ``in_channels · kh · kw`` inputs.

    Raises:
        TargetError: ``base_layer`` is a Conv2d with ``groups != 1``.
    """
    if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
        raise TargetError(
            f"{name}: OFT cannot adapt a grouped convolution (groups={base_layer.groups}); exclude it from "
            f"target_modules"
        )


_LAYER_CLASSES: tuple[tuple[type[nn.Module], type[OFTDelta]], ...] = (
    (nn.Linear, OFTLinear),
    (nn.Conv2d, OFTConv2d),
    (nn.Embedding, OFTEmbedding),
)


def make_delta(config: OFTConfig, base_layer: nn.Module, name: str) -> OFTDelta:
    """Build the OFT delta of ``base_layer`` (module ``name``): ``R = I``, or a random ``Q`` if not ``init_weights``."""
    cls = next(c for t, c in _LAYER_CLASSES if isinstance(base_layer, t))
    delta = cls(config, _features(base_layer), name)
    weight = base_layer.weight
    dtype = adapter_dtype(weight.dtype)
    delta.to(device=weight.device, dtype=dtype)
    if not config.init_weights and weight.device.type != "meta":
        nn.init.normal_(delta.packed, mean=0.0, std=0.1)
    return delta


METHOD = LayerMethod(
    config_class=OFTConfig,
    make_delta=make_delta,
    layer_types=tuple(t for t, _ in _LAYER_CLASSES),
    check_target=check_target,
)

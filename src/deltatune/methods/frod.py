"""FRoD: each adapted weight rebuilt from a basis shared by its layer's peers, with a trainable diagonal and sparse core.

FRoD (AAAI 2026, doi:10.1609/aaai.v40i31.39813), as peft 0.21.2 implements it. Targets are grouped into *categories*
by the last two parts of their name (``self_attn.q_proj`` -> ``self_attn_q_proj``; a name ending in ``<digit>.x`` is
``x``; BERT's ``attention.output.dense`` is ``attention_output``), and within a category by block index (the number
after ``layers``, else the first number in the name, else the target's position; a later target with the same index
replaces an earlier one, as in peft). Per category, from the weights ``W_l`` ``(out, in)`` of its blocks stacked as
``W`` ``(L·out, in)`` (float32), one basis ``V`` ``(in, in)``, the hierarchical joint decomposition:

    L·out <  in:  V = right singular vectors of W (full SVD)
    L·out >= in:  W = Q R;  T = mean_l (Q_lᵀ Q_l + α I)⁻¹;  V = Rᵀ E,  E the eigenvectors of T   (α: regularization_alpha)

Each target then factors its own weight on that basis (float64): ``B = W_l V⁻ᵀ``, ``λ_j = ‖B[:, j]‖``, ``U = B / λ``
(columns of norm zero stay zero), so ``W_l = U diag(λ) Vᵀ``. The adapter trains ``λ`` ``(in,)`` and the values of a
sparse off-diagonal ``S`` ``(in, in)`` (zero at init) and replaces the weight by

    W' = U (diag(λ) + S) Vᵀ          Δy = dropout(x) (W' - W)ᵀ

so a fresh adapter is the base model up to the rounding of the factorization. ``S``'s positions: for each category in
sorted order, ``nnz = min(⌊in² · sparse_rate⌋, in(in-1))`` (at least 1 when ``sparse_rate > 0``) off-diagonal
positions, row-major, picked by ``torch.randperm`` from one CPU generator seeded with ``projection_prng_key`` and
shared across the categories, bit-identical to peft's.

Merging adds ``W' - W₀`` (``W₀``: the weight before any merge, kept by the layer) and unmerging restores ``W₀``, as peft
does. Mixed-adapter batches (``adapter_names``), which peft's FRoD layer lacks, give each row its own ``Δy``.

Saved keys, peft's: per target ``<module>.frod_lambda_l`` ``(in,)`` and ``<module>.frod_lambda_s_values`` ``(nnz,)``;
with ``save_projection`` (the default) per category ``base_model.frod_V.<category>`` ``(in, in)``,
``base_model.frod_s_indices.<category>`` ``(2, nnz)`` int64 and ``base_model.frod_s_size.<category>`` ``[in, in]``.
``U`` is never saved: it is rebuilt from the base weight and the regenerated ``V``, so a file only fits the base model
it was trained on (as in peft). Layer types: ``nn.Linear`` and transformers ``Conv1D``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from ..targeting import DEFAULT_ATTENTION_TARGETS
from .common import check_dropout, check_scale, check_seed, place_delta, record_fan_in_fan_out

__all__ = ["FrodConfig"]  # exported from deltatune


@dataclass
class FrodConfig(LayerConfig):
    """Configuration of a FRoD adapter (peft's field names and defaults). Shared targeting fields: see
    ``LayerConfig`` (peft's ``FrodConfig`` has no ``exclude_modules``).

    Attributes:
        projection_prng_key: Seed of the CPU generator that picks the positions of every category's sparse ``S``.
        save_projection: Save each category's ``V`` and ``S`` positions in the file (else regenerated on load from
            the base weights and the seed).
        frod_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Weight stored ``(in, out)``; set from the target type (``Conv1D``), as peft records it.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"frod_only"``.
        init_weights: ``True``: ``S = 0`` and ``λ`` from the base weight (the adapter starts as the base model).
            ``False``: ``S``'s values ``~ N(0, 0.1²)`` and ``λ`` plus ``N(0, 0.1²)`` noise (tests).
        sparse_rate: Fraction in ``[0, 1]`` of ``S``'s ``in²`` entries that train (off-diagonal only).
        regularization_alpha: Ridge term ``α ≥ 0`` that keeps ``(Q_lᵀ Q_l + α I)⁻¹`` stable for correlated layers.
        progressbar: Show a progress bar (tqdm) over the categories while the bases are decomposed.
        runtime_offload_base_weight: peft's option to keep base weights on the CPU while FRoD rebuilds the weight
            itself; deltatune always runs the base layer, so ``True`` is refused.
    """

    peft_type: PeftType = field(default=PeftType.FROD, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("projection_prng_key", self.projection_prng_key)
        check_dropout("frod_dropout", self.frod_dropout)
        if isinstance(self.sparse_rate, bool) or not isinstance(self.sparse_rate, (int, float)) \
                or not 0.0 <= self.sparse_rate <= 1.0:
            raise ConfigError(f"sparse_rate must be a number in [0, 1] (the fraction of S's entries that train), got "
                              f"{self.sparse_rate!r}")
        check_scale("regularization_alpha", self.regularization_alpha)
        if self.regularization_alpha < 0:
            raise ConfigError(f"regularization_alpha must be >= 0 (a ridge term), got {self.regularization_alpha!r}")
        if self.bias not in ("none", "all", "frod_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'frod_only', got {self.bias!r}")
        for name in ("init_weights", "save_projection", "fan_in_fan_out", "progressbar",
                     "runtime_offload_base_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.runtime_offload_base_weight:
            raise ConfigError("runtime_offload_base_weight=True is not supported: deltatune's FRoD adds its update "
                              "to the base layer's output, so the base weight stays where the model is; set it to "
                              "False (the adapter's values are the same)")


def category_of(name: str) -> str:
    """The projection-sharing category of target ``name`` (peft's rule; see the module docstring)."""
    parts = name.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return f"{parts[-2]}_{parts[-1]}"


def block_of(name: str, position: int) -> int:
    """The block index of target ``name``: the number after ``layers``, else the first number, else ``position``."""
    parts = name.split(".")
    if "layers" in parts:
        after = parts.index("layers") + 1
        if after < len(parts) and _is_int(parts[after]):
            return int(parts[after])
    return next((int(p) for p in parts if p.isdigit()), position)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _oriented(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as ``(out, in)`` (a Conv1D stores it transposed)."""
    return base_layer.weight.T if isinstance(base_layer, Conv1D) else base_layer.weight


def joint_basis(weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``V`` ``(in, in)`` of one category from its blocks' float32 ``(out, in)`` weights (module docstring)."""
    stacked = torch.cat(weights, dim=0)  # (L·out, in)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)  # q (L·out, in), r (in, in)
    dim = r.shape[1]
    eye = torch.eye(dim, dtype=r.dtype)
    t = torch.zeros((dim, dim), dtype=r.dtype)
    for q_l in q.split([w.shape[0] for w in weights]):
        t += torch.linalg.inv(q_l.T @ q_l + alpha * eye)
    t /= len(weights)
    return r.T @ torch.linalg.eigh(t)[1]


def sparse_positions(dim: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``(2, nnz)`` int64 off-diagonal (row, column) positions of ``S`` ``(dim, dim)``, drawn as peft draws them
    (``randperm`` over the row-major off-diagonal positions), without listing all ``dim²`` of them."""
    off_diagonal = dim * (dim - 1)
    nnz = min(int(dim * dim * rate), off_diagonal)
    if rate > 0 and off_diagonal > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    picked = torch.randperm(off_diagonal, generator=generator)[:nnz]
    rows, cols = picked // (dim - 1), picked % (dim - 1)
    return torch.stack([rows, cols + (cols >= rows).long()])


class FrodProjections(nn.Module):
    """One adapter's per-category bases and sparse positions, held once in the model's shared state (saved as
    ``base_model.frod_V.<category>``, ``base_model.frod_s_indices.<category>``, ``base_model.frod_s_size.<category>``
    with ``save_projection``), and each target's category."""

    def __init__(self, bases: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
                 categories: dict[str, str], persistent: bool) -> None:
        super().__init__()
        self.frod_V, self.frod_s_indices, self.frod_s_size = nn.Module(), nn.Module(), nn.Module()
        for category, v in bases.items():
            self.frod_V.register_buffer(category, v, persistent=persistent)
            self.frod_s_indices.register_buffer(category, positions[category], persistent=persistent)
            self.frod_s_size.register_buffer(category, torch.tensor(v.shape, dtype=torch.long), persistent=persistent)
        self.categories = categories


def make_projections(config: FrodConfig, bases: Mapping[str, nn.Module], shared: Mapping[str, nn.Module]
                     ) -> FrodProjections:
    """The adapter's ``V`` per category, built jointly from every target's weight, and ``S``'s positions."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    categories, widths = {}, {}
    for position, (name, base) in enumerate(bases.items()):
        category = categories[name] = category_of(name)
        weight = _oriented(base)
        first, width = widths.setdefault(category, (name, weight.shape[1]))
        if weight.shape[1] != width:
            raise TargetError(f"{name} and {first} share FRoD's basis (category {category!r}) but have "
                              f"{weight.shape[1]} and {width} input features; target modules whose names end alike "
                              f"must have the same input width, so select them with target_modules")
        blocks.setdefault(block_of(name, position), {})[category] = weight
    on_meta = any(w.device.type == "meta" for layer in blocks.values() for w in layer.values())
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    names = sorted(set(categories.values()))
    if config.progressbar and not on_meta:
        from tqdm.auto import tqdm  # a dependency of transformers
        names = tqdm(names, desc="FRoD joint decomposition", unit="category")
    v_by_category, positions = {}, {}
    for category in names:
        weights = [layer[category] for _, layer in sorted(blocks.items()) if category in layer]
        dim, dtype = weights[0].shape[1], weights[0].dtype
        if on_meta:  # a dry run only counts sizes
            v = torch.empty(dim, dim, dtype=dtype, device="meta")
        else:
            v = joint_basis([w.detach().to(device="cpu", dtype=torch.float32) for w in weights],
                            config.regularization_alpha).to(dtype=dtype, device=weights[0].device)
        v_by_category[category] = v
        positions[category] = sparse_positions(dim, config.sparse_rate, generator).to(v.device)
    return FrodProjections(v_by_category, positions, categories, config.save_projection)


def factor_weight(weight: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, λ)`` with ``weight = U diag(λ) Vᵀ``: ``B = weight V⁻ᵀ`` in float64 (pseudo-inverse where ``V`` is
    singular), ``λ`` its column norms, ``U`` its columns normalized (zero where ``λ`` is). Returned in float32."""
    w, v = weight.detach().to(device="cpu", dtype=torch.float64), v.detach().to(device="cpu", dtype=torch.float64)
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lam = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    kept = lam > 1e-12
    u[:, kept] = b[:, kept] / lam[kept]
    return u.float(), lam.float()


class FrodDelta(Delta):
    """``Δy = dropout(x) (U (diag(λ) + S) Vᵀ - W)ᵀ`` with ``U`` ``(out, in)`` fixed, ``V`` ``(in, in)`` shared by
    the category, ``λ`` ``(in,)`` and ``S``'s ``nnz`` values trained."""

    merges_from_original = True  # W' replaces the weight before any merge

    def __init__(self, base_layer: nn.Module, projections: FrodProjections, category: str,
                 u: torch.Tensor, lam: torch.Tensor, nnz: int, dropout: float) -> None:
        super().__init__()
        self.category = category
        self.transposed = isinstance(base_layer, Conv1D)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.frod_lambda_l = nn.Parameter(lam)
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(nnz, dtype=lam.dtype, device=lam.device))
        self.register_buffer("frod_U", u, persistent=False)  # rebuilt from W and V, never saved (as in peft)
        # A plain reference, not a submodule: the bases are saved and moved once, with the shared state.
        object.__setattr__(self, "projections", projections)

    def core(self) -> torch.Tensor:
        """``diag(λ) + S`` ``(in, in)``, dense (a GEMM beats a sparse product at these densities)."""
        lam = self.frod_lambda_l
        rows, cols = getattr(self.projections.frod_s_indices, self.category).to(lam.device)
        core = torch.diag_embed(lam)
        return core.index_put((rows, cols), self.frod_lambda_s_values, accumulate=True)

    def basis(self) -> torch.Tensor:
        return getattr(self.projections.frod_V, self.category).to(device=self.frod_lambda_l.device,
                                                                  dtype=self.frod_lambda_l.dtype)

    def adapted_weight(self) -> torch.Tensor:
        """``W' = U (diag(λ) + S) Vᵀ`` ``(out, in)`` in the adapter's dtype."""
        return self.frod_U.to(self.frod_lambda_l.dtype) @ self.core() @ self.basis().T

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self.frod_lambda_l.dtype
        h = self.dropout(x.to(dtype))
        z = (h @ self.basis()) @ self.core().T  # (..., in): the input in V's coordinates through the core
        weight = _oriented(base_layer).to(dtype)
        return base_out + (F.linear(z, self.frod_U.to(dtype)) - F.linear(h, weight)).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        weight = _oriented(base_layer)
        update = self.adapted_weight() - weight.to(self.frod_lambda_l.dtype)
        return (update.T if self.transposed else update).to(weight.dtype)

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module,
                      original: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert original is not None  # the layer passes it (merges_from_original)
        adapted = self.adapted_weight()
        adapted = adapted.T if self.transposed else adapted  # the stored layout
        update = adapted - original["weight"].to(adapted.dtype)
        return {"weight": params["weight"] + update.to(params["weight"].dtype)}

    def state_from_saved(self, saved: dict[str, torch.Tensor], shared: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The file's tensors, once its saved ``S`` positions for this category (``save_projection``) are known to be
        ``dim x dim`` positions of the right size."""
        dim = self.frod_lambda_l.shape[0]
        index = shared.get(f"frod_s_indices.{self.category}")
        size = shared.get(f"frod_s_size.{self.category}")
        if size is not None and size.tolist() != [dim, dim]:
            raise AdapterLoadError(f"frod_s_size.{self.category} must be [{dim}, {dim}], got {size.tolist()}; the "
                                   f"file was not written for this model")
        if index is not None and index.numel() and (
                index.is_floating_point() or not (0 <= index.min() and index.max() < dim)):
            raise AdapterLoadError(f"frod_s_indices.{self.category} must hold integer positions in [0, {dim}); the "
                                   f"file is corrupt or was not written for this model")
        return saved

    def extra_repr(self) -> str:
        return f"category={self.category}, in={self.frod_lambda_l.shape[0]}, nnz={self.frod_lambda_s_values.numel()}"


def make_delta(config: FrodConfig, base_layer: nn.Module, name: str, projections: FrodProjections) -> FrodDelta:
    """Build the FRoD delta of ``base_layer`` (module ``name``): ``U`` and ``λ`` factor its weight on its category's
    ``V``."""
    category = projections.categories[name]
    weight = _oriented(base_layer)
    v = getattr(projections.frod_V, category)
    nnz = getattr(projections.frod_s_indices, category).shape[1]
    if weight.device.type == "meta":
        u, lam = torch.empty(weight.shape, device="meta"), torch.empty(weight.shape[1], device="meta")
    else:  # peft factors on V as stored (the base weight's dtype)
        u, lam = factor_weight(weight, v)
    delta = FrodDelta(base_layer, projections, category, u, lam, nnz, config.frod_dropout)

    def init(delta: FrodDelta) -> None:
        if not config.init_weights:  # peft's test init: S ~ N(0, 0.1²), then λ += N(0, 0.1²)
            delta.frod_lambda_s_values.normal_(std=0.1)
            delta.frod_lambda_l.add_(torch.randn_like(delta.frod_lambda_l) * 0.1)

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=FrodConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    default_targets={**DEFAULT_ATTENTION_TARGETS, "vit": ["query", "value"]},  # peft's FRoD table adds ViT
    resolve_config=record_fan_in_fan_out,
    make_shared=make_projections,
)

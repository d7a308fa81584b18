"""PSOFT: orthogonal fine-tuning inside the weight's principal subspace.

"Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation" (PSOFT,
https://openreview.net/forum?id=FSHrinMArK), §3: the top-``r`` singular triplets ``W ≈ V_r S_r U_rᵀ`` give frozen
factors ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``, and only an ``r × r`` matrix ``R`` between them trains, rotating the
principal subspace:

    ΔW = s · B (R − I) A,    s = psoft_alpha / r

``ab_svd_init="psoft_init"``: ``A = U_rᵀ`` (orthonormal rows), ``B = V_r S_r / s``; ``"pissa_init"``: ``A = √(S_r/s)
U_rᵀ``, ``B = V_r √(S_r/s)``. With ``psoft_orth`` ``R`` is orthogonal, the Cayley transform ``(I + Q)(I − Q)⁻¹`` of the
skew-symmetric ``Q`` whose upper triangle (row-major, ``r(r−1)/2`` entries) is ``psoft_R.weight``
(``use_cayley_neumann``: the truncated series ``I + 2Q + … + 2Qᵐ + Qᵐ⁺¹``, ``m = max(2, terms − 2)``, after scaling
``Q`` to Frobenius norm ``cayley_neumann_eps`` where it is larger); without, ``R`` is the free ``(r, r)`` weight.
``psoft_mag_b`` / ``psoft_mag_a`` scale its rows / columns by trained vectors: ``R ← diag(b) R diag(a)``. The forward
adds ``s · (R (A x') − A x') Bᵀ`` with ``x'`` the dropped-out input.

``A`` and ``B`` are not saved: they are rebuilt from the base weight on load, by the same float32 SVD
(``psoft_svd="full"``: ``torch.linalg.svd``; ``"lowrank"``: ``torch.svd_lowrank`` with ``psoft_svd_lowrank_niter``
iterations, its random projection drawn with torch's global generator seeded with ``random_seed`` inside a forked
RNG state, as peft does, so both libraries rebuild the same factors). A file is therefore valid only on the base
weights it was trained on.

Init: ``Q = 0`` / ``R = I`` and unit vectors (the base model); ``init_weights=False``: ``Q ~ N(0, 0.1²)`` or
``R = I + N(0, 0.1²)``. Saved keys, peft's: ``<module>.psoft_R.weight`` and, when enabled, ``psoft_R.vector_b`` /
``psoft_R.vector_a`` ``(r,)``. Layer type: ``nn.Linear``, as in peft; ``r`` may not exceed ``min(in, out)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from ._orthogonal import cayley
from .common import (check_dropout, check_no_layers_with_regex, check_scale, check_seed, check_size, place_delta,
                     record_fan_in_fan_out)

__all__ = ["PsoftConfig"]  # exported from deltatune

_INITS = ("psoft_init", "pissa_init")
_SVDS = ("full", "lowrank")


@dataclass
class PsoftConfig(LayerConfig):
    """Configuration of a PSOFT adapter (peft's field names). Shared targeting fields: see ``LayerConfig`` (peft
    refuses ``layers_to_transform`` / ``layers_pattern`` with a regex ``target_modules``, and so does this).

    Attributes:
        r: Size of the trained ``r × r`` matrix: the principal subspace's dimension; at most ``min(in, out)``.
        psoft_alpha: Scale numerator: ``s = psoft_alpha / r``.
        psoft_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Recorded as peft does (``False``: PSOFT adapts ``nn.Linear`` only).
        ab_svd_init: ``"psoft_init"`` (orthonormal ``A``) or ``"pissa_init"`` (``√S`` on both factors).
        psoft_svd: ``"full"`` or ``"lowrank"`` (``torch.svd_lowrank``, seeded with ``random_seed``).
        psoft_svd_lowrank_niter: Power iterations of the low-rank SVD (``"lowrank"`` only; warned otherwise).
        random_seed: Seed of the low-rank SVD's random projection (``"lowrank"`` only).
        psoft_orth: ``R`` orthogonal (Cayley) rather than a free matrix.
        psoft_mag_b: Train a scale per row of ``R`` (its output side).
        psoft_mag_a: Train a scale per column of ``R`` (its input side).
        use_cayley_neumann: The truncated Neumann series instead of the exact Cayley transform.
        num_cayley_neumann_terms: Terms of that series (``use_cayley_neumann`` only; warned otherwise).
        cayley_neumann_eps: Bound in ``(0, 1)`` on ``‖Q‖_F`` for the series; ``None``: no bound.
        init_weights: ``True``: ``R = I`` (the base model). ``False``: a random ``R``, for tests.
    """

    peft_type: PeftType = field(default=PeftType.PSOFT, init=False)
    r: int = 32
    psoft_alpha: float = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_no_layers_with_regex(self)
        check_size("r", self.r)
        check_scale("psoft_alpha", self.psoft_alpha)
        check_dropout("psoft_dropout", self.psoft_dropout)
        if self.ab_svd_init not in _INITS:
            raise ConfigError(f"ab_svd_init must be 'psoft_init' or 'pissa_init', got {self.ab_svd_init!r}")
        if self.psoft_svd not in _SVDS:
            raise ConfigError(f"psoft_svd must be 'full' or 'lowrank', got {self.psoft_svd!r}")
        check_size("psoft_svd_lowrank_niter", self.psoft_svd_lowrank_niter, allow_zero=True)
        check_seed("random_seed", self.random_seed)
        check_size("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        if self.cayley_neumann_eps is not None and (
                isinstance(self.cayley_neumann_eps, bool) or not isinstance(self.cayley_neumann_eps, (int, float))
                or not 0.0 < self.cayley_neumann_eps < 1.0):
            raise ConfigError(f"cayley_neumann_eps must be None or a number in (0, 1), got {self.cayley_neumann_eps!r}")
        for name in ("fan_in_fan_out", "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann",
                     "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        # as peft: fields that only one mode reads are accepted elsewhere, with a warning
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != 10:
            warnings.warn(f"psoft_svd_lowrank_niter={self.psoft_svd_lowrank_niter} has no effect unless "
                          f"psoft_svd='lowrank'", UserWarning, stacklevel=3)
        if not self.use_cayley_neumann and (self.num_cayley_neumann_terms != 5 or self.cayley_neumann_eps is not None):
            warnings.warn("num_cayley_neumann_terms and cayley_neumann_eps have no effect unless "
                          "use_cayley_neumann=True", UserWarning, stacklevel=3)


class PsoftRotation(nn.Module):
    """The trained ``r × r`` matrix ``R`` (peft's ``psoft_R``): Cayley-orthogonal or free, with optional row and
    column scales."""

    def __init__(self, r: int, orth: bool, mag_b: bool, mag_a: bool, neumann_terms: int | None,
                 neumann_eps: float | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(r * (r - 1) // 2) if orth else torch.eye(r))
        self.vector_b = nn.Parameter(torch.ones(r)) if mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r)) if mag_a else None
        self.register_buffer("upper", torch.triu_indices(r, r, 1), persistent=False)  # (2, r(r−1)/2)
        self.r, self.orth, self.neumann_terms, self.neumann_eps = r, orth, neumann_terms, neumann_eps

    def matrix(self) -> torch.Tensor:
        """``R`` ``(r, r)``, in the parameters' dtype (the Cayley solve in float32 for a half-precision one)."""
        rot = self.weight if not self.orth else self._cayley()
        if self.vector_b is not None:
            rot = self.vector_b[:, None] * rot
        if self.vector_a is not None:
            rot = rot * self.vector_a[None, :]
        return rot

    def _cayley(self) -> torch.Tensor:
        w = self.weight
        q = w.new_zeros(self.r, self.r).index_put(tuple(self.upper), w)
        q = q - q.T  # skew-symmetric
        if self.neumann_terms is None:  # exact: (I + Q)(I − Q)⁻¹, float32 for the solve
            return cayley(-q.float(), None).to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) \
                else cayley(-q, None)
        if self.neumann_eps is not None:
            norm = torch.linalg.norm(q, ord="fro")
            if torch.isfinite(norm) and norm > self.neumann_eps:
                q = q * (self.neumann_eps / (norm + 1e-12))
        if self.neumann_terms == 1:
            return torch.eye(self.r, dtype=w.dtype, device=w.device)
        return cayley(q, self.neumann_terms)  # the series I + 2Q + … of (I + Q)(I − Q)⁻¹


class PsoftDelta(Delta):
    """``Δy = s · (R h − h) Bᵀ`` with ``h = A dropout(x)``; ``A``, ``B`` frozen buffers rebuilt from the weight."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, rotation: PsoftRotation, scaling: float,
                 dropout: float) -> None:
        super().__init__()
        self.psoft_R = rotation
        self.register_buffer("psoft_A", a, persistent=False)  # (r, in): rebuilt from the base weight, as in peft
        self.register_buffer("psoft_B", b, persistent=False)  # (out, r)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        a = self.psoft_A
        h = F.linear(self.dropout(x.to(a.dtype)), a)  # (..., r)
        rot = self.psoft_R.matrix().to(h.dtype)
        return accumulate(base_out, F.linear(F.linear(h, rot) - h, self.psoft_B), self.scaling)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        rot = self.psoft_R.matrix().to(self.psoft_A.dtype)
        eye = torch.eye(rot.shape[0], dtype=rot.dtype, device=rot.device)
        return (self.scaling * self.psoft_B @ (rot - eye) @ self.psoft_A).to(base_layer.weight.dtype)  # (out, in)

    def extra_repr(self) -> str:
        return f"r={self.psoft_A.shape[0]}, orth={self.psoft_R.orth}"


def principal_factors(weight: torch.Tensor, config: PsoftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: ``(r, in)`` and ``(out, r)`` float32 factors of ``weight`` ``(out, in)`` (see the module
    docstring), by the same calls as peft so that both rebuild the same values."""
    w, r = weight.detach().float(), config.r
    if config.psoft_svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        left, values, right = u[:, :r], s[:r], vh[:r, :]
    else:  # the random projection draws from the global generator: seeded inside a forked state
        devices = [] if w.device.type == "cpu" else [w.device]
        kwargs = {} if w.device.type == "cpu" else {"device_type": w.device.type}
        with torch.random.fork_rng(devices=devices, **kwargs):
            torch.manual_seed(config.random_seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=config.psoft_svd_lowrank_niter)
        left, values, right = u[:, :r], s[:r], v[:, :r].T
    values = values / (config.psoft_alpha / r)
    if config.ab_svd_init == "psoft_init":
        return right.contiguous(), (left @ torch.diag(values)).contiguous()
    root = torch.sqrt(values)
    return (torch.diag(root) @ right).contiguous(), (left @ torch.diag(root)).contiguous()


def check_target(config: PsoftConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose weight has fewer than ``r`` singular values.

    Raises:
        TargetError: ``r > min(in, out)``.
    """
    smallest = min(base_layer.in_features, base_layer.out_features)
    if config.r > smallest:
        raise TargetError(f"{name}: r={config.r} exceeds min(in, out) = {smallest}, the number of singular values "
                          f"of its weight; use r <= {smallest}")


def make_delta(config: PsoftConfig, base_layer: nn.Module, name: str) -> PsoftDelta:
    """Build the PSOFT delta of ``base_layer`` (module ``name``): the SVD factors and the identity ``R``."""
    weight, r = base_layer.weight, config.r
    if weight.device.type == "meta":  # a dry run that only counts sizes
        a = torch.empty(r, base_layer.in_features, device="meta")
        b = torch.empty(base_layer.out_features, r, device="meta")
    else:
        a, b = principal_factors(weight, config)
    rotation = PsoftRotation(r, config.psoft_orth, config.psoft_mag_b, config.psoft_mag_a,
                             config.num_cayley_neumann_terms if config.use_cayley_neumann else None,
                             config.cayley_neumann_eps)
    delta = PsoftDelta(a, b, rotation, config.psoft_alpha / r, config.psoft_dropout)

    def randomize(delta: PsoftDelta) -> None:
        w = delta.psoft_R.weight
        if config.psoft_orth:
            nn.init.normal_(w, mean=0.0, std=0.1)
        else:
            w.add_(torch.randn_like(w) * 0.1)

    return place_delta(delta, weight, None if config.init_weights else randomize)


METHOD = LayerMethod(
    config_class=PsoftConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=check_target,
    resolve_config=record_fan_in_fan_out,
)

"""Combine LoRA adapters into a new one: the math behind ``PeftModel.add_weighted_adapter``.

Given adapters ``i`` with updates ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` (``sᵢ`` = their scaling) and weights ``wᵢ`` (negative ones
subtract), three families of ``combination_type`` build the new adapter (names and numbers as in peft 0.21.2):

* ``cat``: exact. ``A = [w₁s₁A₁; w₂s₂A₂; …]`` and ``B = [B₁ B₂ …]`` give ``BA = Σ wᵢ ΔWᵢ`` at rank ``Σ rᵢ``.
* On the factors (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the A's are merged
  elementwise with weights ``sign(wᵢsᵢ)·√|wᵢsᵢ|`` and the B's with ``√|wᵢsᵢ|`` (the sign on one side only), which
  keeps the rank but is only an approximation: ``(Σ √·Bᵢ)(Σ √·Aⱼ)`` has cross terms ``Bᵢ Aⱼ``. The adapters must
  share their rank.
* On the full update (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the
  ``ΔWᵢ`` are merged and a truncated SVD refactorises the result at ``svd_rank`` (Eckart–Young: the best rank-r
  approximation of the merged update), optionally clamping the factors at a quantile.

The merge rules over a list of tensors τᵢ (factors or updates), and the papers they come from:

* task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic"): ``Σ wᵢ τᵢ``.
* TIES (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models", §3): *trim* each τᵢ to its
  top ``density`` fraction by magnitude, *elect* per entry the sign with the larger total mass, and take the
  *disjoint mean* of the weighted entries that agree with it. As in peft the sign is elected on the unweighted
  trimmed tensors and the weights apply inside the mean.
* DARE (Yu et al., 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch", §3): drop each entry with probability ``1 - density`` and rescale the survivors by ``1 / density`` so the
  expected update is unchanged; then task arithmetic (``dare_linear``) or TIES' elect + disjoint mean
  (``dare_ties``).
* magnitude pruning: TIES' trim, then task arithmetic.

The new adapter has ``r = lora_alpha`` (scaling 1) so its factors hold the combination as computed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import PeftConfig, PeftType
from .errors import AdapterStateError, ConfigError
from .layers import adapter_layers, save_wrappers
from .methods.lora import LoraConfig
from .targeting import find_targets

if TYPE_CHECKING:
    from .methods.lora import LoraDelta  # read through its public API only: factors(), scaling, r, delta_weight()

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # merge A and B directly
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
_PRUNING = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}
_SIGN_ELECTION = ("ties", "dare_ties")


# --- merge rules over plain tensors --------------------------------------------------------------------------------

def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed (TIES §3, "trim")."""
    flat = tensor.flatten()  # (N,)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return tensor * keep.view_as(tensor)


def random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (§3): keep each entry with probability ``density`` and divide the survivors by ``density``.

    The mask comes from ``torch.bernoulli`` on the default generator, one draw per entry, so a seeded call draws the
    same masks as peft does for the same tensors in the same order.
    """
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """``(n, ...)`` boolean: which entries of the ``n`` stacked tensors agree with the elected sign (TIES §3,
    "elect"). The elected sign is + where the total mass (``"total"``: sum of values; ``"frequency"``: sum of
    signs) is ≥ 0; zero entries agree with neither sign."""
    signs = stacked.sign()  # (n, ...)
    mass = (stacked if method == "total" else signs).sum(dim=0)  # (...)
    return signs == torch.where(mass >= 0, 1.0, -1.0)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """``(...)``: per entry, the mean of the ``weighted`` values that agree with the elected sign (TIES §3,
    "disjoint merge"); 0 where none does."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_tensors(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, rule: str, density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """Merge same-shaped ``tensors`` with ``weights`` (one per tensor) by ``rule``: ``"linear"`` (task arithmetic),
    ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` or ``"magnitude_prune"``. A ``density`` of 1 prunes nothing."""
    pruning = _PRUNING.get(rule)
    if pruning is not None and density < 1:
        prune = magnitude_prune if pruning == "magnitude" else random_prune
        tensors = [prune(t, density) for t in tensors]
    stacked = torch.stack(list(tensors))  # (n, ...)
    weighted = stacked * weights.to(stacked.device).view(-1, *[1] * (stacked.ndim - 1))  # (n, ...)
    if rule in _SIGN_ELECTION:
        return disjoint_mean(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


def svd_factors(
    delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True, driver: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A`` the best rank-``k`` approximation of ``delta`` ``(out, in)``, ``k = min(rank, out, in)``:
    ``A = Vₖᵀ`` ``(k, in)`` and ``B = Uₖ Σₖ`` ``(out, k)``. With ``clamp``, both are clipped to ``±q`` where ``q`` is
    that quantile of all their entries together (tames outliers, as kohya-ss' svd_merge_lora does)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)  # (out, ·), (min,), (·, in)
    k = min(rank, s.numel())
    a, b = vh[:k], u[:, :k] * s[:k]  # (k, in), (out, k)
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        a, b = a.clamp(-high, high), b.clamp(-high, high)
    return a, b


# --- adapters ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Combination:
    """A validated ``add_weighted_adapter`` request (see :func:`resolve_request`)."""

    kind: str
    weights: tuple[float, ...]
    rank: int
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


def combine_layer(
    parts: Sequence[tuple[LoraDelta, float]], base_layer: torch.nn.Module, c: Combination
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new ``(A, B)`` of one layer from its ``(delta, weight)`` parts, for a new scaling of 1; the rank (dim 0 of
    A, dim 1 of B) may be below ``c.rank``."""
    factors = [(d.factors(), w) for d, w in parts]  # A (r, in, ...), B (out, r, ...)
    if c.kind == "cat":
        a = torch.cat([f.a * (w * f.scaling) for f, w in factors])  # (Σr, in, ...)
        return a, torch.cat([f.b for f, _ in factors], dim=1)  # (out, Σr, ...)
    if c.kind in FACTOR_TYPES:
        scaled = [w * f.scaling for f, w in factors]
        root = torch.tensor([math.sqrt(abs(x)) for x in scaled])
        sign = torch.tensor([1.0 if x >= 0 else -1.0 for x in scaled])
        a = merge_tensors([f.a for f, _ in factors], sign * root, c.kind, c.density, c.majority_sign_method)
        b = merge_tensors([f.b for f, _ in factors], root, c.kind, c.density, c.majority_sign_method)
        return a, b
    rule = "linear" if c.kind == "svd" else c.kind.removesuffix("_svd")
    # Merged in the base weight's own layout, as peft does, so that DARE's masks fall on the same entries.
    updates = [d.delta_weight(base_layer) for d, _ in parts]
    merged = merge_tensors(updates, torch.tensor([w for _, w in parts]), rule, c.density, c.majority_sign_method)
    flat = parts[0][0].canonical(merged, base_layer).flatten(1)  # (out, in·k...)
    if flat.dtype not in (torch.float32, torch.float64):  # no half-precision SVD on every backend
        flat = flat.float()
    a, b = svd_factors(flat, c.rank, c.svd_clamp, c.svd_full_matrices, c.svd_driver)  # (k, in·…), (out, k)
    like = factors[0][0]
    return a.reshape(-1, *like.a.shape[1:]), b.reshape(b.shape[0], -1, *like.b.shape[2:])


@torch.no_grad()
def fill(model: torch.nn.Module, adapter_name: str, adapters: Sequence[str], c: Combination) -> None:
    """Write the combination of ``adapters`` into the (freshly added) adapter ``adapter_name`` of every layer, zero
    padded up to its rank; a ``modules_to_save`` copy starts from the one combined adapter that trained it."""
    for _, layer in adapter_layers(model):
        if adapter_name not in layer.deltas:
            continue
        new = layer.deltas[adapter_name].factors()  # the new adapter's own parameters, written in place
        new.a.zero_()
        new.b.zero_()
        parts = [(layer.deltas[n], w) for n, w in zip(adapters, c.weights) if n in layer.deltas]
        if parts:
            a, b = combine_layer(parts, layer.base_layer, c)
            new.a[: a.shape[0]] = a
            new.b[:, : b.shape[1]] = b
    for _, wrapper in save_wrappers(model):
        trained = [n for n in adapters if n in wrapper.modules_to_save]
        if trained and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[trained[0]].state_dict())


def _max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _union_targets(configs: Sequence[LoraConfig]) -> list[str] | str:
    """peft's rule: lists are united; regexes are or-ed; a mix is refused."""
    patterns = [c.target_modules for c in configs]
    if all(isinstance(p, str) for p in patterns):
        return "|".join(f"({p})" for p in patterns)
    if any(isinstance(p, str) for p in patterns):
        raise ConfigError(
            f"cannot combine adapters whose target_modules mix a regex string and a list of names: {patterns}"
        )
    return sorted(set().union(*patterns))


def _check_values(
    kind: str, weights: Sequence[float], svd_rank: int | None, svd_clamp: float | None, svd_driver: str | None,
    density: float | None, majority_sign_method: str,
) -> None:
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ConfigError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp!r}")
    if svd_driver not in SVD_DRIVERS:
        raise ConfigError(f"svd_driver must be one of {list(SVD_DRIVERS)}, got {svd_driver!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    if kind.removesuffix("_svd") in _PRUNING:
        if density is None or not 0 < density <= 1:
            raise ConfigError(f"combination_type={kind!r} needs a density in (0, 1] (the fraction kept), "
                              f"got {density!r}")
    elif density is not None:
        warnings.warn(f"density is ignored by combination_type={kind!r}", stacklevel=4)


def resolve_request(
    model: torch.nn.Module, peft_config: Mapping[str, PeftConfig], adapters: Sequence[str], weights: Sequence[float],
    combination_type: str, svd_rank: int | None = None, svd_clamp: float | None = None,
    svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[LoraConfig, Combination]:
    """Check an ``add_weighted_adapter`` request against ``model`` (the base model) and its adapters' configs, and
    return the new adapter's config and the validated :class:`Combination`. Changes nothing.

    The new config is the first adapter's with ``r = lora_alpha`` = the new rank (the common rank for factor types,
    ``Σ rᵢ`` for ``cat``, ``svd_rank`` or the largest rank for SVD types), the adapters' ``target_modules`` united,
    no rank/alpha patterns, and (unlike peft) ``use_rslora=False`` and ``init_lora_weights=True``: peft keeps them,
    which scales an rsLoRA combination by ``√r`` and re-runs PiSSA/OLoRA on the base weights. Also unlike peft, a
    ``modules_to_save`` copy starts from the one adapter that trained it (peft starts from the original module), and
    requests peft would fail on midway or silently get wrong (ranks that differ on one layer under ``rank_pattern``
    for a factor type; adapters whose ``layers_to_transform`` / ``exclude_modules`` the first one's do not cover)
    are refused here.
    """
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"unknown combination_type {combination_type!r}; use one of {list(COMBINATION_TYPES)}")
    if isinstance(adapters, str) or not adapters:
        raise ConfigError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, (str, int, float)) or len(weights) != len(adapters):
        raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters {list(adapters)} but weights "
                          f"{weights!r}")
    for name in adapters:
        if name not in peft_config:
            raise AdapterStateError(f"no adapter named {name!r}; adapters: {list(peft_config)}")
        config = peft_config[name]
        if config.is_prompt_learning:
            raise AdapterStateError(f"adapter {name!r} is {config.peft_type.value}: prompt methods have no weights to "
                                    f"combine; add_weighted_adapter combines LoRA adapters")
        if config.peft_type != PeftType.LORA:
            raise ConfigError(f"adapter {name!r} is {config.peft_type.value}; add_weighted_adapter combines LoRA "
                              f"adapters only")
        if config.use_dora:
            raise ConfigError(f"adapter {name!r} uses DoRA, whose magnitude vector has no meaningful weighted "
                              f"combination; combine plain LoRA adapters, or merge_and_unload() them one by one")
        if config.lora_bias:
            raise ConfigError(f"adapter {name!r} has lora_bias=True, whose bias the combined A and B factors cannot "
                              f"carry; combine adapters without lora_bias, or merge_and_unload() them one by one")
        if config.trainable_token_indices:
            raise ConfigError(f"adapter {name!r} trains token embeddings (trainable_token_indices), which "
                              f"add_weighted_adapter cannot combine (peft gives the combination the original rows, "
                              f"dropping what was trained); combine adapters without them, or merge_and_unload()")
        if config.target_parameters:
            raise ConfigError(f"adapter {name!r} uses target_parameters (per-expert factors), which "
                              f"add_weighted_adapter cannot combine (peft refuses it too); merge_and_unload() instead")
    try:
        weights = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be numbers, got {weights!r}") from None
    kind = "linear" if len(adapters) == 1 else combination_type  # as peft: one adapter is just scaled
    _check_values(kind, weights, svd_rank, svd_clamp, svd_driver, density, majority_sign_method)
    configs = [peft_config[n] for n in adapters]
    ranks = [_max_rank(c) for c in configs]
    if kind in FACTOR_TYPES and len(set(ranks)) > 1:
        raise ConfigError(f"combination_type={kind!r} merges the A and B factors directly, so every adapter needs the "
                          f"same rank; got r={dict(zip(adapters, ranks))}. Use 'cat' or an SVD type (e.g. 'svd').")
    rank = ranks[0] if kind in FACTOR_TYPES else sum(ranks) if kind == "cat" else svd_rank or max(ranks)

    layers = [(name, layer) for name, layer in adapter_layers(model) if any(a in layer.deltas for a in adapters)]
    for name, layer in layers:
        layer_ranks = {layer.deltas[a].r for a in adapters if a in layer.deltas}
        if kind in FACTOR_TYPES and len(layer_ranks) > 1:
            raise ConfigError(f"combination_type={kind!r} needs equal ranks, but the adapters have ranks "
                              f"{sorted(layer_ranks)} on {name!r} (rank_pattern); use 'cat' or an SVD type")
        if svd_driver is not None and any(p.device.type != "cuda" for a in adapters if a in layer.deltas
                                          for p in layer.deltas[a].parameters()):
            raise ConfigError(f"svd_driver={svd_driver!r} needs the adapters on a CUDA device; leave it None here")
    for name, wrapper in save_wrappers(model):
        trained = [a for a in adapters if a in wrapper.modules_to_save]
        if len(trained) > 1:
            raise ConfigError(f"adapters {trained} each train their own copy of {name!r} (modules_to_save), and whole "
                              f"modules cannot be combined; combine adapters of which at most one trains it")

    saved = sorted({m for c in configs for m in c.modules_to_save or []})
    new_config = dataclasses.replace(
        configs[0], r=rank, lora_alpha=rank, target_modules=_union_targets(configs), rank_pattern={},
        alpha_pattern={}, use_rslora=False, init_lora_weights=True, modules_to_save=saved or None,
    )
    selected = set(find_targets(model, new_config)[1])
    missed = [name for name, _ in layers if name not in selected]
    if missed:
        raise ConfigError(f"the combined adapter would not reach {missed[:5]}, which some of {list(adapters)} adapt: "
                          f"their layers_to_transform / exclude_modules differ from {adapters[0]!r}'s; combine "
                          f"adapters that select modules the same way")
    return new_config, Combination(kind, weights, rank, density, majority_sign_method, svd_clamp, svd_full_matrices,
                                   svd_driver)

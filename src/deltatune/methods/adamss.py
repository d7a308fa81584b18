"""AdaMSS: low-rank updates in several subspaces found by clustering the weight's singular vectors.

"AdaMSS: Adaptive Multi-Subspaces" (as peft 0.21.2 implements it, after the authors' ``adamss_pkg``), §3: the weight
with its bias as an extra column, ``W̃ = [W | b] ∈ R^{out×(in+1)}``, gets a rank-``R`` SVD ``W̃ ≈ U S Vᵀ``
(``R = min(r, out, in+1)``; ``torch.svd_lowrank``, 2 iterations, its random projection drawn from torch's global
generator seeded with ``random_seed`` inside a forked RNG state, as peft). The rows of ``U`` (one per output feature)
are clustered into ``K = min(num_subspaces, out)`` groups by scikit-learn's ``KMeans`` (random init, one run, 10
iterations, ``random_state=123456789``, on float32, as peft); group ``k`` holds output features ``S_k``. Each group
trains its own low-rank map from the shared projection ``z = Vᵀ [x; 1]`` (``R`` values):

    Δy[S_k] = B_k A_k z,    A_k ∈ R^{r_k×R},  B_k ∈ R^{|S_k|×r_k}

``r_k = min(|S_k|, subspace_rank)``, or with ``use_dynamic_rank`` the number of singular values of
``U[S_k] U[S_k]ᵀ`` above ``svd_threshold`` times the largest (at most ``subspace_rank``, at least 1). ``A_k`` starts
as the orthonormal basis (QR) of ``U[S_k]ᵀ`` times the leading singular vectors of that Gram matrix; ``B_k = 0``
(``init_weights="orthogonal"``, the base model) or ``N(0, 0.01²)`` (``None``, for tests). Merging adds
``ΔW̃ = scatter_k(B_k A_k Vᵀ)``: its last column to the bias, the rest to the weight.

Saved keys, peft's: ``<module>.adamss_A.<k>``, ``<module>.adamss_B.<k>`` and the frozen projection
``<module>.adamss_newB`` ``(R, in+1)`` (``(R, in)`` without a bias). The groups are not saved: both libraries rebuild
them from the base weight on load (the same SVD and KMeans calls), so a file is valid only on the base weights it was
trained on; group sizes that disagree with the file are refused by the loader's shape check.

Adaptive Subspace Allocation (``use_asa``, §3.3), as peft runs it from ``model.base_model.update_and_allocate(step)``
(also run by ``base_model.after_optimizer_step(step)``, so ``deltatune train`` applies it): from ``init_warmup`` to
``final_warmup`` each subspace's factors keep EMAs of their importance ``|p · ∂L/∂p|`` (``asa_importance_beta``) and
of its change (``asa_uncertainty_beta``); every ``mask_interval`` steps the subspaces of all layers are ranked by
``mean(I_A · U_A) + mean(I_B · U_B)`` and only those scoring above the ``k``-th best keep training (the others stop
receiving gradients), ``k`` falling from all subspaces to ``asa_target_subspaces`` as ``(1 − progress)^exponent``;
the EMAs then restart. The scores are training state, not saved. scikit-learn is an optional
dependency (``pip install 'deltatune[adamss]'``), imported when an AdaMSS adapter is built. Layer type: ``nn.Linear``,
as in peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..kernels import accumulate
from ..layers import Delta, adapter_layers
from ..registry import LayerMethod
from .common import adapter_dtype, check_scale, check_seed, check_size

__all__ = ["AdamssConfig"]  # exported from deltatune

_KMEANS_SEED = 123456789  # peft's KMeans random_state
_KMEANS_ITERATIONS = 10
_SVD_ITERATIONS = 2


@dataclass
class AdamssConfig(LayerConfig):
    """Configuration of an AdaMSS adapter (peft's field names). Shared targeting fields: ``target_modules``,
    ``layers_to_transform``, ``layers_pattern`` and ``modules_to_save`` (see ``LayerConfig``); peft's
    ``AdamssConfig`` has no ``exclude_modules``.

    Attributes:
        r: Rank ``R`` of the SVD the subspaces are found in (capped at ``min(out, in+1)`` per layer).
        num_subspaces: Clusters ``K`` of output features, each with its own low-rank map (capped at ``out``).
        subspace_rank: Rank of each subspace's map (capped at its size).
        init_weights: ``"orthogonal"``: ``B_k = 0`` (the base model); ``None`` (or ``False``, as peft reads it):
            small random ``B_k``, for tests.
        use_asa: Adaptive Subspace Allocation: prune the least important subspaces during training (see above).
        asa_target_subspaces: Subspaces (over all layers) that keep training at the end of the schedule.
        init_warmup: Step at which importance tracking and pruning start.
        final_warmup: Step at which the schedule reaches ``asa_target_subspaces``; after it nothing changes.
        mask_interval: Steps between two prunings.
        asa_importance_beta: EMA coefficient of the importance.
        asa_uncertainty_beta: EMA coefficient of the importance's change.
        asa_schedule_exponent: How fast the number of training subspaces falls (1: linearly).
        use_dynamic_rank: Each subspace's rank from its Gram matrix's singular values (``svd_threshold``).
        svd_threshold: Share of the largest singular value a counted one must exceed (``use_dynamic_rank``).
        random_seed: Seed of the SVD's random projection.
    """

    peft_type: PeftType = field(default=PeftType.ADAMSS, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    init_weights: str | None = "orthogonal"
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_subspaces", "subspace_rank"):
            check_size(name, getattr(self, name))
        if self.init_weights is False:
            self.init_weights = None  # peft's reading of False
        if self.init_weights not in ("orthogonal", None):
            raise ConfigError(f"init_weights must be 'orthogonal' or None, got {self.init_weights!r}")
        for name in ("use_asa", "use_dynamic_rank"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval"):
            check_size(name, getattr(self, name), allow_zero=True)
        for name in ("asa_importance_beta", "asa_uncertainty_beta", "asa_schedule_exponent", "svd_threshold"):
            check_scale(name, getattr(self, name))
        if self.use_asa:  # peft checks the schedule only when it runs
            if self.mask_interval < 1 or self.asa_target_subspaces < 1:
                raise ConfigError(f"mask_interval and asa_target_subspaces must be positive with use_asa=True, got "
                                  f"{self.mask_interval} and {self.asa_target_subspaces}")
            if self.init_warmup >= self.final_warmup:
                raise ConfigError(f"init_warmup ({self.init_warmup}) must be smaller than final_warmup "
                                  f"({self.final_warmup}) with use_asa=True")
            if self.asa_schedule_exponent <= 0:
                raise ConfigError(f"asa_schedule_exponent must be positive with use_asa=True, got "
                                  f"{self.asa_schedule_exponent}")
        check_seed("random_seed", self.random_seed)


def _kmeans() -> type:
    """scikit-learn's ``KMeans``, imported on first use: the optional ``adamss`` extra."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise ConfigError("AdaMSS clusters singular vectors with scikit-learn, which is not installed; install "
                          "the extra: pip install 'deltatune[adamss]'") from exc
    return KMeans


def _require_sklearn(config: AdamssConfig, base_layer: nn.Module, name: str) -> None:
    """The check before anything is built: scikit-learn must be importable."""
    _kmeans()


class AdamssDelta(Delta):
    """``Δy[S_k] = B_k A_k Vᵀ [x; 1]`` for each group ``k``; ``Vᵀ`` (``adamss_newB``) frozen."""

    def __init__(self, projection: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor],
                 order: torch.Tensor, out_features: int, has_bias: bool) -> None:
        super().__init__()
        self.register_buffer("adamss_newB", projection)  # (R, in [+1]): saved, as in peft
        self.adamss_A = nn.ParameterList(nn.Parameter(t) for t in a)  # (r_k, R)
        self.adamss_B = nn.ParameterList(nn.Parameter(t) for t in b)  # (|S_k|, r_k)
        self.register_buffer("order", order, persistent=False)  # S_0, S_1, ... concatenated: (out,)
        self.out_features, self.has_bias = out_features, has_bias
        # ASA's EMAs per factor, ``[I_A, I_B, U_A, U_B]`` per subspace; ``None`` until its first gradient
        self.scores: list[list[torch.Tensor | None]] = [[None] * 4 for _ in self.adamss_A]

    def update_importance(self, importance_beta: float, uncertainty_beta: float) -> None:
        """Fold this step's gradients into the EMAs (the change is taken against the importance before it moves)."""
        for i, pair in enumerate(zip(self.adamss_A, self.adamss_B)):
            for j, param in enumerate(pair):
                if param.grad is None:
                    continue
                entry = self.scores[i]
                if entry[j] is None:
                    entry[j], entry[j + 2] = torch.zeros_like(param), torch.zeros_like(param)
                importance = (param * param.grad).abs().detach()
                entry[j + 2].mul_(uncertainty_beta).add_((importance - entry[j]).abs(), alpha=1 - uncertainty_beta)
                entry[j].mul_(importance_beta).add_(importance, alpha=1 - importance_beta)

    def subspace_scores(self) -> list[tuple[int, torch.Tensor]]:
        """``(subspace, mean(I_A·U_A) + mean(I_B·U_B))`` for each subspace whose factors both have scores."""
        return [(i, (ia * ua).mean() + (ib * ub).mean()) for i, (ia, ib, ua, ub) in enumerate(self.scores)
                if ia is not None and ib is not None]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        proj = self.adamss_newB
        z = F.linear(x.to(proj.dtype), proj[:, :-1] if self.has_bias else proj)  # (..., R)
        if self.has_bias:
            z = z + proj[:, -1]  # the bias column meets the constant 1
        parts = [F.linear(F.linear(z, a), b) for a, b in zip(self.adamss_A, self.adamss_B)]  # (..., |S_k|)
        update = z.new_zeros(*z.shape[:-1], self.out_features).index_copy(-1, self.order, torch.cat(parts, -1))
        return accumulate(base_out, update, 1.0)

    def _full_update(self) -> torch.Tensor:
        """``ΔW̃`` ``(out, in [+1])``."""
        rows = torch.cat([b @ a @ self.adamss_newB for a, b in zip(self.adamss_A, self.adamss_B)])
        return rows.new_zeros(self.out_features, rows.shape[1]).index_copy(0, self.order, rows)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        update = self._full_update()
        return (update[:, :-1] if self.has_bias else update).to(base_layer.weight.dtype)

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return bias + self._full_update()[:, -1].to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return bias - self._full_update()[:, -1].to(bias.dtype)

    def extra_repr(self) -> str:
        sizes = [b.shape[0] for b in self.adamss_B]
        return f"R={self.adamss_newB.shape[0]}, subspaces={sizes}"


def _subspaces(config: AdamssConfig, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``(Vᵀ, [A_k], [B_k], order)`` for one layer, by the same calls as peft (see the module docstring)."""
    out_features = weight.shape[0]
    w = torch.cat((weight, bias[:, None]), dim=1) if bias is not None else weight
    w = w.detach().float()  # (out, in [+1])
    rank = min(config.r, *w.shape)
    devices = [] if w.device.type == "cpu" else [w.device]
    kwargs = {} if w.device.type == "cpu" else {"device_type": w.device.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.manual_seed(config.random_seed)
        u, _, v = torch.svd_lowrank(w, q=rank, niter=_SVD_ITERATIONS)
    u, vt = u[:, :rank], v[:, :rank].T  # (out, R), (R, in [+1])
    clusters = min(config.num_subspaces, out_features)
    labels = _kmeans()(n_clusters=clusters, init="random", n_init=1, max_iter=_KMEANS_ITERATIONS,
                       random_state=_KMEANS_SEED).fit_predict(u.detach().cpu().numpy().astype("float32"))
    labels = torch.from_numpy(labels).long()
    groups = [torch.where(labels == k)[0] for k in range(clusters)]
    a_list, b_list = [], []
    for rows in groups:
        part = u[rows]  # (|S_k|, R)
        gram = part @ part.T
        if config.use_dynamic_rank:
            values = torch.svd_lowrank(gram, q=min(gram.shape), niter=_SVD_ITERATIONS)[1]
            rank_k = max(1, min(int((values > config.svd_threshold * values[0]).sum()), config.subspace_rank,
                                len(values)))
        else:
            rank_k = max(1, min(len(rows), config.subspace_rank))
        basis = torch.svd_lowrank(gram, q=min(gram.shape[0], rank_k), niter=_SVD_ITERATIONS)[0][:, :rank_k]
        a_list.append(torch.linalg.qr(part.T @ basis, mode="reduced").Q.T.contiguous())  # (r_k, R)
        b_list.append(torch.zeros(len(rows), rank_k) if config.init_weights == "orthogonal"
                      else torch.randn(len(rows), rank_k) * 0.01)
    return vt, a_list, b_list, torch.cat(groups).to(weight.device)


def _meta_bound(config: AdamssConfig, base_layer: nn.Module) -> AdamssDelta:
    """A delta on the meta device at least as large as the real one (group sizes are only known after clustering):
    what the dry run that bounds a loaded adapter's size needs."""
    out_features, columns = base_layer.out_features, base_layer.in_features + (base_layer.bias is not None)
    rank, clusters = min(config.r, out_features, columns), min(config.num_subspaces, out_features)
    sizes = [out_features - clusters + 1] + [1] * (clusters - 1)
    return AdamssDelta(torch.empty(rank, columns), [torch.empty(config.subspace_rank, rank)] * clusters,
                       [torch.empty(n, config.subspace_rank) for n in sizes],
                       torch.empty(out_features, dtype=torch.long), out_features, base_layer.bias is not None)


def make_delta(config: AdamssConfig, base_layer: nn.Module, name: str) -> AdamssDelta:
    """Build the AdaMSS delta of ``base_layer`` (module ``name``): SVD, clustering and each group's factors."""
    weight = base_layer.weight
    if weight.device.type == "meta":
        return _meta_bound(config, base_layer).to(device="meta")
    with torch.no_grad():
        vt, a_list, b_list, order = _subspaces(config, weight, base_layer.bias)
    delta = AdamssDelta(vt, a_list, b_list, order, base_layer.out_features, base_layer.bias is not None)
    # peft keeps the factors in the base weight's dtype (float32 beside a half-precision base, by the dtype rule)
    return delta.to(device=weight.device, dtype=adapter_dtype(weight.dtype))


def update_and_allocate(base_model: nn.Module, global_step: int) -> None:
    """One step of Adaptive Subspace Allocation for every AdaMSS adapter with ``use_asa`` being trained (see the
    module docstring); peft's user API, called as ``model.base_model.update_and_allocate(step)`` after
    ``loss.backward()`` and before ``zero_grad()``."""
    for name, config in base_model.peft_config.items():
        if config.peft_type != PeftType.ADAMSS or not config.use_asa or config.inference_mode:
            continue
        deltas = [layer.deltas[name] for _, layer in adapter_layers(base_model.model) if name in layer.active_adapters
                  and name in layer.deltas]
        if not deltas or not config.init_warmup <= global_step <= config.final_warmup:
            continue
        for delta in deltas:
            delta.update_importance(config.asa_importance_beta, config.asa_uncertainty_beta)
        if global_step % config.mask_interval == 0:
            _keep_best(deltas, _scheduled_subspaces(config, sum(len(d.adamss_A) for d in deltas), global_step))
            for delta in deltas:
                delta.scores = [[None] * 4 for _ in delta.adamss_A]


def _scheduled_subspaces(config: AdamssConfig, total: int, step: int) -> int:
    """How many subspaces train after a pruning at ``step`` (``init_warmup ≤ step ≤ final_warmup``)."""
    remaining = 1.0 - (step - config.init_warmup) / (config.final_warmup - config.init_warmup)
    remaining = max(0.0, min(1.0, remaining))
    target = config.asa_target_subspaces
    return int(target + (total - target) * remaining ** config.asa_schedule_exponent)


def _keep_best(deltas: list[AdamssDelta], keep: int) -> None:
    """Let only the subspaces scoring above the ``keep``-th best (over all layers) train."""
    scored = [(delta, i, score) for delta in deltas for i, score in delta.subspace_scores()]
    if not scored:
        return
    scores = torch.stack([score.to(scored[0][2].device) for _, _, score in scored])
    threshold = float("-inf") if keep >= len(scored) else torch.kthvalue(-scores, keep).values.neg().item()
    for delta, i, score in scored:
        active = float(score) > threshold
        for param in (delta.adamss_A[i], delta.adamss_B[i]):
            param.requires_grad_(active)
            if not active:
                param.grad = None


METHOD = LayerMethod(
    config_class=AdamssConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    check_target=_require_sklearn,
    model_functions={"update_and_allocate": update_and_allocate},
    after_step=update_and_allocate,
)

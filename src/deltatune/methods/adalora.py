"""AdaLoRA: LoRA in SVD form whose rank budget moves, during training, to the layers that need it.

Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning":

* §3.1: ``ΔW = P Λ Q`` with ``P ∈ R^{d×r}`` (``lora_B``), ``Λ = diag(λ)`` (``lora_E``, shape ``(r, 1)``) and
  ``Q ∈ R^{r×k}`` (``lora_A``), scaled by ``lora_alpha / ranknum`` where ``ranknum`` is the initial rank ``init_r``
  (pruning does not change it). An orthogonality regulariser ``R(P, Q)`` keeps ``P`` and ``Q`` near orthonormal, so
  ``λ`` behave like singular values and zeroing one removes one rank-1 direction.
* §3.2: the importance of a weight is its sensitivity ``|w · ∂L/∂w|`` smoothed by an EMA (``beta1``) times its
  uncertainty, an EMA (``beta2``) of how far the sensitivity strays from the smoothed one. A triplet ``(P·i, λi, Qi·)``
  scores ``s(λi) + mean_j s(Pji) + mean_j s(Qij)``.
* §3.3: the total budget (kept triplets over all layers) falls from ``init_r`` per layer to ``target_r`` per layer
  along a cubic between steps ``tinit`` and ``total_step - tfinal``; every ``deltaT`` steps the least important
  ``λi`` are set to zero (they may grow back until the final allocation, which then stays fixed).

As peft computes it (so that training runs and files agree): the regulariser is the *mean* over all ``P`` and ``Q``
of the (not squared) Frobenius norm ``‖PᵀP − I‖`` / ``‖QQᵀ − I‖``, weighted by ``orth_reg_weight``; the scaling
divides by ``ranknum + 1e-5``. Training calls ``model.base_model.update_and_allocate(step)`` after each
``optimizer.step()`` and before ``zero_grad()``; the regulariser joins ``outputs.loss`` on its own in train mode.

The allocation is stored as ``rank_pattern``, ``{"<module path>.lora_E": [kept?] * init_r}``, in the config; a saved
file holds only the kept triplets (so a pruned layer's tensors are smaller, down to rank 0), and loading builds each
layer at its kept rank. A training checkpoint also holds the full factors and the allocator's state
(:meth:`AdaLoraDelta.train_state`), so a resumed run continues exactly. Layer types: ``nn.Linear``, transformers
``Conv1D`` and ``nn.Conv2d``, as in peft.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PeftType
from ..errors import AdapterStateError, ConfigError, TargetError
from ..kernels import LowRank, add_low_rank
from ..layers import adapter_layers
from ..registry import LayerMethod
from ..targeting import DEFAULT_ATTENTION_TARGETS
from .common import check_scale, place_delta
from .lora import LoraConfig, LoraDelta, LoraLinear

__all__ = ["AdaLoraConfig"]  # exported from deltatune

# peft's AdaLoRA defaults where they differ from LoRA's (whole attention and feed-forward blocks).
_DEFAULT_TARGETS = {
    **DEFAULT_ATTENTION_TARGETS,
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
_FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (peft's field names; the LoRA fields are inherited from ``LoraConfig``).

    Of LoRA's fields, ``lora_alpha``, ``lora_dropout``, ``bias``, ``fan_in_fan_out`` and ``init_lora_weights``
    (``True``: ``λ = 0``, ``P``, ``Q`` ~ N(0, 0.02²); ``False``: all N(0, 1), a non-zero delta) apply; ``r``,
    ``use_rslora`` and ``alpha_pattern`` have no effect (as in peft; a warning says so) and DoRA is refused.

    Attributes:
        target_r: Average rank per layer at the end of the budget schedule.
        init_r: Rank every layer starts with.
        tinit: Warm-up steps before any triplet is pruned.
        tfinal: Final steps that train the final allocation without changing it.
        deltaT: Prune every ``deltaT`` steps during the budget schedule.
        beta1: EMA factor of the smoothed sensitivity.
        beta2: EMA factor of the uncertainty.
        orth_reg_weight: Weight of the orthogonality regulariser added to the training loss.
        total_step: Number of training steps; required, since the schedule is laid out over it.
        rank_pattern: The allocation found by training, ``{"<module path>.lora_E": [kept?] * init_r}`` (written by
            ``update_and_allocate``; ``None`` before the first pruning).
    """

    peft_type: PeftType = field(default=PeftType.ADALORA, init=False)
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        # LoRA's checks read rank_pattern as ranks; here it holds masks, checked below.
        masks, self.rank_pattern = self.rank_pattern, {}
        super().__post_init__()
        self.rank_pattern = masks
        if self.use_dora or not isinstance(self.init_lora_weights, bool):
            raise ConfigError("AdaLoRA supports neither DoRA nor init schemes other than init_lora_weights=True/False")
        if self.lora_bias:  # peft's AdaLoRA layers ignore the field; refused rather than silently dropped
            raise ConfigError("AdaLoRA does not support lora_bias=True; use LoraConfig for a bias on lora_B")
        # LoraConfig fields implemented for LoRA only (the hooks live on LoRA's method): refused, never ignored
        lora_only = ("target_parameters", "trainable_token_indices", "layer_replication", "ensure_weight_tying")
        used = [f for f in lora_only if getattr(self, f)]
        if used:
            raise ConfigError(f"AdaLoRA does not support {used} here; use LoraConfig for them")
        ignored = [f for f, off in (("r", 8), ("use_rslora", False), ("alpha_pattern", {})) if getattr(self, f) != off]
        if ignored:
            warnings.warn(f"AdaLoRA ignores {ignored} (set init_r for the starting rank)", stacklevel=3)
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoRA needs total_step (> 0), the number of training steps the budget schedule spans")
        if not 0 <= self.tinit < self.total_step - self.tfinal or self.tfinal < 0:
            raise ConfigError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no budgeting phase; "
                f"need 0 <= tinit < total_step - tfinal"
            )
        if self.init_r <= 0 or self.target_r < 0 or self.deltaT <= 0:
            raise ConfigError(f"need init_r > 0, target_r >= 0, deltaT > 0; got {self.init_r}, {self.target_r}, "
                              f"{self.deltaT}")
        check_scale("orth_reg_weight", self.orth_reg_weight)  # NaN would make every training loss NaN
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1) or self.orth_reg_weight < 0:
            raise ConfigError(f"need 0 < beta1, beta2 < 1 and orth_reg_weight >= 0; got {self.beta1}, {self.beta2}, "
                              f"{self.orth_reg_weight}")
        for key, mask in (self.rank_pattern or {}).items():
            if not key.endswith(".lora_E") or len(mask) != self.init_r:
                raise ConfigError(
                    f"rank_pattern[{key!r}] must name '<module path>.lora_E' and hold init_r={self.init_r} booleans "
                    f"(one per initial triplet), got {len(mask)}"
                )


def budget_schedule(step: int, config: AdaLoraConfig, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """``(budget, prune now?)`` at ``step`` (§3.3): ``init_budget`` through ``tinit``, then a cubic decay reaching
    ``target_budget`` at ``total_step - tfinal``, pruning every ``deltaT`` steps; after that ``target_budget``."""
    end = config.total_step - config.tfinal
    if step <= config.tinit:
        return init_budget, False
    if step > end:
        return target_budget, True
    remaining = 1 - (step - config.tinit) / (end - config.tinit)
    return int((init_budget - target_budget) * remaining**3 + target_budget), step % config.deltaT == 0


class AdaLoraDelta(LoraDelta):
    """``scaling · P Λ Q`` with the importance statistics of its own triplets (§3.2) kept alongside.

    ``held`` (``init_r`` booleans, ``None`` for all) says which of the initial triplets this delta's rows are (all of
    them unless it
    was built from a saved ``rank_pattern``); ``kept`` (``(r,)`` bool) which rows the allocator keeps, ``None``
    before it first prunes.
    """

    constants = ("ranknum",)

    def __init__(self, init_r: int, held: list[bool] | None, alpha: float, dropout: float, in_features: int,
                 out_features: int) -> None:
        r = init_r if held is None else sum(held)  # no O(init_r) work for a fresh adapter (a corrupt init_r)
        super().__init__(init_r, alpha, dropout, use_rslora=False)  # the rank-0 safe scaling is set below
        self.init_r, self.r, self.held, self.kept = init_r, r, held, None
        self.scaling = (alpha if alpha > 0 else r) / (init_r + 1e-5)  # peft: α / (ranknum + 1e-5); α = 0 means r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # Q: (r, in)
        self.lora_E = nn.Parameter(torch.empty(r, 1))  # λ: (r, 1)
        self.lora_B = nn.Parameter(torch.empty(out_features, r))  # P: (out, r)
        self._importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # peft's frozen record of the initial rank; the scaling above already holds it. Kept for equal counts.
        self.ranknum = nn.Parameter(torch.full((1,), float(init_r)), requires_grad=False)

    def scaled_a(self) -> torch.Tensor:
        return self.lora_A * self.lora_E  # Λ Q: (r, in)

    def lora_weight(self) -> torch.Tensor:
        return self.lora_B @ self.scaled_a()  # (out, r) @ (r, in)

    def factors(self) -> LowRank:
        return LowRank(self.scaled_a(), self.lora_B, self.scaling)  # Λ Q is computed: reading it changes nothing

    # --- the rank allocator's side (§3.2) -------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Fold this step's sensitivity ``|w · grad|`` into the smoothed sensitivity and the uncertainty."""
        for name in _FACTORS:
            param = getattr(self, name)
            if param.grad is None:
                raise AdapterStateError(
                    "update_and_allocate needs the gradients of the step: call it after loss.backward() and "
                    "optimizer.step() but before optimizer.zero_grad()"
                )
            sensitivity = (param * param.grad).abs()
            smooth, uncertainty = self._importance.get(name, (torch.zeros_like(param), torch.zeros_like(param)))
            smooth = beta1 * smooth + (1 - beta1) * sensitivity
            self._importance[name] = (smooth, beta2 * uncertainty + (1 - beta2) * (sensitivity - smooth).abs())

    def triplet_scores(self) -> torch.Tensor:
        """``(r,)``: each triplet's importance ``s(λi) + mean_j s(Qij) + mean_j s(Pji)``."""
        if not self._importance:
            raise AdapterStateError("no importance scores yet: call update_and_allocate after every optimizer step")
        score = {name: smooth * uncertainty for name, (smooth, uncertainty) in self._importance.items()}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    def reset_importance(self) -> None:
        self._importance = {}

    @torch.no_grad()
    def keep(self, kept: torch.Tensor | None = None) -> None:
        """Zero the ``λ`` of the triplets not kept (``kept``, else the last allocation)."""
        self.kept = self.kept if kept is None else kept
        if self.kept is not None:
            self.lora_E.masked_fill_(~self.kept.view(-1, 1), 0.0)

    def pattern(self) -> list[bool]:
        """This delta's entry of ``rank_pattern``: which of the ``init_r`` initial triplets survive."""
        held = [True] * self.init_r if self.held is None else self.held
        pattern = torch.tensor(held, dtype=torch.bool, device="cpu")
        if self.kept is not None:
            pattern[pattern.clone()] = self.kept.cpu()
        return pattern.tolist()

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the kept triplets, as peft saves them; the file's ``rank_pattern`` says which they were."""
        if self.kept is None or bool(self.kept.all()):
            return super().saved_state_dict()
        return {"lora_A": self.lora_A[self.kept], "lora_E": self.lora_E[self.kept], "lora_B": self.lora_B[:, self.kept]}

    def train_state(self) -> dict[str, torch.Tensor]:
        """The full factors (pruned triplets keep training until the final allocation), ``kept`` and the EMAs."""
        state = {name: getattr(self, name) for name in _FACTORS}
        if self.kept is not None:
            state["kept"] = self.kept
        for name, (smooth, uncertainty) in self._importance.items():
            state[f"importance.{name}.smooth"], state[f"importance.{name}.uncertainty"] = smooth, uncertainty
        return state

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        device = self.lora_E.device
        self.kept = state["kept"].to(device=device, dtype=torch.bool) if "kept" in state else None
        self._importance = {
            name: (state[f"importance.{name}.smooth"].to(device), state[f"importance.{name}.uncertainty"].to(device))
            for name in _FACTORS if f"importance.{name}.smooth" in state
        }


class AdaLoraLinear(AdaLoraDelta):
    """AdaLoRA on ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``)."""

    canonical = staticmethod(LoraLinear.canonical)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.scaled_a()), self.lora_B)

    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0:  # every triplet of this layer was pruned
            return out
        return add_low_rank(out, F.linear(x, self.scaled_a()), self.lora_B, self.scaling)  # xa: (..., r)


class AdaLoraConv2d(AdaLoraDelta):
    """AdaLoRA on ``nn.Conv2d``: ``Q`` spans the flattened kernel, ``(r, in·kh·kw)``; the update is one convolution
    with the base layer's stride, padding and dilation."""

    channel_dim = 1

    def __init__(self, init_r: int, held: list[bool] | None, alpha: float, dropout: float,
                 base_layer: nn.Conv2d) -> None:
        super().__init__(init_r, held, alpha, dropout, base_layer.weight[0].numel(), base_layer.out_channels)
        self.kernel_shape = tuple(base_layer.weight.shape)
        self._conv = dict(stride=base_layer.stride, padding=base_layer.padding, dilation=base_layer.dilation)

    def lora_weight(self) -> torch.Tensor:
        return super().lora_weight().view(self.kernel_shape)  # (out, in, kh, kw)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.lora_weight(), **self._conv)


def check_target(config: AdaLoraConfig, base_layer: nn.Module, name: str) -> None:
    if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
        raise TargetError(f"{name}: AdaLoRA on grouped convolutions (groups={base_layer.groups}) is not supported")


def make_delta(config: AdaLoraConfig, base_layer: nn.Module, name: str) -> AdaLoraDelta:
    """Build the delta for module ``name`` at its rank in ``config.rank_pattern`` (a loaded allocation), else at
    ``init_r``."""
    mask = (config.rank_pattern or {}).get(f"{name}.lora_E")
    held = None if mask is None else [bool(v) for v in mask]
    if isinstance(base_layer, nn.Conv2d):
        delta = AdaLoraConv2d(config.init_r, held, config.lora_alpha, config.lora_dropout, base_layer)
    else:
        out_features, in_features = AdaLoraLinear.canonical(base_layer.weight, base_layer).shape
        delta = AdaLoraLinear(config.init_r, held, config.lora_alpha, config.lora_dropout, in_features, out_features)
    std = 0.02 if config.init_lora_weights else 1.0  # peft: λ = 0 and small P, Q; or all N(0, 1) (a non-zero delta)
    for param in (delta.lora_A, delta.lora_E, delta.lora_B):
        nn.init.normal_(param, std=std)
    if config.init_lora_weights:
        nn.init.zeros_(delta.lora_E)
    return place_delta(delta, base_layer.weight)


def _deltas(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraDelta]:
    return {path: layer.deltas[adapter_name] for path, layer in adapter_layers(model) if adapter_name in layer.deltas}


def orthogonality_loss(model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> torch.Tensor | None:
    """``orth_reg_weight`` times the mean over every ``P`` and ``Q`` of ``‖PᵀP − I‖_F`` / ``‖QQᵀ − I‖_F`` (§3.1, as
    peft computes it); ``None`` for an adapter that is not being trained."""
    deltas = [d for d in _deltas(model, adapter_name).values() if d.lora_A.requires_grad]
    if not deltas or config.orth_reg_weight == 0:
        return None
    norms = []
    for delta in deltas:
        a, b = delta.lora_A, delta.lora_B
        eye = torch.eye(delta.r, device=a.device, dtype=a.dtype)
        norms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]  # of (r, r)
    device = norms[0].device
    return config.orth_reg_weight * torch.stack([n.to(device) for n in norms]).mean()


def update_and_allocate(base_model: nn.Module, global_step: int) -> None:
    """One step of the rank allocator for every AdaLoRA adapter being trained (§3.2-3.3); peft's user API, called as
    ``model.base_model.update_and_allocate(step)`` after ``optimizer.step()`` and before ``zero_grad()``.

    Until ``total_step - tfinal`` the importance scores absorb this step's gradients and, on pruning steps, the
    ``λ`` of the least important triplets over all layers are zeroed so that the budget of the schedule remains;
    at ``total_step - tfinal`` the final allocation is made, and afterwards it is re-applied every step (the
    optimizer moves zeroed ``λ``). Each allocation is written to the config's ``rank_pattern``.
    """
    for name, config in base_model.peft_config.items():
        if config.peft_type != PeftType.ADALORA or config.inference_mode:
            continue
        deltas = _deltas(base_model.model, name)
        if deltas and next(iter(deltas.values())).lora_A.requires_grad:  # an inactive adapter does not train
            _allocate(config, deltas, global_step)


def _allocate(config: AdaLoraConfig, deltas: dict[str, AdaLoraDelta], step: int) -> None:
    end = config.total_step - config.tfinal
    if step > end:
        for delta in deltas.values():
            delta.keep()
        return
    init_budget, target_budget = sum(d.r for d in deltas.values()), config.target_r * len(deltas)
    if target_budget > init_budget:
        raise ConfigError(f"target_r={config.target_r} exceeds the starting ranks (init_r={config.init_r}); "
                          f"AdaLoRA only prunes")
    if step < end:
        for delta in deltas.values():
            delta.update_importance(config.beta1, config.beta2)
    budget, prune = budget_schedule(step, config, init_budget, target_budget)
    if not (prune or step == end) or budget >= init_budget:
        return
    scores = {path: delta.triplet_scores() for path, delta in deltas.items()}
    everything = torch.cat([s.to(next(iter(scores.values())).device) for s in scores.values()])
    threshold = torch.kthvalue(everything, init_budget - budget).values.item()  # the (init - budget)-th smallest
    for path, delta in deltas.items():
        delta.keep(scores[path] > threshold)
    config.rank_pattern = {f"{path}.lora_E": delta.pattern() for path, delta in deltas.items()}
    if step == end:
        for delta in deltas.values():
            delta.reset_importance()


METHOD = LayerMethod(
    config_class=AdaLoraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D, nn.Conv2d),
    default_targets=_DEFAULT_TARGETS,
    check_target=check_target,
    loss_term=orthogonality_loss,
    model_functions={"update_and_allocate": update_and_allocate},
    after_step=update_and_allocate,
)

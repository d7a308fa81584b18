"""Optimizers peft ships for LoRA, with peft's signatures (``deltatune.optimizers`` as ``peft.optimizers``).

LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354, §3): with
``B = 0`` at init, A and B play different roles and one learning rate for both is inefficient at large width; B should
learn ``λ = η_B / η_A`` (≈ 16) times faster. :func:`create_loraplus_optimizer` builds the parameter groups for that.

LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
arXiv:2308.03303): A stays frozen at its random init, so backward needs no input activations for it (only the
``r``-dimensional ``A x``), and only B trains. With A fixed, the update ``s·ΔB A`` that comes closest to the full
fine-tuning gradient ``g`` (``min ‖s·g_B' A - g‖_F``, with LoRA's ``g_B = s·g Aᵀ``) is
``g_B' = g_B (A Aᵀ)⁻¹ / s²``: :class:`LoraFAOptimizer` is AdamW (transformers' ``adamw_hf``: bias correction folded into
the step size, decoupled weight decay after the step) run on that projected gradient of each B, and plain AdamW on
every other trainable tensor (DoRA magnitudes, biases, trained copies).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .methods.lora import LoraDelta, LoraEmbedding

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s groups (peft's grouping):

    * LoRA on an embedding (``lora_embedding_A`` / ``_B``): ``lr = loraplus_lr_embedding`` (default ``1e-6``);
    * ``lora_B`` and every 1-D parameter (DoRA magnitudes, biases): ``lr · loraplus_lr_ratio``, with
      ``loraplus_weight_decay`` except for biases and normalisation-layer parameters (no decay);
    * everything else (``lora_A``, trained copies' weights, token rows): ``lr``.

    Args:
        model: The model (a ``PeftModel`` or any module with deltatune adapters).
        optimizer_cls: E.g. ``torch.optim.AdamW``.
        lr: η_A.
        loraplus_lr_ratio: η_B / η_A (≥ 1; the paper suggests 2^4).
        kwargs: ``loraplus_weight_decay`` (default 0), ``loraplus_lr_embedding`` (default 1e-6); the rest go to
            ``optimizer_cls``.

    Raises:
        ValueError: ``lr`` or ``loraplus_lr_ratio`` is not a positive number.
    """
    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    embedding = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding)  # the factors; a DoRA magnitude is B's
                 for p in (m.lora_embedding_A, m.lora_embedding_B)}
    no_decay = _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"a": [], "embedding": [], "b": [], "b_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["b_no_decay" if id(param) in no_decay or "bias" in name else "b"].append(param)
        else:
            groups["a"].append(param)
    return optimizer_cls(
        [
            {"params": groups["a"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": embedding_lr},
            {"params": groups["b"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": groups["b_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        lr=lr,
        **kwargs,
    )


def _no_decay(model: nn.Module) -> set[int]:
    """Parameters inside normalisation layers (transformers' ``ALL_LAYERNORM_LAYERS``: no weight decay on them, the
    rule peft takes from transformers' Trainer), by identity."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    norms = [m for m in model.modules() if isinstance(m, tuple(ALL_LAYERNORM_LAYERS))]
    return {id(p) for m in norms for p in m.parameters()}


# Added to A Aᵀ before its pseudo-inverse (peft's value), for an A whose rows are (nearly) dependent.
_PROJECTION_RIDGE = 1e-8


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW in which each LoRA ``B`` steps on its gradient projected through its frozen ``A`` (module docstring).

    Each parameter group may carry, beside ``params``, ``frozen_A`` (per parameter: the frozen ``A`` of a LoRA
    ``B``, else ``None``) and ``scalings`` (per parameter: that layer's ``s``); :func:`create_lorafa_optimizer`
    builds them. Without them it is transformers' ``adamw_hf``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: Adam's moment coefficients.
        eps: Added to the root of the second moment.
        weight_decay: Decoupled weight decay, applied after the step (``p ← p (1 - lr·wd)``).
        correct_bias: Adam's bias correction.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @staticmethod
    def project(grad: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
        """``grad (A Aᵀ + δI)⁺ / s²`` for B's gradient ``grad`` ``(out, r, ...)`` and A ``(r, in, ...)``, computed in
        float32 (a pseudo-inverse in half precision loses the projection) and returned in ``grad``'s dtype."""
        a2 = a.detach().reshape(a.shape[0], -1).float()  # (r, in·k)
        gram = a2 @ a2.T + _PROJECTION_RIDGE * torch.eye(a2.shape[0], device=a2.device)  # (r, r)
        g2 = grad.float().transpose(0, 1).reshape(a.shape[0], -1).T  # (out·k', r): B's rank is its dim 1
        projected = (g2 @ torch.linalg.pinv(gram)) / float(scaling) ** 2
        return projected.T.reshape(grad.transpose(0, 1).shape).transpose(0, 1).to(grad.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            frozen = group.get("frozen_A") or [None] * len(group["params"])
            scalings = group.get("scalings") or [None] * len(group["params"])
            beta1, beta2 = group["betas"]
            for p, a, scaling in zip(group["params"], frozen, scalings, strict=True):
                if p.grad is None:
                    continue
                grad = p.grad if a is None else self.project(p.grad, a, scaling)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
        return loss


def _factor_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A, B, scaling)`` of every LoRA delta in ``model`` (a layer's own scale, so rank / alpha patterns count).

    Raises:
        ValueError: a delta whose factors the projection does not cover (``target_parameters``' per-expert factors,
            a grouped convolution's grouped B, a LoRA variant's own update).
    """
    pairs = []
    for module in model.modules():
        if not isinstance(module, LoraDelta):
            continue
        if module.parameter_name is not None:
            raise ValueError("LoRA-FA does not support target_parameters adapters (their factors hold one A and B "
                             "per expert)")
        variant = getattr(module, "variant", None)
        if variant is not None:
            raise ValueError(f"LoRA-FA does not support {variant.field} (its update is not the plain product B A)")
        if getattr(module, "groups", 1) > 1:
            raise ValueError("LoRA-FA does not support LoRA on a grouped convolution (B is grouped there)")
        factors = module.factors()
        pairs.append((factors.a, factors.b, factors.scaling))
    return pairs


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: bool | None = None) -> LoraFAOptimizer:
    """A :class:`LoraFAOptimizer` for ``model``'s LoRA adapters (peft's ``create_lorafa_optimizer``): every LoRA
    ``A`` is frozen (``requires_grad=False``) and every trainable parameter joins one group, each ``B`` with its
    layer's ``A`` and scale; betas ``(0.9, 0.999)``, eps ``1e-6``.

    Args:
        model: A ``PeftModel`` with LoRA adapters.
        r: The adapters' rank: must equal the active adapters' ``r`` (the scales are each layer's own, as in peft,
            which reads them from the layers too).
        lora_alpha: Likewise their ``lora_alpha``.
        lr: Learning rate.
        weight_decay: Decoupled weight decay.
        use_rslora: Deprecated in peft: if given, it must equal the active adapters' ``use_rslora`` (warned).

    Raises:
        ValueError: ``r``, ``lora_alpha`` or ``use_rslora`` that disagree with an active adapter, no LoRA layer,
            or layers LoRA-FA does not cover (see :func:`_factor_pairs`); the model is unchanged then.
    """
    configs = getattr(model, "peft_config", {})
    active = {name: configs[name] for name in getattr(model, "active_adapters", []) if name in configs}
    for name, config in active.items():
        for field, value in (("r", r), ("lora_alpha", lora_alpha)):
            if getattr(config, field, value) != value:
                raise ValueError(f"create_lorafa_optimizer got {field}={value!r}, but active adapter {name!r} has "
                                 f"{field}={getattr(config, field)!r}")
    if use_rslora is not None:
        mismatched = [n for n, c in active.items() if bool(getattr(c, "use_rslora", False)) != use_rslora]
        if mismatched:
            raise ValueError(f"use_rslora={use_rslora} disagrees with the active adapters {mismatched}; set it in "
                             f"LoraConfig (this argument is deprecated in peft)")
        warnings.warn("use_rslora in create_lorafa_optimizer is deprecated (as in peft); it comes from LoraConfig",
                      FutureWarning, stacklevel=2)
    pairs = _factor_pairs(model)
    if not pairs:
        raise ValueError("create_lorafa_optimizer found no LoRA layer in the model")
    for a, _, _ in pairs:
        a.requires_grad_(False)
    projection = {id(b): (a, scaling) for a, b, scaling in pairs}
    params = [p for p in model.parameters() if p.requires_grad]
    group = {
        "params": params,
        "frozen_A": [projection.get(id(p), (None, None))[0] for p in params],
        "scalings": [projection.get(id(p), (None, None))[1] for p in params],
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group], lr=lr)

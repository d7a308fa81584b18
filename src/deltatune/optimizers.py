"""Optimizers peft ships for LoRA, with peft's signatures (``deltatune.optimizers`` as ``peft.optimizers``).

LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354, §3): with
``B = 0`` at init, A and B play different roles and one learning rate for both is inefficient at large width; B should
learn ``λ = η_B / η_A`` (≈ 16) times faster. :func:`create_loraplus_optimizer` builds the parameter groups for that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .methods.lora import LoraEmbedding

__all__ = ["create_loraplus_optimizer"]


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

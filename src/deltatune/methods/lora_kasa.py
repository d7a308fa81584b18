"""KaSA, knowledge-aware singular-value adaptation: the base weight loses its ``r`` weakest singular directions and the
update is an SVD-shaped ``B diag(ΔΣ) A`` with a learned diagonal.

Wang et al., 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models" (arXiv 2412.06071):

* §3.1, knowledge-based SVD truncation: ``W = U Σ Vᵀ`` and the base becomes its rank-``(k - r)`` part
  (``k = min(in, out)``), dropping the ``r`` smallest singular triplets as noise. This is done once, when the adapter
  is added (also when it is loaded, as peft does), and stays: disabling, merging and unmerging, unloading keep the
  truncated weight. A KaSA adapter and a non-KaSA adapter cannot share a model (peft's rule: one would see the
  other's truncated base).
* §3.2: ``ΔW = s · B diag(ΔΣ) A``; ``ΔΣ`` (``lora_diag``, ``(r,)``, saved under that name) starts ``N(0, 1)``, and
  ``B = 0`` keeps the fresh adapter at the (truncated) base.
* Eq. 9-11, the training regularisers ``β ‖ΔΣ‖² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)``, which, as in peft, the user adds
  to the loss: ``model.base_model._get_kasa_loss()``.

Linear layers only (peft refuses Conv1D: its transposed weight is not truncated); not on a quantized base, whose
weight cannot hold the truncated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..layers import adapter_layers
from ..targeting import pattern_value
from ._lora_variant import LoraLinearLike, LoraVariant

__all__ = ["KasaConfig"]


@dataclass
class KasaConfig:
    """KaSA's regulariser weights (peft's ``KasaConfig``); they act only through ``_get_kasa_loss``.

    Attributes:
        beta: Weight of ``‖ΔΣ‖²`` (Eq. 9-10).
        gamma: Weight of ``‖BᵀB − I‖_F + ‖AAᵀ − I‖_F`` (Eq. 11).
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"kasa_config.{name} must be a finite non-negative number, got {value!r}")


class KasaVariant(LoraVariant):
    """A LoRA delta with KaSA's diagonal (see the module docstring)."""

    field = "kasa_config"
    sub_config = KasaConfig

    @classmethod
    def check_target(cls, config: Any, base_layer: nn.Module, name: str) -> None:
        if type(base_layer) is not nn.Linear:
            raise TargetError(f"{name}: kasa_config supports nn.Linear layers only, not {type(base_layer).__name__} "
                              f"(nor in peft): the base weight is truncated in place")
        r, k = pattern_value(config.rank_pattern, name, config.r), min(base_layer.weight.shape)
        if r >= k:
            raise TargetError(f"{name}: kasa_config needs r ({r}) below min(in_features, out_features) ({k}), so that "
                              f"the truncated base keeps at least one singular direction")

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> KasaVariant:
        like = delta.lora_A.weight
        delta.lora_diag = nn.Parameter(torch.empty(delta.r, device=like.device, dtype=like.dtype))  # ΔΣ (r,)
        if like.device.type != "meta":
            with torch.no_grad():
                delta.lora_diag.normal_()
                truncate(base_layer.weight, delta.r)
        return cls()

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        return (x @ delta.lora_A.weight.T * delta.lora_diag) @ delta.lora_B.weight.T  # (..., r) -> (..., out)

    def lora_weight(self, delta: LoraLinearLike) -> torch.Tensor:
        return (delta.lora_B.weight * delta.lora_diag) @ delta.lora_A.weight  # (out, r) · diag (r,) @ (r, in)


@torch.no_grad()
def truncate(weight: torch.Tensor, r: int) -> None:
    """Replace ``weight`` ``(out, in)`` in place by its best rank-``(min(out, in) - r)`` approximation (SVD in fp32)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    keep = s.numel() - r
    weight.copy_(((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype))


def check_model(config: Any, model: nn.Module) -> None:
    """peft's rule: KaSA and non-KaSA adapters do not share a model (the truncation of one changes the other's base).

    Raises:
        ConfigError: naming the adapter already there.
    """
    new = config.kasa_config is not None
    for _, layer in adapter_layers(model):
        for name, delta in layer.deltas.items():
            if isinstance(getattr(delta, "variant", None), KasaVariant) != new:
                raise ConfigError(
                    f"kasa_config: this adapter {'uses' if new else 'does not use'} KaSA but adapter {name!r} "
                    f"{'does not' if new else 'does'}; KaSA truncates the base weights, so KaSA and other adapters "
                    f"cannot share a model (nor in peft)"
                )


def kasa_loss(base_model: nn.Module, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
    """``Σ_layers β ‖ΔΣ‖² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)`` over the KaSA layers of ``adapter_names`` (default: the
    active adapters), in fp32; ``0.0`` without any. peft's ``model.base_model._get_kasa_loss()``, to add to the task
    loss (Eq. 12)."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    total: torch.Tensor | float = 0.0
    for _, layer in adapter_layers(base_model.model):
        for name in (layer.active_adapters if names is None else names):
            delta = layer.deltas[name] if name in layer.deltas else None
            if delta is None or not isinstance(getattr(delta, "variant", None), KasaVariant):
                continue
            kasa = base_model.peft_config[name].kasa_config
            a, b, diag = delta.lora_A.weight.float(), delta.lora_B.weight.float(), delta.lora_diag.float()
            eye = torch.eye(delta.r, device=a.device)
            ortho = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
            total = total + kasa.beta * (diag**2).sum() + kasa.gamma * ortho
    return total

"""QALoRA, quantization-aware LoRA: ``A`` reads the input averaged over groups of ``qalora_group_size`` features.

Xu et al., 2023, "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models" (arXiv 2309.14717), §3.3:
a base weight quantized group-wise along the input (one scale and zero point per ``g`` input features) can absorb an
update only if the update is constant within each group; pooling the input over the same groups before ``A`` gives
exactly such an update. With ``L = in / g`` pooled features, peft's forward is

    ``h = W x + s · B A (L · pool_g(x))``,  ``pool_g(x)ⱼ = mean(x[j·g : (j+1)·g])``,

so ``A`` is ``(r, L)`` (saved as ``lora_A.weight``) and the update as a weight is ``ΔW[:, i] = s · (L/g) · (B A)[:, i÷g]``
(each column of ``B A`` repeated ``g`` times). ``A`` starts as a fresh ``nn.Linear`` (Kaiming-uniform), ``B`` per
``init_lora_weights``.

peft applies it on GPTQ layers only (and there cannot merge; on other layers it ignores the flag). Here it works on
every Linear / Conv1D, in particular the quantized bases of ``quant.py`` (bitsandbytes 4-/8-bit, torchao int8), and
merges: exactly into a float base, with the measured requantization error into a quantized one like every merge.
An adapter with ``use_qalora`` therefore loads in peft only on a GPTQ model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._lora_variant import LoraLinearLike, LoraVariant
from .common import check_divides, check_size


class QaloraVariant(LoraVariant):
    """A LoRA delta whose ``A`` reads the group-pooled input (see the module docstring)."""

    field = "use_qalora"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    @classmethod
    def config_from(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ConfigError(f"use_qalora must be True or False, got {value!r}")
        return value

    @classmethod
    def check_target(cls, config: Any, base_layer: nn.Module, name: str) -> None:
        check_size("qalora_group_size", config.qalora_group_size)
        check_divides(name, f"qalora_group_size={config.qalora_group_size}", config.qalora_group_size, base_layer,
                      "use_qalora pools the input in groups", sides=("in",))

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> QaloraVariant:
        like = delta.lora_A.weight  # (r, in)
        delta.lora_A = nn.Linear(like.shape[1] // config.qalora_group_size, delta.r, bias=False, device=like.device,
                                 dtype=like.dtype)  # (r, L), nn.Linear's own initialisation, as in peft
        return cls(config.qalora_group_size)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``L · pool_g(x)``: ``(..., in)`` -> ``(..., L)``."""
        groups = x.unflatten(-1, (-1, self.group_size))  # (..., L, g)
        return groups.mean(-1) * groups.shape[-2]

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        return super().lora_forward(delta, self.pooled(x))

    def lora_weight(self, delta: LoraLinearLike) -> torch.Tensor:
        pooled = delta.lora_B.weight @ delta.lora_A.weight  # (out, L)
        return pooled.repeat_interleave(self.group_size, dim=1) * (pooled.shape[1] / self.group_size)  # (out, in)

"""LayerNorm tuning: train a copy of each normalisation layer and nothing else.

Zhao et al., 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning" (arXiv 2312.11420):
adapting only the normalisation layers' gains and biases is a strong, very cheap fine-tuning method. As in peft, each
target keeps its frozen original and gets one trainable copy per adapter; the adapted layer's output is the copy's
output. A fresh copy equals the original, so a new adapter is the identity.

Any module with parameters can be a target (``nn.LayerNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``, a
``trust_remote_code`` model's own norm, or whatever else a name selects): the copy is a ``deepcopy`` of it. The copy
is kept as ``ln_tuning_layers`` (peft's name), so its tensors are saved as
``base_model.model.<module path>.ln_tuning_layers.<param>``, exactly peft's keys.

Merging makes the base layer take the copy's ``weight`` (and ``bias``); the layer's previous values are kept aside
and unmerging puts them back bit for bit. A target whose parameters are not ``weight`` / ``bias`` still trains, saves
and loads, but refuses to merge. Each copy *replaces* the layer's output rather than adding to it, so with several LN
tuning adapters active on one layer the last one computes the output (peft refuses that combination); merging
several gives the same result and unmerging undoes them in reverse order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import AdapterStateError, TargetError
from ..layers import AdapterLayer, Delta, ModulesToSaveWrapper
from ..registry import LayerMethod

__all__ = ["LNTuningConfig"]  # exported from deltatune

_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA2_NORMS = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "norm"]

# Default target_modules per model type: peft's table, plus the BERT family (peft has no default there).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _NORMS,
    "mistral": _NORMS,
    "gemma": _NORMS,
    "gemma2": _GEMMA2_NORMS,
    "gemma3_text": _GEMMA2_NORMS,
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "bert": ["LayerNorm"],
    "roberta": ["LayerNorm"],
    "xlm-roberta": ["LayerNorm"],
    "electra": ["LayerNorm"],
}

# LayerConfig fields peft's LNTuningConfig does not have: refused when set and not written, so files load alike.
_MERGEABLE_PARAMS = {"weight", "bias"}


@dataclass
class LNTuningConfig(LayerConfig):
    """Configuration of a LayerNorm-tuning adapter (peft's fields: ``target_modules``, ``exclude_modules``,
    ``modules_to_save``; see ``LayerConfig``). ``target_modules=None`` uses the model type's norm layers
    (:data:`DEFAULT_TARGETS`). ``layers_to_transform`` / ``layers_pattern`` are not available (peft's config has
    no such fields); pick layers with a regex ``target_modules`` instead.
    """

    peft_type: PeftType = field(default=PeftType.LN_TUNING, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")


class LNTuningDelta(Delta):
    """A trainable copy of the target layer whose output replaces the layer's output."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base_layer)  # peft's attribute name: saved keys match
        self._originals: dict[str, torch.Tensor] = {}  # the base values a merge replaced, for an exact unmerge

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.ln_tuning_layers(x)

    def check_mergeable(self, base_layer: nn.Module) -> None:
        names = {n for n, _ in base_layer.named_parameters()}
        if "weight" not in names or not names <= _MERGEABLE_PARAMS:
            raise AdapterStateError(
                f"LN tuning merges layers whose parameters are 'weight' and optionally 'bias'; this "
                f"{type(base_layer).__name__} has {sorted(names)}. Keep using the PeftModel unmerged"
            )

    def _replace(self, name: str, current: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Keep ``current`` for unmerging and return the copy's value of parameter ``name``."""
        self.check_mergeable(base_layer)
        self._originals[name] = current.clone()
        return getattr(self.ln_tuning_layers, name).detach().to(current.dtype)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self._replace("weight", weight, base_layer)

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self._replace("bias", bias, base_layer)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self._originals.pop("weight")

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self._originals.pop("bias")


def check_target(config: LNTuningConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a target with nothing to train, or one that holds adapter wrappers (copying those would copy other
    adapters' deltas).

    Raises:
        TargetError: the module has no parameters or contains an adapter wrapper.
    """
    if next(base_layer.parameters(), None) is None:
        raise TargetError(
            f"{name}: {type(base_layer).__name__} has no parameters to tune (e.g. a LayerNorm without "
            f"elementwise_affine); exclude it with exclude_modules"
        )
    inner = next((n for n, m in base_layer.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))),
                 None)
    if inner is not None:
        raise TargetError(
            f"{name}: contains the adapter wrapper {'.'.join(filter(None, (name, inner)))!r}; LN tuning copies the "
            f"whole target, so target the normalisation layers themselves"
        )


def make_delta(config: LNTuningConfig, base_layer: nn.Module, name: str) -> LNTuningDelta:
    return LNTuningDelta(base_layer)


METHOD = LayerMethod(
    config_class=LNTuningConfig,
    make_delta=make_delta,
    layer_types=(nn.Module,),
    default_targets=DEFAULT_TARGETS,
    check_target=check_target,
)

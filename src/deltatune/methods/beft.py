"""BEFT: peft's bias-term finetuning, in peft's format.

Huang et al., 2025, "BEFT: Bias-Efficient Fine-Tuning of Language Models" (arXiv:2509.15974): train an added bias on
a few chosen projections (by default the value projection, which §4 finds the most effective) and nothing else:
``y = W x + b + Δb``, ``Δb`` zero at the start (the base model). It is BitFit (:mod:`deltatune.methods.bitfit`,
deltatune's general form, on more layer types) restricted to peft's layout: the same delta, here with peft's
parameter ``<module>.beft_bias`` of shape ``(1, out)`` and peft's default targets per model type.

Merging folds ``Δb`` into the layer's bias; a layer without a bias (Llama's, T5's projections) trains and runs
unmerged but refuses a merge before any weight changes (peft raises there too). ``init_weights=False`` draws
``Δb ~ N(0, 1)``, for tests. Layer type: ``nn.Linear``, as in peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError
from ..registry import LayerMethod
from .bitfit import BiasDelta
from .common import place_delta

__all__ = ["BeftConfig"]  # exported from deltatune

# peft's default target per model type: the value projection
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["v"], "mt5": ["v"], "bert": ["value"], "roberta": ["value"], "deberta-v2": ["value_proj"],
    **{model_type: ["v_proj"] for model_type in (
        "opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral", "phi", "gemma", "gemma2",
        "gemma3_text", "qwen2", "qwen3",
    )},
}


@dataclass
class BeftConfig(LayerConfig):
    """Configuration of a BEFT adapter (peft's field names). Shared targeting fields: ``target_modules`` and
    ``modules_to_save`` (see ``LayerConfig``); peft's ``BeftConfig`` has no other. ``target_modules=None`` picks the
    value projection for the model types in :data:`DEFAULT_TARGETS`.

    Attributes:
        init_weights: ``True``: ``Δb = 0`` (the base model). ``False``: ``Δb ~ N(0, 1)``, for tests.
    """

    peft_type: PeftType = field(default=PeftType.BEFT, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules", "layers_to_transform", "layers_pattern")
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (zero) or False (random), got {self.init_weights!r}")


class BeftDelta(BiasDelta):
    """``Δb`` stored as peft's ``beft_bias`` ``(1, out)``."""

    method = "BEFT"

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.beft_bias = nn.Parameter(torch.zeros(1, out_features))

    def bias_delta(self) -> torch.Tensor:
        return self.beft_bias.flatten()


def make_delta(config: BeftConfig, base_layer: nn.Module, name: str) -> BeftDelta:
    """Build the BEFT delta of ``base_layer`` (module ``name``): zero, or random if not ``init_weights``."""
    delta = BeftDelta(base_layer.out_features)
    return place_delta(delta, base_layer.weight, None if config.init_weights else _randomize)


def _randomize(delta: BeftDelta) -> None:
    delta.beft_bias.normal_()


METHOD = LayerMethod(
    config_class=BeftConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    default_targets=DEFAULT_TARGETS,
)

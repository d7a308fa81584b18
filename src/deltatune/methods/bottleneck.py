"""Bottleneck adapters: a small residual MLP after a sub-layer's output.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1: the output ``h`` of a target layer
becomes ``h + s · up(act(down(h)))``, where ``down`` projects the ``d`` features to ``m ≪ d`` (the bottleneck size)
and ``up`` back to ``d``. ``up`` starts at zero, so a fresh adapter is exactly the identity (the paper's near-identity
initialisation, §2.1). Houlsby place an adapter after the attention output projection and after the feed-forward
output of every layer (the default targets here); Pfeiffer et al., 2020 ("AdapterFusion") keep only the one
after the feed-forward block, e.g. ``target_modules=["down_proj"]`` on Llama, ``["mlp.c_proj"]`` on GPT-2,
``["wo"]`` on T5. Wrapping the projection puts the adapter before the residual addition and the norm, as both
papers do.

The format is deltatune's (peft has no bottleneck adapter): ``peft_type`` ``"BOTTLENECK"``, and per target the keys
``base_model.model.<module path>.adapter_down.weight`` ``(m, d)``, ``.adapter_down.bias`` ``(m,)``,
``.adapter_up.weight`` ``(d, m)`` and ``.adapter_up.bias`` ``(d,)`` (the names LLM-Adapters uses).

The adapter is nonlinear, so it cannot be folded into the base weights: merging raises :class:`NotMergeableError`
and changes nothing; ``unload()`` removes it. Layer types: ``nn.Linear`` and transformers ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, NotMergeableError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from .common import adapter_dtype, check_dropout, check_scale, check_size

__all__ = ["BottleneckConfig"]  # exported from deltatune

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Houlsby placement: after the attention output projection and after the feed-forward output.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["o_proj", "down_proj"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
    "gpt2": ["c_proj"],  # attn.c_proj and mlp.c_proj
    **{t: ["output.dense"] for t in ("bert", "roberta", "xlm-roberta", "electra")},  # attention.output.dense too
    "t5": ["o", "wo"],
    "mt5": ["o", "wo"],
}

_NOT_MERGEABLE = (
    "bottleneck adapters are nonlinear (h + s·up(act(down(h)))), so they cannot be folded into the base weights; "
    "keep using the PeftModel, or unload() to remove them"
)


@dataclass
class BottleneckConfig(LayerConfig):
    """Configuration of a bottleneck adapter. Shared targeting fields: see ``LayerConfig``; ``target_modules=None``
    uses the Houlsby placement for the model type (:data:`DEFAULT_TARGETS`).

    Attributes:
        bottleneck_size: Width ``m`` of the bottleneck.
        non_linearity: Activation between the projections: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        adapter_dropout: Dropout on the adapter's input during training.
        scaling: Factor ``s`` on the adapter's output.
    """

    peft_type: PeftType = field(default=PeftType.BOTTLENECK, init=False)
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("bottleneck_size", self.bottleneck_size)
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        check_dropout("adapter_dropout", self.adapter_dropout)
        check_scale("scaling", self.scaling)


class BottleneckDelta(Delta):
    """``h + s · up(act(down(dropout(h))))`` on the base output ``h`` of shape ``(..., d)``."""

    def __init__(self, features: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(features, config.bottleneck_size)
        self.adapter_up = nn.Linear(config.bottleneck_size, features)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.dropout = nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        h = self.dropout(base_out.to(self.adapter_up.weight.dtype))  # (..., d)
        update = self.adapter_up(self.act(self.adapter_down(h)))  # (..., m) -> (..., d)
        return accumulate(base_out, update, self.scaling)

    def check_mergeable(self, base_layer: nn.Module) -> None:
        raise NotMergeableError(_NOT_MERGEABLE)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotMergeableError(_NOT_MERGEABLE)


def make_delta(config: BottleneckConfig, base_layer: nn.Module, name: str) -> BottleneckDelta:
    weight = base_layer.weight
    features = weight.shape[1] if isinstance(base_layer, Conv1D) else base_layer.out_features  # Conv1D: (in, out)
    dtype = adapter_dtype(weight.dtype)
    return BottleneckDelta(features, config).to(device=weight.device, dtype=dtype)


METHOD = LayerMethod(
    config_class=BottleneckConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    default_targets=DEFAULT_TARGETS,
    mergeable=False,
)

"""BitFit: train only bias terms.

Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", §3: freeze every weight and train only the additive bias vectors. Each target layer gets a
trainable change ``Δb`` to its bias, zero at the start (a fresh adapter is the base model): the adapted output is
``y = f(x) + Δb``, broadcast over every position (and over the spatial positions of a convolution).

peft has no BitFit (its LoRA ``bias="all"`` trains the biases themselves), so the format is deltatune's:
``peft_type`` ``"BITFIT"`` and one saved tensor per target, ``base_model.model.<module path>.bitfit_bias``, shaped
like the layer's bias.

Layers without a bias (Llama's and T5's projections): the adapter trains and runs there as an added bias, but such
a layer has nowhere to fold it into, so merging an adapter that covers one raises :class:`AdapterStateError` before
any weight changes (keep the ``PeftModel``, or target only layers that have a bias). That keeps the adapter usable on
every model; a merged model never gains tensors its architecture does not have.

Layer types: ``nn.Linear``, transformers ``Conv1D``, ``nn.Conv1d/2d/3d`` and ``nn.LayerNorm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import AdapterStateError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from .common import adapter_dtype

__all__ = ["BitFitConfig"]  # exported from deltatune

_BERT_BIASED = ["query", "key", "value", "dense", "LayerNorm"]

# Default target_modules: every layer with a bias, for the model types that have biases. Others (Llama, T5: no
# biases at all) need explicit target_modules.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": _BERT_BIASED,
    "roberta": _BERT_BIASED,
    "xlm-roberta": _BERT_BIASED,
    "electra": _BERT_BIASED,
    "gpt2": ["c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"],
}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class BitFitConfig(LayerConfig):
    """Configuration of a BitFit adapter: only the targeting fields of ``LayerConfig``. ``target_modules=None``
    selects every layer with a bias for the model types in :data:`DEFAULT_TARGETS` (BERT family, GPT-2)."""

    peft_type: PeftType = field(default=PeftType.BITFIT, init=False)


def _bias_shape(base_layer: nn.Module) -> tuple[int, ...]:
    """The shape of ``base_layer``'s bias, or of the bias it would have."""
    bias = getattr(base_layer, "bias", None)
    if isinstance(bias, torch.Tensor):
        return tuple(bias.shape)
    if isinstance(base_layer, nn.Linear):
        return (base_layer.out_features,)
    if isinstance(base_layer, _CONV):
        return (base_layer.out_channels,)
    if isinstance(base_layer, nn.LayerNorm):
        return tuple(base_layer.normalized_shape)
    return (base_layer.weight.shape[1],)  # Conv1D: weight (in, out)


class BiasDelta(Delta):
    """An added bias ``y = f(x) + Δb`` (``Δb`` from :meth:`bias_delta`, broadcast over the trailing dims: channel dim 1
    and spatial dims on a conv), folded into the layer's bias when merged. Shared by BitFit and peft's BEFT, which
    differ only in their parameter's name and shape."""

    method: str = ""  # for messages
    spatial_dims: int = 0

    def bias_delta(self) -> torch.Tensor:
        """``Δb``, shaped like the layer's bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        bias = self.bias_delta()
        return accumulate(base_out, bias.view(*bias.shape, *[1] * self.spatial_dims), 1.0)  # (C, 1, ...) on a conv

    def check_mergeable(self, base_layer: nn.Module) -> None:
        if not isinstance(getattr(base_layer, "bias", None), torch.Tensor):
            raise AdapterStateError(
                f"this {type(base_layer).__name__} has no bias to fold {self.method}'s bias delta into; keep using the "
                f"PeftModel unmerged, or target only layers that have a bias"
            )

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        self.check_mergeable(base_layer)  # the core folds the bias only when there is one: never skip silently
        return weight

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return bias + self.bias_delta().to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return bias - self.bias_delta().to(bias.dtype)


class BitFitDelta(BiasDelta):
    """BitFit's ``Δb``: ``bitfit_bias``, shaped like the layer's bias."""

    method = "BitFit"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        ref = next(base_layer.parameters(), torch.empty(0))  # a LayerNorm without affine parameters has none
        dtype = adapter_dtype(ref.dtype)
        self.bitfit_bias = nn.Parameter(torch.zeros(_bias_shape(base_layer), dtype=dtype, device=ref.device))
        self.spatial_dims = len(base_layer.kernel_size) if isinstance(base_layer, _CONV) else 0

    def bias_delta(self) -> torch.Tensor:
        return self.bitfit_bias


def make_delta(config: BitFitConfig, base_layer: nn.Module, name: str) -> BitFitDelta:
    return BitFitDelta(base_layer)


METHOD = LayerMethod(
    config_class=BitFitConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D, *_CONV, nn.LayerNorm),
    default_targets=DEFAULT_TARGETS,
)

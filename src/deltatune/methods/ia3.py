"""IA3: learned vectors that rescale activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", §3.3:
(IA)³ multiplies the keys and values of attention and the inner activation of the feed-forward network elementwise
by learned vectors ``l_k``, ``l_v``, ``l_ff`` (initialised to ones, so training starts from the base model). As in
peft, the vector sits on a target layer: on a *feed-forward* layer (``feedforward_modules``, e.g. a down projection)
it scales the layer's INPUT, ``y = W (l ⊙ x) + b``; on any other target its OUTPUT, ``y = l ⊙ (W x + b)``.

Both forms fold into the weight: an input scale multiplies the weight's input columns, an output scale its output
rows and the bias. Unmerging divides by the vector again (exact up to rounding); the weights a zero entry wiped out
are kept aside when merging and put back.

Layer types, as in peft: ``nn.Linear``, transformers ``Conv1D`` (weight stored ``(in, out)``), ``nn.Conv2d`` and
``nn.Conv3d`` (grouped ones included). The parameter is ``ia3_l`` with peft's shapes: ``(out, 1)`` / ``(1, in)`` on a
linear layer, ``(1, C, 1, …)`` on a convolution, so saved keys (``<module>.ia3_l``) and files interchange.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType, validate_regex
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from ..rows import row_slots
from ..targeting import endswith_matches
from .common import adapter_dtype, channel_view

__all__ = ["IA3Config"]  # exported from deltatune

# model_type -> (default target_modules, default feedforward_modules), peft's tables.
_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}

@dataclass
class IA3Config(LayerConfig):
    """Configuration of an IA3 adapter (peft's field names). Shared targeting fields: see ``LayerConfig``
    (``layers_to_transform`` / ``layers_pattern`` excepted: peft's IA3 has no such fields; use a regex
    ``target_modules`` to pick layers).

    Attributes:
        feedforward_modules: The targets whose vector scales the layer's input rather than its output: a list of
            name endings (peft's rule: a plain ``str.endswith``, so ``"output.dense"`` also matches
            ``attention.output.dense``) that must be a subset of a list ``target_modules``, or a regex matched
            against the full module name. ``None`` uses the default for the model type.
        fan_in_fan_out: Weight stored ``(in, out)`` (GPT-2's ``Conv1D``). Set automatically when a target is a
            ``Conv1D``, as peft does; deltatune itself reads the layout from the layer type.
        init_ia3_weights: ``True``: vectors start at ones (the base model). ``False``: random normal vectors (a
            non-zero change from the start; for tests).
    """

    peft_type: PeftType = field(default=PeftType.IA3, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if isinstance(self.feedforward_modules, str):
            validate_regex("feedforward_modules", self.feedforward_modules)
        check_feedforward_subset(self)


def check_feedforward_subset(config: IA3Config) -> None:
    """Raise :class:`ConfigError` unless a list ``feedforward_modules`` names only entries of a list
    ``target_modules`` (peft's rule; regex forms are not compared)."""
    feedforward, targets = config.feedforward_modules, config.target_modules
    if not (isinstance(feedforward, list) and isinstance(targets, list)):
        return
    extra = sorted(set(feedforward) - set(targets))
    if extra:
        raise ConfigError(
            f"feedforward_modules {extra} are not in target_modules {targets}: a feed-forward module must also be a "
            f"target. Add them to target_modules or remove them from feedforward_modules (an adapter_config.json "
            f"that peft wrote this way loads in neither library; delete the extra names there)."
        )


def resolve_config(config: IA3Config, model: nn.Module, targets: Mapping[str, nn.Module]) -> IA3Config:
    """``config`` with ``feedforward_modules`` filled from the model type's default (``target_modules`` is resolved
    by then), checked against the targets. The default keeps only the entries a list ``target_modules`` names (peft
    keeps them all and then writes a file it refuses to read back).

    Raises:
        TargetError: ``feedforward_modules`` is ``None`` and the model type has no default.
        ConfigError: ``feedforward_modules`` names modules that are not targets.
    """
    if config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _DEFAULTS:
            raise TargetError(
                f"no default feedforward_modules for model type {model_type!r}; pass feedforward_modules explicitly: "
                f"the targets whose input (not output) IA3 scales, [] for none"
            )
        defaults = _DEFAULTS[model_type][1]
        names = config.target_modules
        config = dataclasses.replace(
            config, feedforward_modules=[f for f in defaults if not isinstance(names, list) or f in names]
        )
    check_feedforward_subset(config)
    return config


class IA3Delta(Delta):
    """One IA3 vector on one layer: scales the input (feed-forward layer) or the output (any other target)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.transforms_input = feedforward
        weight = base_layer.weight
        conv = isinstance(base_layer, nn.modules.conv._ConvNd)
        self.channel_dim = 1 if conv else -1  # where channels sit in the layer's input and output
        if conv:
            channels = base_layer.in_channels if feedforward else base_layer.out_channels
            shape = (1, channels, *([1] * (weight.ndim - 2)))  # (1, C, 1, ...)
        else:
            out_features, in_features = weight.shape[::-1] if isinstance(base_layer, Conv1D) else weight.shape
            shape = (1, in_features) if feedforward else (out_features, 1)
        dtype = adapter_dtype(weight.dtype)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))

    def _scale(self) -> torch.Tensor:
        """The vector shaped to broadcast over the layer's activations: ``(C,)`` against a linear layer's
        ``(..., C)``; as stored, ``(1, C, 1, ...)``, against a convolution's ``(B, C, ...)``."""
        return self.ia3_l if self.channel_dim == 1 else self.ia3_l.view(-1)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self._scale()).to(x.dtype)  # (..., in) or (B, in, ...)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.transforms_input:  # the base layer already saw the scaled input
            return base_out
        return (base_out * self._scale()).to(base_out.dtype)  # (..., out) or (B, out, ...)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """Output-scaling groups of a mixed batch in one multiply: each row of ``out`` times its adapter's vector,
        rows in no group times ones. (Feed-forward deltas never come here: the layer runs input-side deltas
        itself.)"""
        if not groups:
            return out
        first = groups[0][0]
        vectors = [delta.ia3_l.flatten() for delta, _ in groups]
        table = torch.stack([*vectors, torch.ones_like(vectors[0])])  # (G + 1, out)
        rows = table[row_slots(groups, out.shape[0], out.device)]  # (B, out)
        shape = [out.shape[0]] + [1] * (out.ndim - 1)
        shape[first.channel_dim] = -1
        return (out * rows.view(shape)).to(out.dtype)  # (B, ..., out) or (B, out, ...)

    def _weight_scale(self, base_layer: nn.Module) -> torch.Tensor:
        """The vector shaped to broadcast over the stored base weight: along its input columns (feed-forward) or
        its output rows."""
        v, weight = self.ia3_l.flatten(), base_layer.weight
        if not isinstance(base_layer, nn.modules.conv._ConvNd):
            out_dim = 1 if isinstance(base_layer, Conv1D) else 0  # Conv1D stores (in, out), Linear (out, in)
            return channel_view(v, 2, 1 - out_dim if self.transforms_input else out_dim)
        if not self.transforms_input:
            return channel_view(v, weight.ndim, 0)  # (out, 1, ...)
        # weight (out, in/g, *k): entry (o, j) reads input channel (o // (out/g)) · (in/g) + j
        groups, out_channels = base_layer.groups, weight.shape[0]
        per_row = v.view(groups, 1, -1).expand(groups, out_channels // groups, -1).reshape(out_channels, -1)
        return per_row.view(*per_row.shape, *([1] * (weight.ndim - 2)))  # (out, in/g, 1, ...)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        scale = self._weight_scale(base_layer)
        self._zeroed_weight = _zeroed(weight, scale)
        return (weight * scale).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return _restore((weight / self._weight_scale(base_layer)).to(weight.dtype), self._zeroed_weight)

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.transforms_input:
            return bias
        self._zeroed_bias = _zeroed(bias, self.ia3_l.flatten())
        return (bias * self.ia3_l.flatten()).to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.transforms_input:
            return bias
        return _restore((bias / self.ia3_l.flatten()).to(bias.dtype), self._zeroed_bias)


def _zeroed(tensor: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where a zero entry of the vector will wipe ``tensor`` on merging: the mask and the original values there, so
    that unmerging (a division) can put them back; ``None`` when the vector has no zero (the usual case)."""
    mask = (scale == 0).expand_as(tensor)
    return (mask, tensor[mask].clone()) if bool(mask.any()) else None


def _restore(tensor: torch.Tensor, zeroed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if zeroed is not None:
        mask, values = zeroed
        tensor[mask] = values
    return tensor


def make_delta(config: IA3Config, base_layer: nn.Module, name: str) -> IA3Delta:
    """Build the IA3 vector for ``base_layer`` (module ``name``): ones, or random normal with ``init_ia3_weights``
    off."""
    delta = IA3Delta(base_layer, endswith_matches(name, config.feedforward_modules))
    if not config.init_ia3_weights and delta.ia3_l.device.type != "meta":
        with torch.no_grad():
            delta.ia3_l.normal_()
    return delta


METHOD = LayerMethod(
    config_class=IA3Config,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d),
    default_targets={model_type: targets for model_type, (targets, _) in _DEFAULTS.items()},
    resolve_config=resolve_config,
)

"""Adaption prompts (LLaMA-Adapter): zero-init gated attention over learned prompt tokens in the top layers.

Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention"
(arXiv:2303.16199), §3.1-3.2: in each of the top ``adapter_layers`` attention layers a learnable prompt
``P ∈ R^{adapter_len × hidden}`` is projected with the layer's own key/value projections, and every query attends to
it with a softmax of its own, scaled by a gate ``g`` that starts at zero ("zero-init attention"), so a fresh adapter
is exactly the base model and the prompt's influence grows as training opens the gate::

    Kₚ = k_proj(P), Vₚ = v_proj(P)                            # (kv_heads, adapter_len, head_dim), no rotary
    out = attn(x) + o_proj(g · softmax(q Kₚᵀ / √head_dim) Vₚ)  # q: the rotated queries, (heads, S, head_dim)

Key/value heads are shared by groups of query heads as the model's own attention shares them (grouped-query
attention). The prompt has no position and is not part of the KV cache: the term depends only on the current
query, so cached generation equals full forwards and nothing about the cache changes.

**Why a layer method, not a prompt strategy.** Nothing is prepended to the input and no cache is written: the change
lives inside chosen attention modules, one parameter pair per module, with peft's keys
``<attention path>.adaption_prompt`` ``(1, adapter_len, hidden)`` and ``<attention path>.adaption_gate`` ``(1,)``.
That is exactly what an :class:`~deltatune.layers.AdapterLayer` around the attention module gives (keys, several
named adapters, switching, disabling, trainability, status), so the method is a :class:`Delta` that runs the wrapped
attention itself (:attr:`Delta.run_layer`, since transformers calls attention by keyword and returns a tuple) plus a
target rule of its own (:attr:`LayerMethod.find_targets`: the last ``adapter_layers`` modules named
``target_modules``, as peft selects them).

Models, as peft: Llama and Mistral (``self_attn``: ``q_proj``/``k_proj``/``v_proj``/``o_proj``, rotary queries) and
GPT-2 (``attn``: fused ``c_attn``; as in peft the prompt's output is added *without* the ``c_proj`` projection).
Differences from peft: an ``o_proj`` with a bias adds it once (peft adds it again with the prompt's output, so a
fresh adapter would not be the base model); several active adapters on one layer add their terms (peft activates
one). Merging is refused (the prompt attention is not a weight change); mixed-adapter batches are refused.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import AdapterStateError, ConfigError, NotMergeableError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from ..targeting import iter_candidates
from .common import adapter_dtype, check_size

__all__ = ["AdaptionPromptConfig"]  # exported from deltatune

# model_type -> the attention module's name (peft's table); the module's layout is read from the module itself.
_ATTENTION_NAMES = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


@dataclass
class AdaptionPromptConfig(LayerConfig):
    """Configuration of an adaption-prompt adapter (peft's field names).

    Attributes:
        target_modules: Name of the attention modules (the last path segment, e.g. ``"self_attn"``); ``None`` uses
            the model type's (``self_attn`` for Llama/Mistral, ``attn`` for GPT-2).
        adapter_len: Number of prompt tokens per adapted layer.
        adapter_layers: How many attention layers, counted from the top, get a prompt.
    """

    peft_type: PeftType = field(default=PeftType.ADAPTION_PROMPT, init=False)
    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    # peft's AdaptionPromptConfig is a bare PeftConfig: it selects the top layers itself and trains no head.
    _not_in_peft: ClassVar[tuple[str, ...]] = (
        "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
    )

    def __post_init__(self) -> None:
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError(
                f"target_modules of an AdaptionPromptConfig is one module name such as 'self_attn', got "
                f"{self.target_modules!r}"
            )
        super().__post_init__()
        check_size("adapter_len", self.adapter_len)
        check_size("adapter_layers", self.adapter_layers)


def find_targets(model: nn.Module, config: AdaptionPromptConfig) -> tuple[str, list[str]]:
    """The last ``adapter_layers`` modules whose name ends with ``"." + target_modules``, in model order.

    Raises:
        TargetError: an unsupported model type, no such module, or fewer modules than ``adapter_layers``.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ATTENTION_NAMES:
        raise TargetError(
            f"adaption prompts support the model types {sorted(_ATTENTION_NAMES)} (as peft), not {model_type!r}"
        )
    target = config.target_modules or _ATTENTION_NAMES[model_type]
    names = [name for name, _ in iter_candidates(model) if name.endswith("." + target)]
    if len(names) < config.adapter_layers:
        raise TargetError(
            f"adapter_layers={config.adapter_layers} but {type(model).__name__} has {len(names)} modules named "
            f"{target!r}"
        )
    return target, names[len(names) - config.adapter_layers:]


def _rotary(attention: nn.Module) -> Any:
    """The model's own ``apply_rotary_pos_emb`` (from the attention class's module), used on the queries only."""
    rotate = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotate is None:
        raise TargetError(f"{type(attention).__name__}'s module has no apply_rotary_pos_emb")
    return rotate


class AdaptionPrompt(Delta):
    """One layer's prompt ``(1, adapter_len, hidden)`` (standard normal, as peft and the official code) and its gate
    ``(1,)`` (zero)."""

    fused: ClassVar[bool] = False  # GPT-2's c_attn computes q, k and v in one projection

    def __init__(self, adapter_len: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden, dtype=dtype, device=device))
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    @classmethod
    def run_layer(cls, deltas: Sequence[AdaptionPrompt], base_layer: nn.Module, *args, **kwargs):
        """The attention's own output with every delta's gated prompt attention added to its first element."""
        output = base_layer(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, S, hidden)
        attn_output = output[0]
        for delta in deltas:
            attn_output = attn_output + delta.prompt_attention(base_layer, hidden, kwargs).to(attn_output.dtype)
        return (attn_output, *output[1:])

    def prompt_attention(self, attention: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """``g · softmax(q Kₚᵀ/√d) Vₚ`` in the layer's output space, ``(B, S, hidden)``."""
        q, k, v = self.project(attention, hidden, kwargs)  # (B, H, S, D), (1, H, L, D), (1, H, L, D)
        scores = q @ k.transpose(-1, -2).to(q.dtype) / math.sqrt(q.shape[-1])  # (B, H, S, L)
        weights = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (weights @ v.to(weights.dtype)).transpose(1, 2).flatten(2)  # (B, S, H·D)
        return self.output(attention, out)

    def project(self, attention: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]):
        raise NotImplementedError

    def output(self, attention: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return out

    @classmethod
    def batched_forward(cls, groups, x, out, base_layer):
        raise AdapterStateError(
            "adapter_names (mixed-adapter batches) is not supported for adaption prompts (nor in peft); run one "
            "adapter per batch"
        )

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotMergeableError("adaption prompts cannot be merged: they add an attention over learned tokens")

    def check_mergeable(self, base_layer: nn.Module) -> None:
        raise NotMergeableError(
            "adaption prompts cannot be merged into the weights: they add a gated attention over learned prompt "
            "tokens, not a weight change; keep using the PeftModel"
        )


class LlamaAdaptionPrompt(AdaptionPrompt):
    """Llama / Mistral attention: separate projections, rotary queries, grouped key/value heads, ``o_proj``."""

    def project(self, attention, hidden, kwargs):
        config = attention.config
        heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
        batch, length = hidden.shape[:2]
        q = attention.q_proj(hidden).view(batch, length, heads, d).transpose(1, 2)  # (B, H, S, D)
        cos, sin = kwargs["position_embeddings"]
        q, _ = _rotary(attention)(q, q, cos, sin)
        prompt = self.adaption_prompt.to(hidden.dtype)  # (1, L, hidden)
        length_p = prompt.shape[1]
        k = attention.k_proj(prompt).view(1, length_p, kv_heads, d).transpose(1, 2)  # (1, Hkv, L, D)
        v = attention.v_proj(prompt).view(1, length_p, kv_heads, d).transpose(1, 2)
        groups = heads // kv_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def output(self, attention, out):
        projected = attention.o_proj(out)
        bias = getattr(attention.o_proj, "bias", None)
        return projected - bias if bias is not None else projected  # the base output already holds the bias


class Gpt2AdaptionPrompt(AdaptionPrompt):
    """GPT-2 attention: one fused ``c_attn`` for q, k and v; no rotary; peft adds the output without ``c_proj``."""

    def project(self, attention, hidden, kwargs):
        heads, d, width = attention.num_heads, attention.head_dim, attention.split_size
        batch, length = hidden.shape[:2]
        q = attention.c_attn(hidden).split(width, dim=2)[0].view(batch, length, heads, d).transpose(1, 2)
        prompt = self.adaption_prompt.to(hidden.dtype)
        _, k, v = attention.c_attn(prompt).split(width, dim=2)  # (1, L, hidden) each
        length_p = prompt.shape[1]
        return q, k.view(1, length_p, heads, d).transpose(1, 2), v.view(1, length_p, heads, d).transpose(1, 2)


def make_delta(config: AdaptionPromptConfig, base_layer: nn.Module, name: str) -> AdaptionPrompt:
    if hasattr(base_layer, "q_proj") and hasattr(base_layer, "o_proj"):
        cls, weight = LlamaAdaptionPrompt, base_layer.q_proj.weight
        hidden = base_layer.q_proj.in_features
    elif hasattr(base_layer, "c_attn"):
        cls, weight = Gpt2AdaptionPrompt, base_layer.c_attn.weight
        hidden = base_layer.embed_dim
    else:
        raise TargetError(f"{name} ({type(base_layer).__name__}) is not a Llama-, Mistral- or GPT-2-style attention")
    return cls(config.adapter_len, hidden, adapter_dtype(weight.dtype), weight.device)


def check_target(config: AdaptionPromptConfig, base_layer: nn.Module, name: str) -> None:
    """Raises:
    TargetError: the module is not an attention of a supported layout."""
    if not (hasattr(base_layer, "q_proj") and hasattr(base_layer, "o_proj")) and not hasattr(base_layer, "c_attn"):
        raise TargetError(
            f"{name} ({type(base_layer).__name__}) is not a Llama-, Mistral- or GPT-2-style attention module; set "
            f"target_modules to the attention modules' name"
        )


METHOD = LayerMethod(
    config_class=AdaptionPromptConfig, make_delta=make_delta, layer_types=(nn.Module,), check_target=check_target,
    find_targets=find_targets, mixed_batches=False,
    mergeable=False,
)

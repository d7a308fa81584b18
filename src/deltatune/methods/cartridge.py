"""Cartridges: a trainable KV cache prefix, initialised from a real context.

Eyuboglu et al., 2025, "Cartridges: Lightweight and general-purpose long context representations via
self-study" (arXiv:2506.06266), §4: a corpus is compressed into a short KV cache ``Z`` of ``T`` positions per layer
that is trained directly (no reparameterisation); initialising ``Z`` from the KV cache of the corpus' first ``T``
tokens works far better than random (§4.2), and freezing the first token keeps it an attention sink. Cartridges
compose by concatenation (§6).

The table is prefix tuning's (``(T, num_layers · 2 · token_dim)``, laid out ``[layer][key|value][head][head_dim]``)
and reaches the model through the same :data:`~deltatune.prefix.PREFIX` strategy, so caching, masks and positions
are prefix tuning's: the real input continues at position ``T``, exactly where the context it was initialised from
stopped. The first ``num_frozen_tokens`` rows are a separate parameter that never trains. Saved as peft does:
``prompt_embeddings``, the whole table.

peft 0.21's helpers, with the same names and arguments: :func:`initialize_kv_prefix_from_text` (prefill the base
model on a text and take its first ``T`` cached positions), :func:`initialize_kv_prefix_from_past_key_values`,
:func:`prompt_embeddings_from_past_key_values` and :func:`compose_cartridge_adapters`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError
from ..files import adapter_files, read_weights, write_adapters
from ..prefix import PREFIX
from ..registry import PromptMethod
from .common import check_size

__all__ = [
    "CartridgeConfig", "CartridgeEncoder", "compose_cartridge_adapters", "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text", "prompt_embeddings_from_past_key_values",
]  # exported from deltatune


@dataclass
class CartridgeConfig(PromptLearningConfig):
    """Configuration of a cartridge (peft's field names); the dimensions are prefix tuning's.

    Attributes:
        num_frozen_tokens: Leading virtual tokens that never train (the attention sink); at most
            ``num_virtual_tokens``.
    """

    peft_type: PeftType = field(default=PeftType.CARTRIDGE, init=False)
    num_frozen_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("num_frozen_tokens", self.num_frozen_tokens, allow_zero=True)
        if self.num_frozen_tokens > self.num_virtual_tokens:
            raise ConfigError(f"num_frozen_tokens={self.num_frozen_tokens} exceeds num_virtual_tokens="
                              f"{self.num_virtual_tokens}")


class CartridgeEncoder(nn.Module):
    """The cache rows as parameters: ``frozen_embedding`` ``(num_frozen_tokens, W)`` (never trains) and
    ``trainable_embedding`` ``(T - num_frozen_tokens, W)``, ``W = num_layers · 2 · token_dim``, both ``N(0, 1)`` until
    initialised from a context."""

    def __init__(self, config: CartridgeConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        width = PREFIX.table_shape(config)[1]
        frozen = config.num_frozen_tokens
        self.frozen_embedding = nn.Parameter(torch.randn(frozen, width), requires_grad=False)
        self.trainable_embedding = nn.Parameter(torch.randn(config.num_virtual_tokens - frozen, width))

    def requires_grad_(self, requires_grad: bool = True) -> CartridgeEncoder:
        """The frozen tokens stay frozen whatever the caller asks."""
        super().requires_grad_(requires_grad)
        self.frozen_embedding.requires_grad_(False)
        return self

    def table(self) -> torch.Tensor:
        """The whole prefix table ``(T, W)``."""
        return torch.cat([self.frozen_embedding, self.trainable_embedding], dim=0)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table()[indices]  # (…, W)

    @torch.no_grad()
    def load_table(self, table: torch.Tensor) -> None:
        """Split a ``(T, W)`` table into the frozen and trainable rows."""
        frozen = self.frozen_embedding.shape[0]
        self.frozen_embedding.copy_(table[:frozen].to(self.frozen_embedding))
        self.trainable_embedding.copy_(table[frozen:].to(self.trainable_embedding))


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> torch.Tensor:
    """The first ``num_virtual_tokens`` positions of a single-sequence KV cache as a flat prefix table
    ``(T, num_layers · 2 · kv_heads · head_dim)``; the cache is a transformers ``Cache`` or a sequence of per-layer
    ``(key, value)`` of shape ``(1, kv_heads, S, head_dim)``.

    Raises:
        ConfigError: an empty cache, a batch other than 1, too few cached positions, or layers of unequal shape.
    """
    layers = getattr(past_key_values, "layers", None)
    pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else \
        [(k, v) for k, v, *_ in past_key_values]
    if not pairs:
        raise ConfigError("past_key_values holds no layers")
    shape = pairs[0][0].shape
    if len(shape) != 4 or shape[0] != 1:
        raise ConfigError(f"expected a single-sequence cache, keys of shape (1, heads, length, head_dim); got "
                          f"{list(shape)}")
    if shape[2] < num_virtual_tokens:
        raise ConfigError(f"the cache holds {shape[2]} positions, fewer than num_virtual_tokens={num_virtual_tokens}")
    rows = []
    for key, value in pairs:
        if key.shape[:2] != shape[:2] or key.shape[3] != shape[3] or value.shape != key.shape:
            raise ConfigError("the cache's layers differ in their key/value shapes")
        for tensor in (key, value):  # (1, H, S, D) -> (T, H·D)
            rows.append(tensor[0, :, :num_virtual_tokens].transpose(0, 1).reshape(num_virtual_tokens, -1))
    return torch.cat(rows, dim=1)  # (T, L·2·H·D): [layer][key|value][head][head_dim]


def _kv_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, Any]:
    name = adapter_name or model.active_adapter
    config = model.peft_config[name]
    if config.peft_type not in (PeftType.CARTRIDGE, PeftType.PREFIX_TUNING) or getattr(config, "prefix_projection",
                                                                                       False):
        raise ConfigError(f"adapter {name!r} must be a cartridge or a prefix-tuning adapter without prefix_projection "
                          f"(got {config.peft_type.value})")
    return name, config


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(
    model: nn.Module, *, adapter_name: str | None = None, past_key_values: Any, num_virtual_tokens: int | None = None,
) -> torch.Tensor:
    """Load the first positions of ``past_key_values`` into a cartridge (or plain prefix-tuning) adapter of the
    ``PeftModel`` ``model``; returns the table loaded.

    Raises:
        ConfigError: another kind of adapter, or a cache that does not fit (see
            :func:`prompt_embeddings_from_past_key_values`); the adapter is unchanged.
        AdapterLoadError: the table's shape differs from the adapter's.
    """
    from ..prompt import load_prompt_embeddings

    name, config = _kv_adapter(model, adapter_name)
    table = prompt_embeddings_from_past_key_values(
        past_key_values, num_virtual_tokens=num_virtual_tokens or config.num_virtual_tokens)
    model.prompt_encoder[name] = load_prompt_embeddings(model.prompt_encoder[name], table, "past_key_values")
    return table


@torch.no_grad()
def initialize_kv_prefix_from_text(
    model: nn.Module, tokenizer: Any, *, text: str, adapter_name: str | None = None,
    num_virtual_tokens: int | None = None, use_chat_template: bool = True, max_length: int | None = None,
) -> torch.Tensor:
    """Prefill the base model (adapters disabled) on ``text`` (as a system message of the chat template where the
    tokenizer has one and ``use_chat_template``, as peft) and load its first cached positions into the adapter.

    Raises:
        ConfigError: see :func:`initialize_kv_prefix_from_past_key_values`, or a text too short for the cartridge.
    """
    _kv_adapter(model, adapter_name)
    ids = None
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                            add_generation_prompt=False, return_dict=False, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        ids = ids[:, :max_length] if max_length is not None else ids
    if ids is None:
        ids = tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)
    with model.disable_adapter():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return initialize_kv_prefix_from_past_key_values(model, adapter_name=adapter_name, past_key_values=cache,
                                                     num_virtual_tokens=num_virtual_tokens)


def compose_cartridge_adapters(
    adapter_paths: Sequence[str | os.PathLike], *, output_path: str | os.PathLike, safe_serialization: bool = True,
) -> None:
    """Concatenate cartridges (§6): one adapter whose table is the inputs' tables in order, with the first one's
    ``num_frozen_tokens``; written atomically to ``output_path``.

    Raises:
        ConfigError: fewer than two adapters, one that is not a cartridge, or dimensions that differ.
    """
    from ..config import read_config

    if len(adapter_paths) < 2:
        raise ConfigError("compose_cartridge_adapters needs at least 2 adapters")
    configs = [read_config(path) for path in adapter_paths]
    for path, config in zip(adapter_paths, configs):
        if config.peft_type != PeftType.CARTRIDGE:
            raise ConfigError(f"{path} is not a cartridge (peft_type {config.peft_type.value})")
    first = configs[0]
    for name in ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        if any(getattr(c, name) != getattr(first, name) for c in configs[1:]):
            raise ConfigError(f"the cartridges differ in {name}; they cannot be concatenated")
    tables = [read_weights(path)[0]["prompt_embeddings"] for path in adapter_paths]
    table = torch.cat(tables, dim=0)
    config = replace(first, num_virtual_tokens=table.shape[0])
    files = adapter_files(config.to_json_string(), {"prompt_embeddings": table}, safe_serialization, {})
    write_adapters(output_path, {"": files})


METHOD = PromptMethod(config_class=CartridgeConfig, make_encoder=CartridgeEncoder, strategy=PREFIX)

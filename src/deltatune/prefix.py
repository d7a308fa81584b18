"""The key/value-prefix strategy of the prompt methods (prefix tuning, cartridges): the prefix as a KV cache.

:data:`PREFIX` hands the method's table, one key and one value of ``T`` positions for every layer, to the unchanged
model as a transformers ``Cache`` that already contains ``T`` tokens (``DynamicCache``; an ``EncoderDecoderCache``
whose self-attention part holds the prefix for encoder-decoder models). The model's own attention concatenates it with
the real keys/values, so GQA, rotary positions and relative position biases are the model's business; only the
attention mask (and explicit position ids) are extended, by :func:`deltatune.prompt.prepend_positions`.

In ``generate()`` the prefix is written into ``generate()``'s own (empty) cache by a forward pre-hook at the first
step, sized to the batch that step really has (beams, ``num_return_sequences``). Never dropped silently: after every
forward that received a prefix, the cache must have grown past it, else :class:`AdapterStateError`. The rest of the
prompt plumbing (inputs lined up with the prompt, the embedding strategy, files) is :mod:`deltatune.prompt`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .config import PromptLearningConfig
from .errors import AdapterStateError, ConfigError
from .prompt import (
    PromptStrategy,
    _batch_and_length,
    _bind,
    _cache_length,
    _check_length,
    _first,
    _is_encoder_decoder,
    _model_config,
    _pop_cache,
    _run,
    cache_argument,
    prepend_positions,
    prompt_table,
)


# peft's table of per-model-type functions that reshape the legacy tuple of prefix keys/values for models whose
# attention wanted another layout. Empty, as in peft under transformers 5 (bloom's own layout is gone); deltatune always
# hands the prefix as a transformers ``Cache`` and refuses a model type someone adds here (see ``Prefix.check_model``).
TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict[str, Callable[..., Any]] = {}


def bloom_model_postprocess_past_key_value(
    past_key_values: tuple[torch.Tensor, ...],
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """peft's reshaping of prefix keys/values for transformers' old bloom layout (before the standard cache).

    ``past_key_values``: per-layer-pair tensors ``[2, batch, heads, T, head_dim]`` (keys then values), concatenated to
    ``[2·layers, batch, heads, T, head_dim]``. Returns one ``(key, value)`` per layer, the key as
    ``[batch·heads, head_dim, T]`` and the value as ``[batch·heads, T, head_dim]``.
    """
    stacked = torch.cat(past_key_values)
    total, batch, heads, length, head_dim = stacked.shape
    layers = total // 2
    keys = stacked[:layers].transpose(2, 3).reshape(layers, batch * heads, head_dim, length)
    values = stacked[layers:].reshape(layers, batch * heads, length, head_dim)
    return tuple(zip(keys, values))


class Prefix(PromptStrategy):
    """A per-layer key/value prefix handed to the model as a transformers ``Cache`` (Li & Liang, 2021, §4.2)."""

    def __repr__(self) -> str:
        return "PREFIX"

    def table_shape(self, config: PromptLearningConfig) -> tuple[int, int]:
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim

    def check_model(self, model: nn.Module, config: PromptLearningConfig) -> None:
        if cache_argument(model) is None:
            raise ConfigError(
                f"{type(model).__name__}.forward takes no KV cache ('cache' or 'past_key_values'), so prefix tuning "
                f"cannot feed it a prefix; use prompt tuning or P-tuning for this model"
            )
        model_type = getattr(_model_config(model), "model_type", None)
        if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING:
            raise ConfigError(
                f"TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING has an entry for {model_type!r}: deltatune "
                f"hands every model its prefix as a transformers Cache and never applies a legacy key/value "
                f"postprocess; remove the entry to use the Cache"
            )
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ConfigError(
                "prefix tuning does not work with gradient checkpointing (recomputation would write the prefix "
                "into the cache twice); disable gradient checkpointing on the base model first"
            )

    def fit_dimensions(self, config: PromptLearningConfig, model_config: dict[str, Any], filled: set[str]) -> None:
        """With ``num_key_value_heads`` (grouped-query attention) the prefix has the key/value shape:
        ``token_dim = head_dim × num_key_value_heads`` and ``num_attention_heads = num_key_value_heads``."""
        if "num_key_value_heads" in model_config and {"token_dim", "num_attention_heads"} <= filled:
            kv_heads = model_config["num_key_value_heads"]
            head_dim = model_config.get("head_dim") or config.token_dim // config.num_attention_heads
            config.token_dim = head_dim * kv_heads
            config.num_attention_heads = kv_heads

    def check_dimensions(self, config: PromptLearningConfig, model: nn.Module) -> None:
        """Refuse a prefix whose per-layer key/value shape or layer count does not fit the model's attention, before
        any forward turns it into a shape error deep inside attention."""
        mc = _model_config(model)
        if mc is None:
            return
        if config.token_dim % config.num_attention_heads:
            raise ConfigError(
                f"token_dim={config.token_dim} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        q_heads = _first(mc, "num_attention_heads", "n_head", "num_heads")
        hidden = _first(mc, "hidden_size", "n_embd", "d_model")
        kv_heads = _first(mc, "num_key_value_heads") or q_heads
        head_dim = _first(mc, "head_dim", "d_kv") or (hidden // q_heads if hidden and q_heads else None)
        want = (config.num_attention_heads, config.token_dim // config.num_attention_heads)
        if kv_heads and head_dim and want != (kv_heads, head_dim):
            raise ConfigError(
                f"the prefix has {want[0]} heads of width {want[1]} per layer but {type(model).__name__} attends "
                f"with {kv_heads} key/value heads of width {head_dim}; set num_attention_heads={kv_heads} and "
                f"token_dim={kv_heads * head_dim} in the PrefixTuningConfig"
            )
        layers = _first(mc, "num_decoder_layers") if getattr(mc, "is_encoder_decoder", False) else None
        layers = layers or _first(mc, "num_hidden_layers", "num_layers", "n_layer")
        if layers and layers != config.num_layers:
            raise ConfigError(
                f"the prefix covers num_layers={config.num_layers} layers but {type(model).__name__} has {layers} "
                f"attention layers that read the cache; set num_layers={layers}"
            )

    @staticmethod
    def _line_up(kwargs: dict[str, Any], config: PromptLearningConfig, encoder_decoder: bool) -> None:
        """The prefix is in the cache ahead of the decoder's self-attention: an encoder-decoder model's decoder mask
        covers it and the encoder's inputs stay as they are."""
        if encoder_decoder:
            prepend_positions(kwargs, config.num_virtual_tokens, in_input=False, mask_key="decoder_attention_mask",
                              position_key=None)
        else:
            prepend_positions(kwargs, config.num_virtual_tokens, in_input=False)

    def forward(self, model, config, encoder, task, kwargs, task_ids=None):
        """A call that passes a non-empty cache continues from an earlier call whose prefix is already in it."""
        cache = _pop_cache(kwargs)
        encoder_decoder = _is_encoder_decoder(model)
        fresh = _cache_length(cache) == 0
        if fresh:
            batch, length = _batch_and_length(kwargs, "input_ids", "inputs_embeds", "decoder_input_ids",
                                              "decoder_inputs_embeds", "labels")
            if not encoder_decoder:
                _check_length(model, config, config.num_virtual_tokens + length, f"an input of {length} tokens")
            cache = cache if cache is not None else new_cache(model)
            write_prefix(cache, model, config, encoder, batch)
        self._line_up(kwargs, config, encoder_decoder)
        output = _run(model, kwargs, cache, task)
        if fresh:
            _check_consumed(cache, model, config)
        return output

    def generate(self, model, config, encoder, kwargs, task_ids=None):
        """``input_ids`` stay the real tokens; the mask covers prefix + input, so ``generate()`` treats the ids as
        new tokens after the ``T`` cached ones and counts positions from ``T``. The encoder has no prefix."""
        if kwargs.get("prefill_chunk_size") is not None:
            raise ConfigError("prefill_chunk_size is not supported with prefix tuning (the prefix is the first chunk)")
        if cache_argument(model) is None:
            raise ConfigError(f"{type(model).__name__}.forward takes no KV cache")
        self._line_up(kwargs, config, _is_encoder_decoder(model))
        with _prefix_hooks(model, config, encoder):
            return model.generate(**kwargs)


PREFIX = Prefix()


# --- the prefix as a cache ------------------------------------------------------------------------------------------

def split_prefix(table: torch.Tensor, config: PromptLearningConfig, encoder_decoder: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)`` of shape ``(heads, T, head_dim)`` from the flat prefix table ``(T, L·2·token_dim)``.

    The flat layout (peft's, so files move between libraries) is ``[layer][key|value][head][head_dim]`` per row.
    For encoder-decoder models peft 0.21.2 pairs the table with the decoder layers in a way that follows from its
    cache construction: decoder layer ``i`` reads layer block ``2i mod L`` as its self-attention prefix, and the
    other blocks (historically cross-attention prefixes) are unused. We reproduce it so that adapters trained with
    peft give the same outputs here.
    """
    T, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    D = config.token_dim // H
    kv = table.view(T, L * 2, H, D).permute(1, 2, 0, 3)  # (2L, H, T, D)
    layers = [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]
    if encoder_decoder:
        layers = [layers[(2 * i) % L] for i in range(L)]
    return layers


def write_prefix(cache, model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, batch: int) -> None:
    """Write the prefix into an empty ``cache`` for ``batch`` rows (the self-attention part of an encoder-decoder
    cache)."""
    target = getattr(cache, "self_attention_cache", cache)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    table = prompt_table(encoder)
    table = table.to(dtype) if dtype is not None else table
    for layer, (key, value) in enumerate(split_prefix(table, config, _is_encoder_decoder(model))):
        target.update(key.unsqueeze(0).expand(batch, -1, -1, -1), value.unsqueeze(0).expand(batch, -1, -1, -1), layer)


def new_cache(model: nn.Module):
    """An empty cache of the kind ``generate()`` would create for ``model``."""
    from transformers import DynamicCache, EncoderDecoderCache

    mc = getattr(model, "config", None)
    make = (lambda: DynamicCache(config=mc.get_text_config(decoder=True))) if hasattr(mc, "get_text_config") \
        else DynamicCache
    return EncoderDecoderCache(make(), make()) if _is_encoder_decoder(model) else make()


def _check_consumed(cache, model: nn.Module, config: PromptLearningConfig) -> None:
    if _cache_length(cache) <= config.num_virtual_tokens:
        raise AdapterStateError(
            f"{type(model).__name__} did not use the key/value prefix handed to it (its cache did not grow past the "
            f"{config.num_virtual_tokens} prefix tokens), so the output would be the base model's; this model's "
            f"forward does not pass the cache to its attention layers and cannot be used with prefix tuning"
        )


@contextlib.contextmanager
def _prefix_hooks(model: nn.Module, config: PromptLearningConfig, encoder: nn.Module) -> Iterator[None]:
    """While generating: write the prefix into ``generate()``'s empty cache at the first forward (sized to that
    forward's batch, which includes beams) and check afterwards that the model used it. Without a KV cache
    (``use_cache=False``) every step re-runs the full sequence, so every step gets a fresh prefix cache that is not
    handed back to ``generate()``."""
    cache_name = cache_argument(model)
    encoder_decoder = _is_encoder_decoder(model)
    pending: list[tuple[Any, bool]] = []

    def before(module, args, kwargs):
        kwargs = _bind(module, args, kwargs)
        cache = kwargs.get(cache_name)
        if _cache_length(cache) > 0:
            return None
        fresh = cache is None
        if fresh:
            cache = new_cache(module)
            kwargs[cache_name] = cache
        ids_key = "decoder_input_ids" if encoder_decoder else "input_ids"
        embeds_key = "decoder_inputs_embeds" if encoder_decoder else "inputs_embeds"
        batch, _ = _batch_and_length(kwargs, ids_key, embeds_key)
        write_prefix(cache, module, config, encoder, batch)
        pending.append((cache, fresh))
        return (), kwargs

    def after(module, args, kwargs, output):
        if not pending:
            return None
        cache, fresh = pending.pop()
        _check_consumed(cache, module, config)
        if fresh and hasattr(output, "keys") and cache_name in output:
            output[cache_name] = None  # generate() must not carry a per-step cache into the next step
        return output

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

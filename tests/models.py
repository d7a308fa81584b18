"""Tiny, deterministic, randomly initialised models for the deltatune test-suite.

Everything here is built from configs in code, so the suite never needs the
network or the Hugging Face cache. Every factory seeds torch before building so
two calls with the same arguments yield bit-identical weights, which lets tests
compare "model A after X" against "fresh model A" without saving checkpoints.
All models are returned in ``eval()`` mode (dropout off => deterministic
forwards) and in float32.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import nn

# ``tests/conftest.py`` sets this too; repeating it here keeps ``tests.models``
# safe to import from scripts or a REPL without touching the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402  (must follow the offline switch)
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

__all__ = [
    "BERT_NUM_LABELS",
    "CONVNET_IMAGE_SIZE",
    "CONVNET_NUM_CLASSES",
    "CONVNET_SEQ_LEN",
    "DEFAULT_SEED",
    "FAMILIES",
    "FIRST_REGULAR_TOKEN",
    "MAKE_INPUTS",
    "MATRIX_FAMILIES",
    "MLP_IN_FEATURES",
    "MLP_NUM_CLASSES",
    "REMOTE_CODE",
    "REMOTE_CODE_AUTO_MAP",
    "REMOTE_CODE_LINEAR",
    "REMOTE_CODE_NORMS",
    "VOCAB_SIZE",
    "BertHead",
    "Family",
    "TinyConvNet",
    "TinyMLP",
    "make_causal_lm_inputs",
    "make_convnet_inputs",
    "make_mlp_inputs",
    "make_qa_inputs",
    "make_seq2seq_inputs",
    "make_seq_cls_inputs",
    "make_token_cls_inputs",
    "random_token_ids",
    "tiny_bert",
    "tiny_convnet",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mlp",
    "tiny_mt5",
    "tiny_remote_code",
    "tiny_t5",
    "write_remote_code_model",
]

DEFAULT_SEED = 0
VOCAB_SIZE = 128
#: Ids 0..2 are reserved for pad/bos/eos (T5 uses 0 pad, 1 eos); random inputs start here.
FIRST_REGULAR_TOKEN = 3
#: ``num_labels`` of the BERT classification heads, keyed by ``tiny_bert`` head name.
BERT_NUM_LABELS: dict[str, int] = {"seq_cls": 3, "token_cls": 5, "qa": 2}

BertHead = Literal["seq_cls", "token_cls", "qa", "base"]
Batch = dict[str, torch.Tensor]
MakeInputs = Callable[..., Batch]

_ATTN = "eager"  # explicit attention kernel: identical numerics on every backend / version


def _finish(model: nn.Module) -> nn.Module:
    """Put a freshly built model in the canonical test state: float32, eval mode."""
    return model.to(torch.float32).eval()


# --------------------------------------------------------------------------- #
# Transformers model factories
# --------------------------------------------------------------------------- #
def tiny_llama(seed: int = DEFAULT_SEED) -> LlamaForCausalLM:
    """2-layer Llama with grouped-query attention (4 q heads / 2 kv heads) and an untied head."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=_ATTN,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config))


def tiny_gpt2(seed: int = DEFAULT_SEED) -> GPT2LMHeadModel:
    """2-layer GPT-2; its projections are ``transformers.Conv1D`` (weights stored transposed)."""
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=_ATTN,
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(config))


_BERT_CLASSES: dict[str, type[PreTrainedModel]] = {
    "seq_cls": BertForSequenceClassification,
    "token_cls": BertForTokenClassification,
    "qa": BertForQuestionAnswering,
    "base": BertModel,
}


def tiny_bert(head: BertHead = "seq_cls", seed: int = DEFAULT_SEED) -> PreTrainedModel:
    """2-layer BERT encoder with the requested head (``seq_cls``/``token_cls``/``qa``/``base``).

    ``seq_cls`` has 3 labels, ``token_cls`` 5, ``qa`` the usual 2 (start/end).
    ``problem_type`` is pinned so the first forward never mutates the config.
    """
    if head not in _BERT_CLASSES:
        raise ValueError(f"unknown BERT head {head!r}; expected one of {sorted(_BERT_CLASSES)}")
    extra: dict[str, Any] = {}
    if head in BERT_NUM_LABELS:
        extra["num_labels"] = BERT_NUM_LABELS[head]
    if head == "seq_cls":
        extra["problem_type"] = "single_label_classification"
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        attn_implementation=_ATTN,
        **extra,
    )
    torch.manual_seed(seed)
    return _finish(_BERT_CLASSES[head](config))


_T5_KWARGS: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
    attn_implementation=_ATTN,
)


def tiny_t5(seed: int = DEFAULT_SEED) -> T5ForConditionalGeneration:
    """2+2-layer T5 (ReLU FFN: ``wi``/``wo``); decoder starts from the pad id 0."""
    config = T5Config(**_T5_KWARGS)
    torch.manual_seed(seed)
    return _finish(T5ForConditionalGeneration(config))


def tiny_mt5(seed: int = DEFAULT_SEED) -> MT5ForConditionalGeneration:
    """2+2-layer mT5 (gated-GELU FFN: ``wi_0``/``wi_1``/``wo``), same sizes as :func:`tiny_t5`."""
    config = MT5Config(**_T5_KWARGS)
    torch.manual_seed(seed)
    return _finish(MT5ForConditionalGeneration(config))


# --------------------------------------------------------------------------- #
# Plain torch models (custom-model code paths: Conv2d / Conv1d / Embedding / Linear)
# --------------------------------------------------------------------------- #
CONVNET_NUM_CLASSES = 4
CONVNET_IMAGE_SIZE = 8
CONVNET_SEQ_LEN = 5
MLP_IN_FEATURES = 16
MLP_NUM_CLASSES = 3


class TinyConvNet(nn.Module):
    """Two-branch toy classifier covering every non-transformers layer type adapters must handle.

    ``forward(pixel_values, input_ids) -> logits``:

    * ``pixel_values``: float ``[B, 3, H, W]`` -> ``conv2d`` -> ReLU -> spatial mean -> ``[B, 8]``
    * ``input_ids``: long ``[B, L]`` in ``[0, 128)`` -> ``embed`` -> ``conv1d`` over L -> ReLU -> mean -> ``[B, 8]``
    * concat ``[B, 16]`` -> ``fc1`` -> ReLU -> ``fc2`` -> ReLU -> ``head`` -> logits ``[B, 4]``

    Positional arguments (not a dict) so it can be called as ``model(x, ids)`` or
    ``model(pixel_values=x, input_ids=ids)``; use :func:`make_convnet_inputs`.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, num_classes: int = CONVNET_NUM_CLASSES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.conv2d = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)
        self.act = nn.ReLU()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.act(self.conv2d(pixel_values)).mean(dim=(2, 3))
        text = self.act(self.conv1d(self.embed(input_ids).transpose(1, 2))).mean(dim=2)
        hidden = self.act(self.fc1(torch.cat([image, text], dim=-1)))
        hidden = self.act(self.fc2(hidden))
        return self.head(hidden)


class TinyMLP(nn.Module):
    """``lin0`` -> ReLU -> ``lin1`` -> ReLU -> ``head``; ``forward(x [B, 16]) -> logits [B, 3]``."""

    def __init__(self, in_features: int = MLP_IN_FEATURES, num_classes: int = MLP_NUM_CLASSES) -> None:
        super().__init__()
        self.lin0 = nn.Linear(in_features, 32)
        self.lin1 = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_convnet(seed: int = DEFAULT_SEED) -> TinyConvNet:
    """Seeded :class:`TinyConvNet` (modules ``embed``, ``conv2d``, ``conv1d``, ``fc1``, ``fc2``, ``head``)."""
    torch.manual_seed(seed)
    return _finish(TinyConvNet())


def tiny_mlp(seed: int = DEFAULT_SEED) -> TinyMLP:
    """Seeded :class:`TinyMLP` (modules ``lin0``, ``lin1``, ``head``)."""
    torch.manual_seed(seed)
    return _finish(TinyMLP())


def make_convnet_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for :class:`TinyConvNet` plus integer class ``labels`` (not accepted by forward)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 3, CONVNET_IMAGE_SIZE, CONVNET_IMAGE_SIZE, generator=gen),
        "input_ids": random_token_ids(batch, CONVNET_SEQ_LEN, VOCAB_SIZE, gen),
        "labels": torch.randint(0, CONVNET_NUM_CLASSES, (batch,), generator=gen),
    }


def make_mlp_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"x", "labels"}`` for :class:`TinyMLP`; pass ``x`` only to forward."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, MLP_IN_FEATURES, generator=gen),
        "labels": torch.randint(0, MLP_NUM_CLASSES, (batch,), generator=gen),
    }


# --------------------------------------------------------------------------- #
# Input builders
# --------------------------------------------------------------------------- #
def _config_of(model: Any) -> Any:
    """Find the HF config behind ``model`` even when wrapped (peft/deltatune wrappers, or a bare config)."""
    if hasattr(model, "vocab_size") and hasattr(model, "to_dict"):
        return model  # already a config
    for getter in (
        lambda m: m.config,
        lambda m: m.get_base_model().config,
        lambda m: m.base_model.model.config,
        lambda m: m.model.config,
    ):
        try:
            config = getter(model)
        except AttributeError:
            continue
        if hasattr(config, "vocab_size"):
            return config
    raise TypeError(f"cannot find a transformers config on {type(model).__name__}")


def random_token_ids(batch: int, seq: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random ids in ``[FIRST_REGULAR_TOKEN, vocab_size)``, never pad/bos/eos, so no accidental masking/stop."""
    return torch.randint(FIRST_REGULAR_TOKEN, vocab_size, (batch, seq), generator=generator)


def make_causal_lm_inputs(model: Any, batch: int = 2, seq: int = 6, seed: int = 0) -> Batch:
    """``input_ids``/``attention_mask``/``labels`` for a causal LM (labels = ids; the model shifts them)."""
    gen = torch.Generator().manual_seed(seed)
    ids = random_token_ids(batch, seq, _config_of(model).vocab_size, gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_seq2seq_inputs(model: Any, batch: int = 2, seq: int = 6, seed: int = 0) -> Batch:
    """Encoder ``input_ids``/``attention_mask`` and ``labels``; T5 derives ``decoder_input_ids`` from labels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = _config_of(model).vocab_size
    ids = random_token_ids(batch, seq, vocab, gen)
    labels = random_token_ids(batch, seq, vocab, gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_seq_cls_inputs(model: Any, batch: int = 2, seq: int = 6, seed: int = 0) -> Batch:
    """Token inputs plus one class id per row in ``[0, num_labels)``."""
    gen = torch.Generator().manual_seed(seed)
    config = _config_of(model)
    ids = random_token_ids(batch, seq, config.vocab_size, gen)
    labels = torch.randint(0, config.num_labels, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_token_cls_inputs(model: Any, batch: int = 2, seq: int = 6, seed: int = 0) -> Batch:
    """Token inputs plus one class id per token in ``[0, num_labels)``."""
    gen = torch.Generator().manual_seed(seed)
    config = _config_of(model)
    ids = random_token_ids(batch, seq, config.vocab_size, gen)
    labels = torch.randint(0, config.num_labels, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_qa_inputs(model: Any, batch: int = 2, seq: int = 6, seed: int = 0) -> Batch:
    """Token inputs plus ``start_positions`` <= ``end_positions`` inside the sequence (extractive QA loss)."""
    gen = torch.Generator().manual_seed(seed)
    ids = random_token_ids(batch, seq, _config_of(model).vocab_size, gen)
    start = torch.randint(0, seq, (batch,), generator=gen)
    end = torch.minimum(start + torch.randint(0, seq, (batch,), generator=gen), torch.tensor(seq - 1))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "start_positions": start,
        "end_positions": end,
    }


#: Input builder per peft ``TaskType`` value; every builder has signature ``(model, batch=2, seq=6, seed=0)``.
MAKE_INPUTS: dict[str, MakeInputs] = {
    "CAUSAL_LM": make_causal_lm_inputs,
    "SEQ_2_SEQ_LM": make_seq2seq_inputs,
    "SEQ_CLS": make_seq_cls_inputs,
    "TOKEN_CLS": make_token_cls_inputs,
    "QUESTION_ANS": make_qa_inputs,
}


class Family(NamedTuple):
    """One model family: zero-arg-callable factory, peft task type, and matching input builder.

    A NamedTuple so ``factory, task_type, make_inputs = FAMILIES[name]`` works.
    """

    factory: Callable[..., nn.Module]
    task_type: str
    make_inputs: MakeInputs


FAMILIES: dict[str, Family] = {
    "llama": Family(tiny_llama, "CAUSAL_LM", make_causal_lm_inputs),
    "gpt2": Family(tiny_gpt2, "CAUSAL_LM", make_causal_lm_inputs),
    "bert": Family(functools.partial(tiny_bert, "seq_cls"), "SEQ_CLS", make_seq_cls_inputs),
    "t5": Family(tiny_t5, "SEQ_2_SEQ_LM", make_seq2seq_inputs),
    "mt5": Family(tiny_mt5, "SEQ_2_SEQ_LM", make_seq2seq_inputs),
}


# --------------------------------------------------------------------------- #
# trust_remote_code model directory
# --------------------------------------------------------------------------- #
#: The remote-code model's Linear layers and norms by leaf name (InternLM2 style; the output head is ``output``).
#: Its model type, "tinycustom", is in no library's default-target table, so adapters name these.
REMOTE_CODE_LINEAR: tuple[str, ...] = ("wqkv", "wo", "w1", "w2")
REMOTE_CODE_NORMS: tuple[str, ...] = ("attention_norm", "ffn_norm")

REMOTE_CODE_AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
    "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
}

_REMOTE_CONFIG_SRC = textwrap.dedent(
    '''\
    """Config of the "tinycustom" remote-code test model (classic ``__init__`` style, like most hub repos)."""
    from transformers import PretrainedConfig


    class TinyCustomConfig(PretrainedConfig):
        model_type = "tinycustom"

        def __init__(
            self,
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            initializer_range=0.02,
            use_cache=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            **kwargs,
        ):
            self.vocab_size = vocab_size
            self.hidden_size = hidden_size
            self.intermediate_size = intermediate_size
            self.num_hidden_layers = num_hidden_layers
            self.num_attention_heads = num_attention_heads
            self.max_position_embeddings = max_position_embeddings
            self.rms_norm_eps = rms_norm_eps
            self.rope_theta = rope_theta
            self.initializer_range = initializer_range
            self.use_cache = use_cache
            super().__init__(
                pad_token_id=pad_token_id,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                tie_word_embeddings=tie_word_embeddings,
                **kwargs,
            )
    '''
)

_REMOTE_MODELING_SRC = textwrap.dedent(
    '''\
    """Decoder-only "tinycustom" model with InternLM2-style names and a FUSED qkv projection.

    Module names (what adapter tests target): ``model.tok_embeddings``,
    ``model.layers.N.attention.{wqkv,wo}``, ``model.layers.N.feed_forward.{w1,w2}``,
    ``model.layers.N.{attention_norm,ffn_norm}``, ``model.norm``, ``output``.
    Supports a transformers ``Cache`` (passed as ``cache`` or ``past_key_values``) so
    ``generate()`` works with and without ``use_cache``.
    """
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    from .configuration_tinycustom import TinyCustomConfig

    # transformers >= 5.x renamed the output field ``past_key_values`` -> ``cache``.
    _CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


    def _rotate(x, position_ids, theta):
        """Rotary embedding computed on the fly (no buffers, so meta-device loading needs no init)."""
        half = x.shape[-1] // 2
        inv_freq = 1.0 / (theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
        angles = position_ids[:, None, :, None].float() * inv_freq  # [B, 1, T, half]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


    class TinyCustomRMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.eps = eps

        def forward(self, x):
            var = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


    class TinyCustomAttention(nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.layer_idx = layer_idx
            self.num_heads = config.num_attention_heads
            self.head_dim = config.hidden_size // config.num_attention_heads
            self.rope_theta = config.rope_theta
            self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
            self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, hidden_states, position_ids, attn_bias, cache=None):
            bsz, q_len, _ = hidden_states.shape
            qkv = self.wqkv(hidden_states).view(bsz, q_len, 3, self.num_heads, self.head_dim)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # each [B, H, T, D]
            q = _rotate(q, position_ids, self.rope_theta)
            k = _rotate(k, position_ids, self.rope_theta)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + attn_bias
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = (probs @ v).transpose(1, 2).reshape(bsz, q_len, -1)
            return self.wo(out)


    class TinyCustomMLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
            self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        def forward(self, x):
            return self.w2(F.gelu(self.w1(x)))


    class TinyCustomBlock(nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.attention_norm = TinyCustomRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.attention = TinyCustomAttention(config, layer_idx)
            self.ffn_norm = TinyCustomRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.feed_forward = TinyCustomMLP(config)

        def forward(self, hidden_states, position_ids, attn_bias, cache=None):
            hidden_states = hidden_states + self.attention(
                self.attention_norm(hidden_states), position_ids, attn_bias, cache
            )
            return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


    class TinyCustomPreTrainedModel(PreTrainedModel):
        config_class = TinyCustomConfig
        base_model_prefix = "model"
        supports_gradient_checkpointing = False
        _no_split_modules = ["TinyCustomBlock"]
        # The default ``PreTrainedModel._init_weights`` covers Linear, Embedding and *RMSNorm modules.


    class TinyCustomModel(TinyCustomPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(
                [TinyCustomBlock(config, i) for i in range(config.num_hidden_layers)]
            )
            self.norm = TinyCustomRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_init()

        def get_input_embeddings(self):
            return self.tok_embeddings

        def set_input_embeddings(self, value):
            self.tok_embeddings = value

        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                    position_ids=None, cache=None, **kwargs):
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("Specify exactly one of input_ids or inputs_embeds")
            if inputs_embeds is None:
                inputs_embeds = self.tok_embeddings(input_ids)
            bsz, q_len, _ = inputs_embeds.shape
            device = inputs_embeds.device
            past_len = cache.get_seq_length() if cache is not None else 0
            total_len = past_len + q_len

            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
                else:
                    position_ids = torch.arange(past_len, total_len, device=device).expand(bsz, -1)

            # Causal + padding mask as an additive bias; finite min (not -inf) so fully
            # masked rows (left padding) give uniform attention instead of NaN.
            key_pos = torch.arange(total_len, device=device)
            query_pos = torch.arange(past_len, total_len, device=device)
            allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, T, S]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, -total_len:].bool()
            attn_bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=device)
            attn_bias = attn_bias.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)

            hidden_states = inputs_embeds
            for layer in self.layers:
                hidden_states = layer(hidden_states, position_ids, attn_bias, cache)
            hidden_states = self.norm(hidden_states)
            return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache})


    class TinyCustomForCausalLM(TinyCustomPreTrainedModel, GenerationMixin):
        def __init__(self, config):
            super().__init__(config)
            self.model = TinyCustomModel(config)
            self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_input_embeddings(self):
            return self.model.tok_embeddings

        def set_input_embeddings(self, value):
            self.model.tok_embeddings = value

        def get_output_embeddings(self):
            return self.output

        def set_output_embeddings(self, new_embeddings):
            self.output = new_embeddings

        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    past_key_values=None, use_cache=None, **kwargs):
            cache = kwargs.pop("cache", None)
            if cache is None:
                cache = past_key_values
            use_cache = self.config.use_cache if use_cache is None else use_cache
            if use_cache and cache is None:
                cache = DynamicCache()
            if not use_cache:
                cache = None
            return_dict = kwargs.pop("return_dict", None)
            base = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                position_ids=kwargs.pop("position_ids", None),
                cache=cache,
            )
            logits = self.output(base.last_hidden_state).float()
            loss = None
            if labels is not None:
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    labels[:, 1:].reshape(-1).to(logits.device),
                    ignore_index=-100,
                )
            out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
            return out.to_tuple() if return_dict is False else out
    '''
)


def write_remote_code_model(dirpath: str | os.PathLike[str], seed: int = DEFAULT_SEED) -> Path:
    """Write a complete ``trust_remote_code`` causal-LM checkpoint ("tinycustom") into ``dirpath``.

    Produces ``config.json`` (with ``auto_map``), ``configuration_tinycustom.py``,
    ``modeling_tinycustom.py``, ``model.safetensors`` and ``generation_config.json``.
    The model is instantiated through the real dynamic-module machinery (so the
    files are known to load) and saved with ``save_pretrained``; weights are
    deterministic in ``seed``. Returns ``dirpath`` as a :class:`Path`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_tinycustom.py").write_text(_REMOTE_CONFIG_SRC)
    (path / "modeling_tinycustom.py").write_text(_REMOTE_MODELING_SRC)
    # Bootstrap config.json so AutoConfig can resolve the custom classes from this directory.
    (path / "config.json").write_text(
        json.dumps({"model_type": "tinycustom", "auto_map": REMOTE_CODE_AUTO_MAP}, indent=2)
    )
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)  # save_pretrained may rewrite it; keep it exact
    model.save_pretrained(path)
    # save_pretrained copies the module files from the HF modules cache; make sure
    # the directory ends up with exactly our sources and auto_map whatever it did.
    (path / "configuration_tinycustom.py").write_text(_REMOTE_CONFIG_SRC)
    (path / "modeling_tinycustom.py").write_text(_REMOTE_MODELING_SRC)
    saved = json.loads((path / "config.json").read_text())
    saved["auto_map"] = dict(REMOTE_CODE_AUTO_MAP)
    saved["model_type"] = "tinycustom"
    (path / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return path


@functools.cache
def _remote_code_dir() -> Path:
    """One remote-code checkpoint per process, in a temporary directory removed at exit."""
    root = tempfile.mkdtemp(prefix="deltatune-remote-code-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_remote_code_model(Path(root) / "tinycustom")


def tiny_remote_code() -> nn.Module:
    """The "tinycustom" causal LM loaded the way users load remote code: its classes come from the checkpoint
    directory through ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``."""
    from transformers import AutoModelForCausalLM

    return _finish(AutoModelForCausalLM.from_pretrained(_remote_code_dir(), trust_remote_code=True))


#: Name of the remote-code family in :data:`MATRIX_FAMILIES`.
REMOTE_CODE = "remote_code"

#: The shared matrix's families: the built-in transformers families plus the ``trust_remote_code`` model. Kept
#: apart from :data:`FAMILIES`, whose factories take a ``seed`` and whose model types have per-method defaults.
MATRIX_FAMILIES: dict[str, Family] = {
    **FAMILIES,
    REMOTE_CODE: Family(tiny_remote_code, "CAUSAL_LM", make_causal_lm_inputs),
}

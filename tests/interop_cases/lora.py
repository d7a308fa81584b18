"""LoRA and its variants, exchanged with peft."""

from __future__ import annotations

from tests.interop_cases import InteropCase, convnet_inputs
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

CASES = [
    InteropCase("llama", "LoraConfig", tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM")),
    InteropCase(
        "gpt2-conv1d",
        "LoraConfig",
        tiny_gpt2,
        make_causal_lm_inputs,
        dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"]),
    ),
    InteropCase(
        "bert-seq-cls-heads", "LoraConfig", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, dict(task_type="SEQ_CLS")
    ),
    InteropCase(
        "bert-extra-modules-to-save",
        "LoraConfig",
        lambda: tiny_bert("seq_cls"),
        make_seq_cls_inputs,
        dict(task_type="SEQ_CLS", modules_to_save=["bert.pooler"]),
    ),
    InteropCase(
        "t5",
        "LoraConfig",
        tiny_t5,
        make_seq2seq_inputs,
        dict(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"]),
    ),
    InteropCase(
        "llama-dora", "LoraConfig", tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM", use_dora=True)
    ),
    InteropCase(
        "gpt2-dora", "LoraConfig", tiny_gpt2, make_causal_lm_inputs, dict(task_type="CAUSAL_LM", use_dora=True)
    ),
    InteropCase(
        "llama-rslora",
        "LoraConfig",
        tiny_llama,
        make_causal_lm_inputs,
        dict(task_type="CAUSAL_LM", use_rslora=True, r=4, lora_alpha=16),
    ),
    # peft writes the base weight of a targeted layer for the names it knows (embed_tokens, lm_head), including a
    # targeted Linear lm_head; deltatune writes it for every targeted nn.Embedding (so a resized vocabulary travels
    # with the adapter) and never for Linear layers.
    InteropCase(
        "llama-embedding",
        "LoraConfig",
        tiny_llama,
        make_causal_lm_inputs,
        dict(task_type="CAUSAL_LM", target_modules=["embed_tokens", "q_proj", "lm_head"]),
        extra_theirs=frozenset({"base_model.model.lm_head.base_layer.weight"}),
    ),
    InteropCase(
        "llama-patterns",
        "LoraConfig",
        tiny_llama,
        make_causal_lm_inputs,
        dict(
            task_type="CAUSAL_LM",
            target_modules="all-linear",
            rank_pattern={"down_proj": 2},
            alpha_pattern={r"layers\.1\..*": 4},
        ),
    ),
    InteropCase(
        "convnet-conv-and-linear",
        "LoraConfig",
        tiny_convnet,
        convnet_inputs,
        dict(target_modules=["conv2d", "conv1d", "fc1", "fc2"], r=2),
    ),
    InteropCase(
        "convnet-dora-conv",
        "LoraConfig",
        tiny_convnet,
        convnet_inputs,
        dict(target_modules=["conv2d", "conv1d"], use_dora=True, r=2),
    ),
    InteropCase(
        "convnet-embedding",
        "LoraConfig",
        tiny_convnet,
        convnet_inputs,
        dict(target_modules=["embed"], r=2),
        extra_ours=frozenset({"base_model.model.embed.base_layer.weight"}),
    ),
    InteropCase(
        "gpt2-bias-all", "LoraConfig", tiny_gpt2, make_causal_lm_inputs, dict(task_type="CAUSAL_LM", bias="all")
    ),
    # under bias="all" peft also writes a modules_to_save bias a second time as "<head>.modules_to_save.bias"
    InteropCase(
        "bert-bias-all",
        "LoraConfig",
        lambda: tiny_bert("seq_cls"),
        make_seq_cls_inputs,
        dict(task_type="SEQ_CLS", bias="all"),
        extra_theirs=frozenset({"base_model.model.classifier.modules_to_save.bias"}),
    ),
    InteropCase(
        "bert-bias-lora-only",
        "LoraConfig",
        lambda: tiny_bert("seq_cls"),
        make_seq_cls_inputs,
        dict(task_type="SEQ_CLS", bias="lora_only"),
    ),
]

"""LoHa exchanged with peft: Linear (llama, bert, t5) and Conv1d/Conv2d, flattened and with the effective conv form.

GPT-2 is absent on purpose: peft's LoHa refuses transformers' Conv1D, and so does deltatune (test_loha_lokr).
"""

from __future__ import annotations

from tests.interop_cases import InteropCase, convnet_inputs
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_t5,
)

CASES = [
    InteropCase("loha-llama", "LoHaConfig", tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM")),
    InteropCase(
        "loha-bert-seq-cls", "LoHaConfig", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, dict(task_type="SEQ_CLS")
    ),
    InteropCase(
        "loha-t5",
        "LoHaConfig",
        tiny_t5,
        make_seq2seq_inputs,
        dict(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"], r=4, alpha=8, rank_dropout=0.1),
    ),
    InteropCase(
        "loha-llama-patterns",
        "LoHaConfig",
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
        "loha-convnet-conv-and-linear",
        "LoHaConfig",
        tiny_convnet,
        convnet_inputs,
        dict(target_modules=["conv2d", "conv1d", "fc1", "fc2"], r=2),
    ),
    InteropCase(
        "loha-convnet-effective-conv",
        "LoHaConfig",
        tiny_convnet,
        convnet_inputs,
        dict(target_modules=["conv2d", "conv1d"], r=2, alpha=32, use_effective_conv2d=True),
    ),
]

"""LayerNorm tuning: the shared matrix, and adapters exchanged with peft."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, MatrixCase
from tests.models import (
    REMOTE_CODE_NORMS,
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)


def _targets(family: str) -> dict[str, Any]:
    # peft has no default norm targets for BERT (deltatune does); name them so the parameter counts compare.
    return dict(target_modules=["LayerNorm"]) if family == "bert" else {}


MATRIX = [
    MatrixCase("LNTuningConfig", "ln_tuning", _targets, remote_kwargs=dict(target_modules=list(REMOTE_CODE_NORMS))),
]

INTEROP = [
    # per-model-type default targets: LlamaRMSNorm, GPT-2's nn.LayerNorm ln_*, T5LayerNorm
    InteropCase("ln-llama", "LNTuningConfig", tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM")),
    InteropCase("ln-gpt2", "LNTuningConfig", tiny_gpt2, make_causal_lm_inputs, dict(task_type="CAUSAL_LM")),
    InteropCase("ln-t5", "LNTuningConfig", tiny_t5, make_seq2seq_inputs, dict(task_type="SEQ_2_SEQ_LM")),
    # BERT's LayerNorms with the classifier head trained in full (the task's default modules_to_save)
    InteropCase(
        "ln-bert-seq-cls",
        "LNTuningConfig",
        lambda: tiny_bert("seq_cls"),
        make_seq_cls_inputs,
        dict(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
    ),
    InteropCase(
        "ln-llama-regex-exclude-modules-to-save",
        "LNTuningConfig",
        tiny_llama,
        make_causal_lm_inputs,
        dict(
            task_type="CAUSAL_LM",
            target_modules=r".*layers\.\d+\..*layernorm",
            exclude_modules=["layers.0.post_attention_layernorm"],
            modules_to_save=["lm_head"],
        ),
    ),
]

FUZZ_SEEDS = {"ln_tuning": FuzzSeed("LNTuningConfig", dict(target_modules=["input_layernorm", "norm"]))}

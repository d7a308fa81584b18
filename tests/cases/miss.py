"""MiSS: the shared matrix in its three variants (GPT-2 is left out: its Conv1D projections are not MiSS targets, in
peft either) and adapters exchanged with peft, including an ``r`` that does not divide ``in_features`` (padded)."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, convnet_inputs
from tests.cases import without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS, LINEAR_FAMILIES as _FAMILIES, linear_cases
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_t5,
)


# every variant starts at zero (the base model); the matrix perturbs the shard as training would
_miss = linear_cases("MissConfig")


MATRIX = [
    _miss("miss_default", r=8),
    _miss("miss_bat_dropout", without_remote_code(_FAMILIES), r=4, init_weights="bat", miss_dropout=0.1),
    _miss("miss_mini", without_remote_code(_FAMILIES), r=8, init_weights="mini", mini_r=4),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "MissConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("miss-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=8),
    _exchanged("miss-llama-random-init", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=16,
               init_weights=False, target_modules="all-linear"),
    _exchanged("miss-llama-bat", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=8, init_weights="bat",
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("miss-llama-mini", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, init_weights="mini",
               mini_r=8, target_modules=["q_proj", "up_proj"]),
    _exchanged("miss-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=8,
               bias="MiSS_only", **_BERT_TARGETS),
    _exchanged("miss-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=8,
               target_modules=["q", "v", "wo"]),
    # fc1 reads 16 features: r=5 leaves a partial last shard (zero-padded input)
    _exchanged("miss-convnet-padded", tiny_convnet, convnet_inputs, r=5, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "miss": FuzzSeed("MissConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False)),
    "miss_bat": FuzzSeed("MissConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights="bat")),
}

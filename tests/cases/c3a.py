"""C3A: the shared matrix (GPT-2 is left out: its Conv1D projections are not C3A targets, in peft either) and adapters
exchanged with peft, including a per-module ``block_size_pattern``. peft's default init is random, so the matrix's
fresh adapter is the zero one (``init_weights=True``)."""

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


_c3a = linear_cases("C3AConfig", defaults=dict(init_weights=True), nonzero_kwargs=dict(init_weights="xavier_uniform"))


MATRIX = [
    _c3a("c3a_default", block_size=16),
    # not all-linear: it includes heads (bert's 3-way classifier) no block size divides
    _c3a("c3a_pattern_bias", without_remote_code(_FAMILIES), block_size=8, block_size_pattern={"v": 4, "value": 4},
         bias="all"),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "C3AConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("c3a-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", block_size=16),
    _exchanged("c3a-llama-pattern-kaiming", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", block_size=8,
               block_size_pattern={"v_proj": 16, "down_proj": 4}, init_weights="kaiming_uniform",
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("c3a-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               block_size=32, bias="c3a_only", **_BERT_TARGETS),
    _exchanged("c3a-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", block_size=32,
               target_modules=["q", "v", "wo"]),
    _exchanged("c3a-convnet", tiny_convnet, convnet_inputs, block_size=16, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "c3a": FuzzSeed("C3AConfig", dict(target_modules=["q_proj", "v_proj"], block_size=16)),
}

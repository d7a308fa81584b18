"""Lily: the shared matrix (GPT-2 is left out: its Conv1D projections are not Lily targets, in peft either; no merge
cases: Lily has no fixed weight update) and adapters exchanged with peft, with shared ``A`` blocks and banks."""

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


_lily = linear_cases("LilyConfig", nonzero_kwargs=dict(init_weights=False), mergeable=False,
                    cache_exact=False)


MATRIX = [
    _lily("lily_default", r=4),
    _lily("lily_shared", without_remote_code(_FAMILIES), r=4, stride_A=2, num_B=3, scaling=0.5),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "LilyConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("lily-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("lily-llama-shared", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, stride_A=2,
               num_B=3, scaling=2.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("lily-llama-regex", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=2, stride_A=3,
               target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)"),
    _exchanged("lily-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=4,
               stride_A=2, **_BERT_TARGETS),
    _exchanged("lily-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4, stride_A=2,
               target_modules=["q", "v", "wo"]),
    _exchanged("lily-convnet", tiny_convnet, convnet_inputs, r=3, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "lily": FuzzSeed("LilyConfig", dict(target_modules=["q_proj", "v_proj"], r=4, stride_A=2, init_weights=False)),
}

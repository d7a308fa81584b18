"""PEANuT: the shared matrix (GPT-2 is left out: its Conv1D projections are not PEANuT targets, in peft either) and
adapters exchanged with peft, with and without encoder / decoder layers."""

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


_peanut = linear_cases("PeanutConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _peanut("peanut_default", r=4),
    _peanut("peanut_deep_gelu", without_remote_code(_FAMILIES), r=4, depth=2, act_fn="gelu", scaling=0.5),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "PeanutConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("peanut-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("peanut-llama-deep", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, depth=2,
               act_fn="silu", scaling=2.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("peanut-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=4,
               depth=1, **_BERT_TARGETS),
    _exchanged("peanut-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4,
               target_modules=["q", "v", "wo"]),
    _exchanged("peanut-convnet", tiny_convnet, convnet_inputs, r=3, depth=1, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "peanut": FuzzSeed("PeanutConfig", dict(target_modules=["q_proj", "v_proj"], r=4, depth=1, init_weights=False)),
}

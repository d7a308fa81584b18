"""SHiRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not SHiRA targets, in peft either) and
adapters exchanged with peft, with and without a seed (peft's unseeded generator is torch's default seed)."""

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


_shira = linear_cases("ShiraConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _shira("shira_default", r=2),
    _shira("shira_seeded", without_remote_code(_FAMILIES), r=4, random_seed=3),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "ShiraConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("shira-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=2),
    _exchanged("shira-llama-seeded", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, random_seed=42,
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("shira-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=2,
               random_seed=1, **_BERT_TARGETS),
    _exchanged("shira-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=2,
               target_modules=["q", "v", "wo"]),
    _exchanged("shira-convnet", tiny_convnet, convnet_inputs, r=3, random_seed=5, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "shira": FuzzSeed("ShiraConfig", dict(target_modules=["q_proj", "v_proj"], r=2, random_seed=0,
                                          init_weights=False)),
}

"""DeLoRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not DeLoRA targets, in peft either) and
adapters exchanged with peft, including rank and lambda patterns; the saved column norms travel with the file."""

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


_delora = linear_cases("DeloraConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _delora("delora_default", r=4),
    _delora("delora_patterns_dropout_bias", without_remote_code(_FAMILIES), r=2, rank_pattern={"v": 4, "value": 4},
            lambda_pattern={"q": 3.0, "query": 3.0}, module_dropout=0.1, bias="all"),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "DeloraConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("delora-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("delora-llama-patterns", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=2,
               delora_lambda=5, rank_pattern={"v_proj": 6}, lambda_pattern={"down_proj": 0.5},
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("delora-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=4,
               bias="delora_only", **_BERT_TARGETS),
    _exchanged("delora-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4,
               target_modules=["q", "v", "wo"]),
    _exchanged("delora-convnet", tiny_convnet, convnet_inputs, r=3, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "delora": FuzzSeed("DeloraConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

"""OSF: the shared matrix (GPT-2 is left out: its Conv1D projections are not OSF targets, in peft either) and
adapters exchanged with peft; the SVD factors are never saved, so both libraries regenerate them from the base
weight."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, convnet_inputs, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS, LINEAR_FAMILIES as _FAMILIES
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_t5,
)


_osf = linear_cases("OSFConfig")  # nonzero: init_weights=True plus the matrix's noise (random factors are far larger)


MATRIX = [
    _osf("osf_default"),
    _osf("osf_rank_pattern", without_remote_code(_FAMILIES), effective_rank=0.75, rank_pattern={"v": 4, "value": 4}),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "OSFConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("osf-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM"),
    _exchanged("osf-llama-ranks", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", effective_rank=0.25,
               rank_pattern={r"layers\.0\..*v_proj": 3, "down_proj": 10}, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]),
    _exchanged("osf-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", effective_rank=8,
               **_BERT_TARGETS),
    _exchanged("osf-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"]),
    _exchanged("osf-convnet", tiny_convnet, convnet_inputs, effective_rank=4, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "osf": FuzzSeed("OSFConfig", dict(target_modules=["q_proj", "v_proj"], effective_rank=8, init_weights=False)),
}

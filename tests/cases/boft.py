"""BOFT: the shared matrix (GPT-2 is left out: its Conv1D projections are not BOFT targets, in peft either) and
adapters exchanged with peft. peft 0.21.2 builds butterflies only through a CUDA extension and falls back to one
factor without it, so the exchanged adapters use ``boft_n_butterfly_factor=1``; ``tests/test_boft.py`` checks the
butterfly against peft's formula written out."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, MatrixCase, convnet_inputs
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


_boft = linear_cases("BOFTConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _boft("boft_default"),
    # in peft (CPU) the butterfly falls back to one factor: the parameter count is not peft's
    MatrixCase("BOFTConfig", "boft_butterfly_dropout_bias",
               lambda family: {**(_BERT_TARGETS if family == "bert" else {}), "boft_block_size": 4,
                               "boft_n_butterfly_factor": 2, "boft_dropout": 0.2, "bias": "all"},
               nonzero_kwargs=dict(init_weights=False), families=without_remote_code(_FAMILIES), in_peft=False),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "BOFTConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("boft-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM"),
    _exchanged("boft-llama-block-num", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", boft_block_size=0,
               boft_block_num=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("boft-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               bias="boft_only", boft_block_size=8, **_BERT_TARGETS),
    _exchanged("boft-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"]),
    # conv2d reads 3·3·3 = 27 features: blocks of 3
    _exchanged("boft-convnet-conv2d", tiny_convnet, convnet_inputs, target_modules=["conv2d"], boft_block_size=3),
]

FUZZ_SEEDS = {
    "boft": FuzzSeed("BOFTConfig", dict(target_modules=["q_proj", "v_proj"], boft_block_size=8, init_weights=False)),
}

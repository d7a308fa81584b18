"""BOFT: the shared matrix (GPT-2 is left out: its Conv1D projections are not BOFT targets, in peft either) and
adapters exchanged with peft. peft 0.21.2 builds butterflies only through a CUDA extension and falls back to one
factor without it, so the exchanged adapters use ``boft_n_butterfly_factor=1``; ``tests/test_boft.py`` checks the
butterfly against peft's formula written out."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, MatrixCase, interop_builder, linear_cases, without_remote_code

_boft = linear_cases("BOFTConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _boft("boft_default"),
    # in peft (CPU) the butterfly falls back to one factor: the parameter count is not peft's
    MatrixCase("BOFTConfig", "boft_butterfly_dropout_bias",
               lambda family: {**(_BERT_TARGETS if family == "bert" else {}), "boft_block_size": 4,
                               "boft_n_butterfly_factor": 2, "boft_dropout": 0.2, "bias": "all"},
               nonzero_kwargs=dict(init_weights=False), families=without_remote_code(_FAMILIES), in_peft=False),
]


_exchanged = interop_builder("BOFTConfig")


INTEROP = [
    _exchanged("boft-llama", "llama"),
    _exchanged("boft-llama-block-num", "llama", boft_block_size=0, boft_block_num=4,
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("boft-bert-bias", "bert", bias="boft_only", boft_block_size=8, **_BERT_TARGETS),
    _exchanged("boft-t5", "t5", target_modules=["q", "v", "wo"]),
    # conv2d reads 3·3·3 = 27 features: blocks of 3
    _exchanged("boft-convnet-conv2d", "convnet", target_modules=["conv2d"], boft_block_size=3),
]

FUZZ_SEEDS = {
    "boft": FuzzSeed("BOFTConfig", dict(target_modules=["q_proj", "v_proj"], boft_block_size=8, init_weights=False)),
}

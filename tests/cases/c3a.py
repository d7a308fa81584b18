"""C3A: the shared matrix (GPT-2 is left out: its Conv1D projections are not C3A targets, in peft either) and adapters
exchanged with peft, including a per-module ``block_size_pattern``. peft's default init is random, so the matrix's
fresh adapter is the zero one (``init_weights=True``)."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_c3a = linear_cases("C3AConfig", defaults=dict(init_weights=True), nonzero_kwargs=dict(init_weights="xavier_uniform"))


MATRIX = [
    _c3a("c3a_default", block_size=16),
    # not all-linear: it includes heads (bert's 3-way classifier) no block size divides
    _c3a("c3a_pattern_bias", without_remote_code(_FAMILIES), block_size=8, block_size_pattern={"v": 4, "value": 4},
         bias="all"),
]


_exchanged = interop_builder("C3AConfig")


INTEROP = [
    _exchanged("c3a-llama", "llama", block_size=16),
    _exchanged("c3a-llama-pattern-kaiming", "llama", block_size=8, block_size_pattern={"v_proj": 16, "down_proj": 4},
               init_weights="kaiming_uniform", target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("c3a-bert-bias", "bert", block_size=32, bias="c3a_only", **_BERT_TARGETS),
    _exchanged("c3a-t5", "t5", block_size=32, target_modules=["q", "v", "wo"]),
    _exchanged("c3a-convnet", "convnet", block_size=16, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "c3a": FuzzSeed("C3AConfig", dict(target_modules=["q_proj", "v_proj"], block_size=16)),
}

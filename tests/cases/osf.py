"""OSF: the shared matrix (GPT-2 is left out: its Conv1D projections are not OSF targets, in peft either) and
adapters exchanged with peft; the SVD factors are never saved, so both libraries regenerate them from the base
weight."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_osf = linear_cases("OSFConfig")  # nonzero: init_weights=True plus the matrix's noise (random factors are far larger)


MATRIX = [
    _osf("osf_default"),
    _osf("osf_rank_pattern", without_remote_code(_FAMILIES), effective_rank=0.75, rank_pattern={"v": 4, "value": 4}),
]


_exchanged = interop_builder("OSFConfig")


INTEROP = [
    _exchanged("osf-llama", "llama"),
    _exchanged("osf-llama-ranks", "llama", effective_rank=0.25,
               rank_pattern={r"layers\.0\..*v_proj": 3, "down_proj": 10},
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("osf-bert", "bert", effective_rank=8, **_BERT_TARGETS),
    _exchanged("osf-t5", "t5", target_modules=["q", "v", "wo"]),
    _exchanged("osf-convnet", "convnet", effective_rank=4, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "osf": FuzzSeed("OSFConfig", dict(target_modules=["q_proj", "v_proj"], effective_rank=8, init_weights=False)),
}

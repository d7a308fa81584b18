"""PEANuT: the shared matrix (GPT-2 is left out: its Conv1D projections are not PEANuT targets, in peft either) and
adapters exchanged with peft, with and without encoder / decoder layers."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_peanut = linear_cases("PeanutConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _peanut("peanut_default", r=4),
    _peanut("peanut_deep_gelu", without_remote_code(_FAMILIES), r=4, depth=2, act_fn="gelu", scaling=0.5),
]


_exchanged = interop_builder("PeanutConfig")


INTEROP = [
    _exchanged("peanut-llama", "llama", r=4),
    _exchanged("peanut-llama-deep", "llama", r=4, depth=2, act_fn="silu", scaling=2.0,
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("peanut-bert", "bert", r=4, depth=1, **_BERT_TARGETS),
    _exchanged("peanut-t5", "t5", r=4, target_modules=["q", "v", "wo"]),
    _exchanged("peanut-convnet", "convnet", r=3, depth=1, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "peanut": FuzzSeed("PeanutConfig", dict(target_modules=["q_proj", "v_proj"], r=4, depth=1, init_weights=False)),
}

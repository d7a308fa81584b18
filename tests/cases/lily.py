"""Lily: the shared matrix (GPT-2 is left out: its Conv1D projections are not Lily targets, in peft either; no merge
cases: Lily has no fixed weight update) and adapters exchanged with peft, with shared ``A`` blocks and banks."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_lily = linear_cases("LilyConfig", nonzero_kwargs=dict(init_weights=False), mergeable=False,
                    cache_exact=False)


MATRIX = [
    _lily("lily_default", r=4),
    _lily("lily_shared", without_remote_code(_FAMILIES), r=4, stride_A=2, num_B=3, scaling=0.5),
]


_exchanged = interop_builder("LilyConfig")


INTEROP = [
    _exchanged("lily-llama", "llama", r=4),
    _exchanged("lily-llama-shared", "llama", r=4, stride_A=2, num_B=3, scaling=2.0,
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("lily-llama-regex", "llama", r=2, stride_A=3, target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)"),
    _exchanged("lily-bert", "bert", r=4, stride_A=2, **_BERT_TARGETS),
    _exchanged("lily-t5", "t5", r=4, stride_A=2, target_modules=["q", "v", "wo"]),
    _exchanged("lily-convnet", "convnet", r=3, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "lily": FuzzSeed("LilyConfig", dict(target_modules=["q_proj", "v_proj"], r=4, stride_A=2, init_weights=False)),
}

"""SHiRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not SHiRA targets, in peft either) and
adapters exchanged with peft, with and without a seed (peft's unseeded generator is torch's default seed)."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_shira = linear_cases("ShiraConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _shira("shira_default", r=2),
    _shira("shira_seeded", without_remote_code(_FAMILIES), r=4, random_seed=3),
]


_exchanged = interop_builder("ShiraConfig")


INTEROP = [
    _exchanged("shira-llama", "llama", r=2),
    _exchanged("shira-llama-seeded", "llama", r=4, random_seed=42, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("shira-bert", "bert", r=2, random_seed=1, **_BERT_TARGETS),
    _exchanged("shira-t5", "t5", r=2, target_modules=["q", "v", "wo"]),
    _exchanged("shira-convnet", "convnet", r=3, random_seed=5, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "shira": FuzzSeed("ShiraConfig", dict(target_modules=["q_proj", "v_proj"], r=2, random_seed=0,
                                          init_weights=False)),
}

"""MiSS: the shared matrix in its three variants (GPT-2 is left out: its Conv1D projections are not MiSS targets, in
peft either) and adapters exchanged with peft, including an ``r`` that does not divide ``in_features`` (padded)."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

# every variant starts at zero (the base model); the matrix perturbs the shard as training would
_miss = linear_cases("MissConfig")


MATRIX = [
    _miss("miss_default", r=8),
    _miss("miss_bat_dropout", without_remote_code(_FAMILIES), r=4, init_weights="bat", miss_dropout=0.1),
    _miss("miss_mini", without_remote_code(_FAMILIES), r=8, init_weights="mini", mini_r=4),
]


_exchanged = interop_builder("MissConfig")


INTEROP = [
    _exchanged("miss-llama", "llama", r=8),
    _exchanged("miss-llama-random-init", "llama", r=16, init_weights=False, target_modules="all-linear"),
    _exchanged("miss-llama-bat", "llama", r=8, init_weights="bat", target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("miss-llama-mini", "llama", r=4, init_weights="mini", mini_r=8, target_modules=["q_proj", "up_proj"]),
    _exchanged("miss-bert-bias", "bert", r=8, bias="MiSS_only", **_BERT_TARGETS),
    _exchanged("miss-t5", "t5", r=8, target_modules=["q", "v", "wo"]),
    # fc1 reads 16 features: r=5 leaves a partial last shard (zero-padded input)
    _exchanged("miss-convnet-padded", "convnet", r=5, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "miss": FuzzSeed("MissConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False)),
    "miss_bat": FuzzSeed("MissConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights="bat")),
}

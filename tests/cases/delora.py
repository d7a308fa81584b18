"""DeLoRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not DeLoRA targets, in peft either) and
adapters exchanged with peft, including rank and lambda patterns; the saved column norms travel with the file."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_delora = linear_cases("DeloraConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _delora("delora_default", r=4),
    _delora("delora_patterns_dropout_bias", without_remote_code(_FAMILIES), r=2, rank_pattern={"v": 4, "value": 4},
            lambda_pattern={"q": 3.0, "query": 3.0}, module_dropout=0.1, bias="all"),
]


_exchanged = interop_builder("DeloraConfig")


INTEROP = [
    _exchanged("delora-llama", "llama", r=4),
    _exchanged("delora-llama-patterns", "llama", r=2, delora_lambda=5, rank_pattern={"v_proj": 6},
               lambda_pattern={"down_proj": 0.5}, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("delora-bert-bias", "bert", r=4, bias="delora_only", **_BERT_TARGETS),
    _exchanged("delora-t5", "t5", r=4, target_modules=["q", "v", "wo"]),
    _exchanged("delora-convnet", "convnet", r=3, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "delora": FuzzSeed("DeloraConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

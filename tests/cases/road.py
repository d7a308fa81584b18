"""RoAd: the shared matrix (GPT-2 is left out: its Conv1D projections are not RoAd targets, in peft either) in its
three variants, and adapters exchanged with peft. The tiny models' layers are 32 or 64 wide, so ``group_size`` is
smaller than peft's default 64."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_road = linear_cases("RoadConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _road("road_1", group_size=8),
    _road("road_4", without_remote_code(_FAMILIES), variant="road_4", group_size=16),
]


_exchanged = interop_builder("RoadConfig")


INTEROP = [
    _exchanged("road-llama", "llama", group_size=8),
    _exchanged("road-llama-road2", "llama", variant="road_2", group_size=16, target_modules="all-linear"),
    _exchanged("road-bert-road4", "bert", variant="road_4", group_size=4, **_BERT_TARGETS),
    _exchanged("road-t5", "t5", group_size=32, target_modules=["q", "v", "wo"]),
    _exchanged("road-convnet", "convnet", variant="road_2", group_size=2, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "road": FuzzSeed("RoadConfig", dict(target_modules=["q_proj", "v_proj"], group_size=8, init_weights=False)),
}

"""RoAd: the shared matrix (GPT-2 is left out: its Conv1D projections are not RoAd targets, in peft either) in its
three variants, and adapters exchanged with peft. The tiny models' layers are 32 or 64 wide, so ``group_size`` is
smaller than peft's default 64."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, convnet_inputs
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


_road = linear_cases("RoadConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _road("road_1", group_size=8),
    _road("road_4", without_remote_code(_FAMILIES), variant="road_4", group_size=16),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "RoadConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("road-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", group_size=8),
    _exchanged("road-llama-road2", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", variant="road_2",
               group_size=16, target_modules="all-linear"),
    _exchanged("road-bert-road4", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               variant="road_4", group_size=4, **_BERT_TARGETS),
    _exchanged("road-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", group_size=32,
               target_modules=["q", "v", "wo"]),
    _exchanged("road-convnet", tiny_convnet, convnet_inputs, variant="road_2", group_size=2,
               target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "road": FuzzSeed("RoadConfig", dict(target_modules=["q_proj", "v_proj"], group_size=8, init_weights=False)),
}

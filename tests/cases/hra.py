"""HRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not HRA targets, in peft either) and
adapters exchanged with peft, Linear and Conv2d, with and without Gram-Schmidt."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, convnet_inputs
from tests.cases import without_remote_code
from tests.cases import LINEAR_FAMILIES as _FAMILIES, linear_cases
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_t5,
)


# init_weights=False: random, unpaired reflections (the default's pairs cancel, up to rounding)
_hra = linear_cases("HRAConfig", nonzero_kwargs=dict(init_weights=False), exact_identity=False)


MATRIX = [
    _hra("hra_default"),
    _hra("hra_r2_all_linear_bias", without_remote_code(_FAMILIES), r=2, target_modules="all-linear", bias="all"),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "HRAConfig", factory, make_inputs, {"init_weights": False, **kwargs})


INTEROP = [
    _exchanged("hra-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM"),
    _exchanged(
        "hra-llama-gs", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, apply_GS=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
    ),
    _exchanged(
        "hra-bert-odd-r-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=3,
        target_modules=["query", "value", "dense"], bias="hra_only",
    ),
    _exchanged("hra-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"]),
    _exchanged("hra-convnet", tiny_convnet, convnet_inputs, target_modules=["conv2d", "fc1", "fc2"], r=4),
    _exchanged("hra-convnet-gs", tiny_convnet, convnet_inputs, target_modules=["conv2d", "fc1"], r=4, apply_GS=True),
]

FUZZ_SEEDS = {
    "hra": FuzzSeed("HRAConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

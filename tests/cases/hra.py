"""HRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not HRA targets, in peft either) and
adapters exchanged with peft, Linear and Conv2d, with and without Gram-Schmidt."""

from __future__ import annotations

from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

# init_weights=False: random, unpaired reflections (the default's pairs cancel, up to rounding)
_hra = linear_cases("HRAConfig", nonzero_kwargs=dict(init_weights=False), exact_identity=False)


MATRIX = [
    _hra("hra_default"),
    _hra("hra_r2_all_linear_bias", without_remote_code(_FAMILIES), r=2, target_modules="all-linear", bias="all"),
]


_exchanged = interop_builder("HRAConfig", init_weights=False)


INTEROP = [
    _exchanged("hra-llama", "llama"),
    _exchanged("hra-llama-gs", "llama", r=4, apply_GS=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("hra-bert-odd-r-bias", "bert", r=3, target_modules=["query", "value", "dense"], bias="hra_only"),
    _exchanged("hra-t5", "t5", target_modules=["q", "v", "wo"]),
    _exchanged("hra-convnet", "convnet", target_modules=["conv2d", "fc1", "fc2"], r=4),
    _exchanged("hra-convnet-gs", "convnet", target_modules=["conv2d", "fc1"], r=4, apply_GS=True),
]

FUZZ_SEEDS = {
    "hra": FuzzSeed("HRAConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

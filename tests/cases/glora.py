"""GLoRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not GLoRA targets, in peft either) in the
default form and the vector / constant forms, and adapters exchanged with peft, including absent parts (peft's zero
placeholders) and layers with and without a bias."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_glora = linear_cases("GloraConfig", nonzero_kwargs=dict(init_weights=False))


# The tiny models' biases are zero, so the bias scale D gets no gradient there (Δb = b0 ⊙ D): the matrix leaves D and
# E out (config_D_E="none"); tests/test_glora.py and the interop cases cover them.
MATRIX = [
    _glora("glora_lora", r=2, config_D_E="none"),
    _glora("glora_vector", without_remote_code(_FAMILIES), config_A_B="vector", config_C="vector",
           config_D_E="none"),
]


_exchanged = interop_builder("GloraConfig")


INTEROP = [
    _exchanged("glora-llama", "llama", r=4),
    _exchanged("glora-llama-constant-none", "llama", config_A_B="constant", config_C="none",
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("glora-bert-vector", "bert", r=2, config_A_B="vector", config_C="vector", config_D_E="vector",
               **_BERT_TARGETS),
    # only the bias changes: A and B are peft's (out, in) zero placeholders in the file
    _exchanged("glora-bert-bias-only", "bert", r=2, config_A_B="none", **_BERT_TARGETS),
    _exchanged("glora-t5-constant", "t5", r=2, config_A_B="constant", target_modules=["q", "v", "wo"]),
    _exchanged("glora-convnet", "convnet", r=3, config_D_E="vector", bias="glora_only", target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "glora": FuzzSeed("GloraConfig", dict(target_modules=["q_proj", "v_proj"], r=2, init_weights=False)),
}

"""GLoRA: the shared matrix (GPT-2 is left out: its Conv1D projections are not GLoRA targets, in peft either) in the
default form and the vector / constant forms, and adapters exchanged with peft, including absent parts (peft's zero
placeholders) and layers with and without a bias."""

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


_glora = linear_cases("GloraConfig", nonzero_kwargs=dict(init_weights=False))


# The tiny models' biases are zero, so the bias scale D gets no gradient there (Δb = b0 ⊙ D): the matrix leaves D and
# E out (config_D_E="none"); tests/test_glora.py and the interop cases cover them.
MATRIX = [
    _glora("glora_lora", r=2, config_D_E="none"),
    _glora("glora_vector", without_remote_code(_FAMILIES), config_A_B="vector", config_C="vector",
           config_D_E="none"),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "GloraConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("glora-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("glora-llama-constant-none", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM",
               config_A_B="constant", config_C="none", target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("glora-bert-vector", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=2,
               config_A_B="vector", config_C="vector", config_D_E="vector", **_BERT_TARGETS),
    # only the bias changes: A and B are peft's (out, in) zero placeholders in the file
    _exchanged("glora-bert-bias-only", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=2,
               config_A_B="none", **_BERT_TARGETS),
    _exchanged("glora-t5-constant", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=2,
               config_A_B="constant", target_modules=["q", "v", "wo"]),
    _exchanged("glora-convnet", tiny_convnet, convnet_inputs, r=3, config_D_E="vector", bias="glora_only",
               target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "glora": FuzzSeed("GloraConfig", dict(target_modules=["q_proj", "v_proj"], r=2, init_weights=False)),
}

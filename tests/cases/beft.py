"""BEFT: the shared matrix on peft's default targets (the value projection; GPT-2 has no default and its Conv1D
projections are not BEFT targets, in peft either) and adapters exchanged with peft. Llama's and T5's projections
have no bias, so a non-zero BEFT adapter there cannot merge (refused, as in peft): those cases are not mergeable."""

from __future__ import annotations

from typing import Any

from tests.cases import ALL_FAMILIES, REMOTE_TARGETS, FuzzSeed, InteropCase, MatrixCase, convnet_inputs
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_t5,
)

_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")


def _beft(name: str, families: tuple[str, ...], mergeable: bool, **kwargs: Any) -> MatrixCase:
    return MatrixCase("BeftConfig", name, kwargs, nonzero_kwargs=dict(init_weights=False), families=families,
                      remote_kwargs=REMOTE_TARGETS, mergeable=mergeable)


MATRIX = [
    _beft("beft_default", tuple(f for f in _FAMILIES if f != "bert"), mergeable=False),
    # BERT's projections have biases: the one family where BEFT merges
    _beft("beft_bert_biased", ("bert",), mergeable=True, target_modules=["query", "value", "dense"]),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "BeftConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("beft-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM"),
    _exchanged("beft-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               target_modules=["query", "value", "dense"]),
    _exchanged("beft-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"]),
    _exchanged("beft-convnet", tiny_convnet, convnet_inputs, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "beft": FuzzSeed("BeftConfig", dict(target_modules=["q_proj", "v_proj"], init_weights=False)),
}

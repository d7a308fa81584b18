"""Trainable tokens in the shared matrix and exchanged with peft.

The default target is each model's input embedding (``get_input_embeddings()``), which every matrix family has; the
families cover the tied cases: GPT-2's head tied to ``wte``, T5's ``shared`` table read by the encoder, the decoder
and the head, mT5's ``shared`` read by both stacks beside an untied head, and untied Llama and BERT.
"""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, InteropCase, MatrixCase
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

_TOKENS = [7, 13, 47, 61]  # below every family's vocabulary, and all in the tests' seeded inputs

MATRIX = [
    MatrixCase("TrainableTokensConfig", "trainable_tokens", dict(token_indices=_TOKENS), families=ALL_FAMILIES),
]


def _case(name: str, factory, make_inputs, **kwargs) -> InteropCase:
    return InteropCase(name, "TrainableTokensConfig", factory, make_inputs, dict(token_indices=_TOKENS, **kwargs))


INTEROP = [
    _case("tokens-llama", tiny_llama, make_causal_lm_inputs),
    _case("tokens-gpt2-tied-head", tiny_gpt2, make_causal_lm_inputs),
    _case("tokens-t5-shared", tiny_t5, make_seq2seq_inputs),
    _case("tokens-bert-explicit-target", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs,
          target_modules=["word_embeddings"]),
]

FUZZ_SEEDS = {"trainable_tokens": FuzzSeed("TrainableTokensConfig", dict(token_indices=[1, 7, 9]))}

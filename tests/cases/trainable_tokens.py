"""Trainable tokens in the shared matrix and exchanged with peft.

The default target is each model's input embedding (``get_input_embeddings()``), which every matrix family has; the
families cover the tied cases: GPT-2's head tied to ``wte``, T5's ``shared`` table read by the encoder, the decoder
and the head, mT5's ``shared`` read by both stacks beside an untied head, and untied Llama and BERT.
"""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, MatrixCase, interop_builder

_TOKENS = [7, 13, 47, 61]  # below every family's vocabulary, and all in the tests' seeded inputs

MATRIX = [
    MatrixCase("TrainableTokensConfig", "trainable_tokens", dict(token_indices=_TOKENS), families=ALL_FAMILIES),
]


_case = interop_builder("TrainableTokensConfig", task_type=None, token_indices=_TOKENS)


INTEROP = [
    _case("tokens-llama", "llama"),
    _case("tokens-gpt2-tied-head", "gpt2"),
    _case("tokens-t5-shared", "t5"),
    _case("tokens-bert-explicit-target", "bert", target_modules=["word_embeddings"]),
]

FUZZ_SEEDS = {"trainable_tokens": FuzzSeed("TrainableTokensConfig", dict(token_indices=[1, 7, 9]))}

"""BEFT: the shared matrix on peft's default targets (the value projection; GPT-2 has no default and its Conv1D
projections are not BEFT targets, in peft either) and adapters exchanged with peft. Llama's and T5's projections
have no bias, so a non-zero BEFT adapter there cannot merge (refused, as in peft): those cases are not mergeable."""

from __future__ import annotations

from typing import Any

from tests.cases import ALL_FAMILIES, REMOTE_TARGETS, FuzzSeed, MatrixCase, interop_builder

_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")


def _beft(name: str, families: tuple[str, ...], mergeable: bool, **kwargs: Any) -> MatrixCase:
    return MatrixCase("BeftConfig", name, kwargs, nonzero_kwargs=dict(init_weights=False), families=families,
                      remote_kwargs=REMOTE_TARGETS, mergeable=mergeable)


MATRIX = [
    _beft("beft_default", tuple(f for f in _FAMILIES if f != "bert"), mergeable=False),
    # BERT's projections have biases: the one family where BEFT merges
    _beft("beft_bert_biased", ("bert",), mergeable=True, target_modules=["query", "value", "dense"]),
]


_exchanged = interop_builder("BeftConfig")


INTEROP = [
    _exchanged("beft-llama", "llama"),
    _exchanged("beft-bert", "bert", target_modules=["query", "value", "dense"]),
    _exchanged("beft-t5", "t5", target_modules=["q", "v", "wo"]),
    _exchanged("beft-convnet", "convnet", target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "beft": FuzzSeed("BeftConfig", dict(target_modules=["q_proj", "v_proj"], init_weights=False)),
}

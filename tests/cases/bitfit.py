"""BitFit in the shared matrix (a deltatune-only format: no peft parameter counts, no interop cases)."""

from __future__ import annotations

from typing import Any

from tests.cases import REMOTE_TARGETS, FuzzSeed, InteropCase, MatrixCase

# Llama, T5 and the remote-code model have no biases: BitFit adds trainable ones there, which run and save but cannot
# merge.
_NO_BIAS: dict[str, dict[str, Any]] = {
    "llama": dict(target_modules="all-linear"),
    "t5": dict(target_modules=["q", "v", "wo"]),
    "mt5": dict(target_modules=["q", "v", "wo"]),
    "remote_code": REMOTE_TARGETS,
}

MATRIX = [
    # every layer with a bias (the default for these model types), LayerNorms included
    MatrixCase("BitFitConfig", "bitfit", families=("bert", "gpt2"), in_peft=False),
    MatrixCase(
        "BitFitConfig", "bitfit_no_bias", _NO_BIAS.__getitem__, families=tuple(_NO_BIAS), in_peft=False, mergeable=False
    ),
]

INTEROP: list[InteropCase] = []  # peft has no BitFit

FUZZ_SEEDS = {"bitfit": FuzzSeed("BitFitConfig", dict(target_modules=["q_proj", "down_proj"]))}

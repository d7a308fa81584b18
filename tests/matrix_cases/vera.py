"""VeRA in the shared matrix."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase

# Targets of different shapes in one adapter, so every layer reads a different corner of the shared projections
# (sized to the largest input and output dims); GPT-2's are Conv1D.
_MIXED_SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(target_modules="all-linear"),
    "gpt2": dict(target_modules="all-linear"),
    "bert": dict(target_modules=["query", "value", "intermediate.dense", "output.dense"]),
    "t5": dict(target_modules=["q", "v", "wi", "wo"]),
    "mt5": dict(target_modules=["q", "v", "wi_0", "wi_1", "wo"]),
}


def _vera(name: str, kwargs: Any) -> MatrixCase:
    # init_weights=False: b = 1 and d ~ N(0, 1), a clearly non-zero delta (the default starts with b = 0)
    return MatrixCase("VeraConfig", name, kwargs, nonzero_kwargs=dict(init_weights=False))


CASES = [
    _vera("vera_default", dict(r=8)),
    _vera("vera_mixed_shapes", lambda family: dict(r=16, vera_dropout=0.1, **_MIXED_SHAPES[family])),
    _vera("vera_no_saved_projection", dict(r=8, save_projection=False, projection_prng_key=7)),
]

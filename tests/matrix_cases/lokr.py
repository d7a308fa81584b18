"""LoKr in the shared matrix (not on GPT-2, whose Conv1D projections peft's LoKr refuses; see test_loha_lokr)."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase
from tests.matrix_cases.loha import LINEAR_FAMILIES
from tests.matrix_cases.lora import _PATTERN_TARGETS


def _lokr(name: str, kwargs: Any = None) -> MatrixCase:
    return MatrixCase(
        "LoKrConfig", name, kwargs or {}, nonzero_kwargs=dict(init_weights=False), families=LINEAR_FAMILIES
    )


CASES = [
    _lokr("lokr"),  # r = 8: both Kronecker factors stored full at these sizes
    _lokr("lokr_decompose_both", dict(r=1, decompose_both=True, rank_dropout=0.2, rank_dropout_scale=True)),
    _lokr("lokr_factor_lycoris_init", dict(r=2, decompose_factor=2, init_weights="lycoris")),
    _lokr("lokr_patterns", _PATTERN_TARGETS.__getitem__),
]

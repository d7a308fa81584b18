"""LoHa in the shared matrix (not on GPT-2, whose Conv1D projections peft's LoHa refuses; see test_loha_lokr)."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import ALL_FAMILIES, MatrixCase
from tests.matrix_cases.lora import _PATTERN_TARGETS  # rank_pattern / alpha_pattern have the same names here

#: Families with nn.Linear projections (GPT-2's are transformers Conv1D).
LINEAR_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")


def _loha(name: str, kwargs: Any = None) -> MatrixCase:
    # Non-zero deltas come from the matrix's seeded perturbation: LoHa's all-random init (init_weights=False) makes
    # a Hadamard product of two small products, too small on BERT to tell apart from rounding.
    return MatrixCase("LoHaConfig", name, kwargs or {}, families=LINEAR_FAMILIES)


CASES = [
    _loha("loha"),
    _loha("loha_rank_dropout", dict(r=4, alpha=16, rank_dropout=0.2)),
    _loha("loha_all_linear", dict(target_modules="all-linear", r=2)),
    _loha("loha_patterns", _PATTERN_TARGETS.__getitem__),
]

"""LayerNorm tuning in the shared matrix."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase


def _targets(family: str) -> dict[str, Any]:
    # peft has no default norm targets for BERT (deltatune does); name them so the parameter counts compare.
    return dict(target_modules=["LayerNorm"]) if family == "bert" else {}


CASES = [MatrixCase("LNTuningConfig", "ln_tuning", _targets)]

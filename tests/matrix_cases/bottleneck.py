"""Bottleneck adapters in the shared matrix (a deltatune-only format, and nonlinear: never merged)."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase

# Pfeiffer placement: after the feed-forward output only.
_FFN_OUTPUT: dict[str, list[str]] = {
    "llama": ["down_proj"], "gpt2": ["mlp.c_proj"], "bert": [r".*layer\.\d+\.output\.dense"], "t5": ["wo"], "mt5": ["wo"],
}


def _pfeiffer(family: str) -> dict[str, Any]:
    targets = _FFN_OUTPUT[family]
    return dict(
        target_modules=targets[0] if family == "bert" else targets,  # BERT: a regex, to skip attention.output.dense
        bottleneck_size=4, non_linearity="tanh", scaling=0.5, adapter_dropout=0.1,
    )


CASES = [
    # Houlsby placement (the per-model-type default): after the attention output and the feed-forward output
    MatrixCase("BottleneckConfig", "bottleneck", dict(bottleneck_size=8), in_peft=False, mergeable=False),
    MatrixCase("BottleneckConfig", "bottleneck_pfeiffer", _pfeiffer, in_peft=False, mergeable=False),
]

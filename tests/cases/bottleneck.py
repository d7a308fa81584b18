"""Bottleneck adapters in the shared matrix (a deltatune-only format, so no interop cases; nonlinear: never merged)."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, MatrixCase, without_remote_code

# Pfeiffer placement: after the feed-forward output only.
_FFN_OUTPUT: dict[str, list[str]] = {
    "llama": ["down_proj"], "gpt2": ["mlp.c_proj"], "bert": [r".*layer\.\d+\.output\.dense"], "t5": ["wo"],
    "mt5": ["wo"],
}


def _pfeiffer(family: str) -> dict[str, Any]:
    targets = _FFN_OUTPUT[family]
    return dict(
        target_modules=targets[0] if family == "bert" else targets,  # BERT: a regex, to skip attention.output.dense
        bottleneck_size=4, non_linearity="tanh", scaling=0.5, adapter_dropout=0.1,
    )


MATRIX = [
    # Houlsby placement (the per-model-type default): after the attention output and the feed-forward output
    MatrixCase(
        "BottleneckConfig", "bottleneck", dict(bottleneck_size=8), remote_kwargs=dict(target_modules=["wo", "w2"]),
        in_peft=False, mergeable=False,
    ),
    MatrixCase(
        "BottleneckConfig", "bottleneck_pfeiffer", _pfeiffer, families=without_remote_code(), in_peft=False,
        mergeable=False,
    ),
]

INTEROP: list[InteropCase] = []  # peft has no bottleneck adapters

FUZZ_SEEDS = {
    "bottleneck": FuzzSeed("BottleneckConfig", dict(
        target_modules=["o_proj", "down_proj"], bottleneck_size=4, non_linearity="gelu", scaling=0.5
    )),
}

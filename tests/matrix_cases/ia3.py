"""IA3 in the shared matrix."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase

# Every linear layer adapted, with one feed-forward (input-scaled) layer per family, biased where the family has
# biases (GPT-2's Conv1D c_fc, BERT's intermediate.dense), so both vector sides meet biases under merging.
_EXPLICIT: dict[str, dict[str, Any]] = {
    "llama": dict(target_modules="all-linear", feedforward_modules=["down_proj"]),
    "gpt2": dict(target_modules="all-linear", feedforward_modules=["c_fc"]),
    "bert": dict(
        target_modules=["query", "value", "intermediate.dense", "output.dense"],
        feedforward_modules=["intermediate.dense"],
    ),
    "t5": dict(target_modules=["q", "k", "v", "o", "wi", "wo"], feedforward_modules=["wi"]),
    "mt5": dict(target_modules=["q", "v", "wi_0", "wi_1", "wo"], feedforward_modules=["wo"]),
}

# Non-zero adapters draw their vectors at random (init_ia3_weights=False) rather than perturbing ones: tiny BERT's
# logits barely move under vectors near one (its LayerNorms absorb most of a rescaling).
CASES = [
    # per-model-type default targets and feed-forward modules
    MatrixCase("IA3Config", "ia3_default", nonzero_kwargs=dict(init_ia3_weights=False)),
    MatrixCase("IA3Config", "ia3_explicit", _EXPLICIT.__getitem__, nonzero_kwargs=dict(init_ia3_weights=False)),
]

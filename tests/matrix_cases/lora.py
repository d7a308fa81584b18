"""LoRA and its variants in the shared matrix."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase

# rank/alpha patterns must name real modules of each family
_PATTERN_TARGETS: dict[str, dict[str, Any]] = {
    "llama": dict(
        target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*v_proj": 32}
    ),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], rank_pattern={"c_attn": 2}, alpha_pattern={r"mlp\.c_proj": 32}),
    "bert": dict(
        target_modules=["query", "value"], rank_pattern={"query": 2}, alpha_pattern={r"layer\.1\..*value": 32}
    ),
    "t5": dict(target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={r"decoder\..*\.v": 32}),
    "mt5": dict(target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={r"decoder\..*\.v": 32}),
}


def _lora(name: str, **kwargs: Any) -> MatrixCase:
    return MatrixCase("LoraConfig", name, kwargs, nonzero_kwargs=dict(init_lora_weights=False))


CASES = [
    _lora("default"),
    _lora("rslora", use_rslora=True, r=4, lora_alpha=16),
    _lora("dora", use_dora=True),
    _lora("gaussian", init_lora_weights="gaussian"),
    _lora("bias_all", bias="all"),
    _lora("all_linear", target_modules="all-linear"),
    MatrixCase("LoraConfig", "pissa", dict(init_lora_weights="pissa"), weight_init=True),
    MatrixCase("LoraConfig", "olora", dict(init_lora_weights="olora"), weight_init=True),
    MatrixCase("LoraConfig", "patterns", _PATTERN_TARGETS.__getitem__, nonzero_kwargs=dict(init_lora_weights=False)),
]

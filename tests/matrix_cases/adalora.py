"""AdaLoRA in the shared matrix."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import MatrixCase

# Two layers per family whose allocation was pruned by training (init_r=4), to ranks 1 and 2. (A layer pruned to rank
# 0 has empty tensors, which no gradient check can see; tests/test_adalora.py covers it.)
_PRUNED_LAYERS: dict[str, tuple[str, str]] = {
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"),
    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"),
    "bert": ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.v"),
    "mt5": ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.v"),
}


def _pruned(family: str) -> dict[str, Any]:
    one, two = _PRUNED_LAYERS[family]
    pattern = {f"{one}.lora_E": [False, True, False, False], f"{two}.lora_E": [True, False, False, True]}
    return dict(total_step=10, init_r=4, target_r=2, lora_alpha=32, rank_pattern=pattern)


CASES = [
    MatrixCase("AdaLoraConfig", "adalora", dict(total_step=10)),
    # peft builds a config's rank_pattern at full init_r and shrinks the layers only when loading a file; deltatune
    # builds them at the kept ranks, so counts differ (loading files is compared in tests/test_adalora.py)
    MatrixCase("AdaLoraConfig", "adalora_pruned", _pruned, in_peft=False),
]

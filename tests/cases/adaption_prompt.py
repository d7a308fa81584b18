"""Adaption prompts (LLaMA-Adapter): the shared matrix on the model types peft supports (Llama with grouped-query
attention, GPT-2's fused ``c_attn``), adapters exchanged with peft. Not mergeable (a gated attention over learned
tokens); mixed batches, caching and the math are in ``tests/test_adaption_prompt.py``."""

from __future__ import annotations

from tests.cases import FuzzSeed, MatrixCase, interop_builder

MATRIX = [
    MatrixCase("AdaptionPromptConfig", "adaption_prompt", dict(adapter_len=4, adapter_layers=1),
               families=("gpt2", "llama"), mergeable=False),
]

_exchanged = interop_builder("AdaptionPromptConfig")

INTEROP = [
    _exchanged("adaption-prompt-llama", "llama", adapter_len=4, adapter_layers=2),
    _exchanged("adaption-prompt-gpt2", "gpt2", adapter_len=3, adapter_layers=1),
]

FUZZ_SEEDS = {
    "adaption_prompt": FuzzSeed("AdaptionPromptConfig", dict(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1)),
}

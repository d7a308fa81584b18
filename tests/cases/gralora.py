"""GraLoRA: the shared matrix (plain and hybrid) and adapters exchanged with peft: k = 2 and 4, with and without the
hybrid LoRA, on Linear, GPT-2's Conv1D and T5, with ``bias="gralora_only"``."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code

# init_weights=False: Kaiming-uniform B, a clearly non-zero delta (the default starts with B = 0)
_gralora = linear_cases("GraloraConfig", families=ALL_FAMILIES, bert_kwargs={}, nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _gralora("gralora_default", r=8, alpha=16),
    _gralora("gralora_hybrid_k4", without_remote_code(), r=8, alpha=16, gralora_k=4, hybrid_r=2, gralora_dropout=0.1),
]


_exchanged = interop_builder("GraloraConfig", r=8, alpha=16)


INTEROP = [
    _exchanged("gralora-llama", "llama", target_modules="all-linear"),
    _exchanged("gralora-llama-hybrid-k4", "llama", gralora_k=4, hybrid_r=4,
               target_modules=["q_proj", "up_proj", "down_proj"]),
    _exchanged("gralora-gpt2", "gpt2", hybrid_r=2),
    _exchanged("gralora-bert-bias", "bert", bias="gralora_only", target_modules=["query", "value", "dense"]),
    _exchanged("gralora-t5", "t5", target_modules=["q", "v", "wo"]),
]

FUZZ_SEEDS = {
    "gralora": FuzzSeed("GraloraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, hybrid_r=2,
                                              init_weights=False)),
}

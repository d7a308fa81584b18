"""GraLoRA: the shared matrix (plain and hybrid) and adapters exchanged with peft: k = 2 and 4, with and without the
hybrid LoRA, on Linear, GPT-2's Conv1D and T5, with ``bias="gralora_only"``."""

from __future__ import annotations

from typing import Any

from tests.cases import ALL_FAMILIES, FuzzSeed, InteropCase, linear_cases, without_remote_code
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)


# init_weights=False: Kaiming-uniform B, a clearly non-zero delta (the default starts with B = 0)
_gralora = linear_cases("GraloraConfig", families=ALL_FAMILIES, bert_kwargs={}, nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _gralora("gralora_default", r=8, alpha=16),
    _gralora("gralora_hybrid_k4", without_remote_code(), r=8, alpha=16, gralora_k=4, hybrid_r=2, gralora_dropout=0.1),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "GraloraConfig", factory, make_inputs, dict(r=8, alpha=16, **kwargs))


INTEROP = [
    _exchanged("gralora-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", target_modules="all-linear"),
    _exchanged("gralora-llama-hybrid-k4", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", gralora_k=4,
               hybrid_r=4, target_modules=["q_proj", "up_proj", "down_proj"]),
    _exchanged("gralora-gpt2", tiny_gpt2, make_causal_lm_inputs, task_type="CAUSAL_LM", hybrid_r=2),
    _exchanged("gralora-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               bias="gralora_only", target_modules=["query", "value", "dense"]),
    _exchanged("gralora-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"]),
]

FUZZ_SEEDS = {
    "gralora": FuzzSeed("GraloraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, hybrid_r=2,
                                              init_weights=False)),
}

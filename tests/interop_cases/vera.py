"""VeRA exchanged with peft: llama, GPT-2 (Conv1D), BERT and T5, each with the projections saved and with them
regenerated from ``projection_prng_key`` (which only works if both libraries draw them identically), targets of
several shapes (every layer reads its own corner of the shared projections) and ``bias="vera_only"``."""

from __future__ import annotations

from typing import Any

from tests.interop_cases import InteropCase
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

_FAMILIES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("llama", tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM", target_modules="all-linear")),
    ("gpt2", tiny_gpt2, make_causal_lm_inputs, dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"])),
    (
        "bert",
        lambda: tiny_bert("seq_cls"),
        make_seq_cls_inputs,
        dict(task_type="SEQ_CLS", target_modules=["query", "value", "intermediate.dense"]),
    ),
    ("t5", tiny_t5, make_seq2seq_inputs, dict(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wi", "wo"])),
]

CASES = [
    InteropCase(
        f"vera-{family}-{'saved' if save else 'prng'}",
        "VeraConfig",
        factory,
        make_inputs,
        dict(r=8, save_projection=save, projection_prng_key=0 if save else 3, **kwargs),
    )
    for family, factory, make_inputs, kwargs in _FAMILIES
    for save in (True, False)
] + [
    InteropCase("vera-llama-defaults", "VeraConfig", tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM")),
    InteropCase(
        "vera-bert-bias-vera-only",
        "VeraConfig",
        lambda: tiny_bert("seq_cls"),
        make_seq_cls_inputs,
        dict(task_type="SEQ_CLS", r=4, bias="vera_only", d_initial=0.5),
    ),
]

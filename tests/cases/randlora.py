"""RandLoRA: the shared matrix and adapters exchanged with peft: bases saved and regenerated from the seed (which only
works if both libraries draw them bit for bit alike), dense, sparse and very sparse, on targets where the input or the
output is the smaller side (the update is transposed in one of them), GPT-2's Conv1D and ``bias="randlora_only"``."""

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


# init_weights=False: Λ ~ N(0, 1), a clearly non-zero delta (the default starts with Λ = 0)
_randlora = linear_cases("RandLoraConfig", families=ALL_FAMILIES, bert_kwargs={},
                         nonzero_kwargs=dict(init_weights=False))


# randlora_alpha: peft's 640 / r scales a random start so far that T5's unscaled attention amplifies float32 rounding
# beyond the matrix's tolerance (merged vs unmerged); a smaller alpha keeps the comparison meaningful
MATRIX = [
    _randlora("randlora_default", r=8, randlora_alpha=16),
    _randlora("randlora_sparse_prng", without_remote_code(), r=16, randlora_alpha=32, sparse=True,
              save_projection=False, projection_prng_key=3, randlora_dropout=0.1),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "RandLoraConfig", factory, make_inputs, dict(r=8, **kwargs))


INTEROP = [
    _exchanged("randlora-llama-saved", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM",
               target_modules="all-linear"),
    _exchanged("randlora-llama-prng", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM",
               target_modules=["q_proj", "up_proj", "down_proj"], save_projection=False, projection_prng_key=5),
    _exchanged("randlora-llama-very-sparse-prng", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM",
               very_sparse=True, save_projection=False, randlora_alpha=32),
    _exchanged("randlora-gpt2-sparse", tiny_gpt2, make_causal_lm_inputs, task_type="CAUSAL_LM",
               target_modules=["c_attn", "c_proj"], sparse=True),
    _exchanged("randlora-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               bias="randlora_only", target_modules=["query", "value", "dense"]),
    _exchanged("randlora-t5-prng", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM",
               target_modules=["q", "v", "wi", "wo"], save_projection=False, randlora_alpha=16),
]

FUZZ_SEEDS = {
    "randlora": FuzzSeed("RandLoraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False)),
}

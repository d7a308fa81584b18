"""PVeRA: the shared matrix (the fresh adapter is the base model; outside training the latent code is its mean, so
merging and cached generation are deterministic) and adapters exchanged with peft, with the projections saved and
regenerated from the seed, on Linear, GPT-2's Conv1D and T5, with ``bias="pvera_only"``."""

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


# init_weights=False: b = 1 and d ~ N(0, 1), a clearly non-zero delta (the default starts with b = 0)
_pvera = linear_cases("PveraConfig", families=ALL_FAMILIES, bert_kwargs={}, nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _pvera("pvera_default", r=8),
    _pvera("pvera_prng_dropout", without_remote_code(), r=4, save_projection=False, projection_prng_key=9,
           pvera_dropout=0.1, generator_seed=3),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "PveraConfig", factory, make_inputs, dict(r=8, **kwargs))


INTEROP = [
    _exchanged("pvera-llama-saved", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM",
               target_modules="all-linear"),
    _exchanged("pvera-llama-prng", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", save_projection=False,
               projection_prng_key=4, target_modules=["q_proj", "up_proj", "down_proj"]),
    _exchanged("pvera-gpt2", tiny_gpt2, make_causal_lm_inputs, task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"]),
    _exchanged("pvera-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               bias="pvera_only", d_initial=0.5, target_modules=["query", "value", "intermediate.dense"]),
    _exchanged("pvera-t5-prng", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", save_projection=False,
               target_modules=["q", "v", "wi", "wo"]),
]

FUZZ_SEEDS = {
    "pvera": FuzzSeed("PveraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False,
                                          generator_seed=1)),
}

"""Uni-LoRA: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft, with the assignment of
``θ_d`` regenerated from ``proj_seed`` by both libraries (numpy's generator), or saved with ``save_indices``."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS

# θ_d starts non-zero (U(-0.02, 0.02), as in peft, which refuses a zero bound): a bound of 1e-30 makes every product
# B A underflow to exactly zero in float32, so a fresh adapter is the base model; the non-zero variant draws N(0, 1)
_unilora = linear_cases("UniLoraConfig", families=ALL_FAMILIES, defaults=dict(init_theta_d_bound=1e-30),
                        nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _unilora("unilora_default", r=2, theta_d_length=64),
    _unilora("unilora_saved_indices_dropout", without_remote_code(ALL_FAMILIES), r=4, theta_d_length=500,
             proj_seed=7, save_indices=True, unilora_dropout=0.1, bias="all"),
]


_exchanged = interop_builder("UniLoraConfig")


INTEROP = [
    _exchanged("unilora-llama", "llama"),
    _exchanged("unilora-llama-seed-all-linear", "llama", r=3, theta_d_length=1000, proj_seed=123,
               target_modules="all-linear"),
    _exchanged("unilora-gpt2-indices", "gpt2", r=2, save_indices=True, target_modules=["c_attn", "c_fc"]),
    _exchanged("unilora-bert-bias", "bert", r=2, bias="unilora_only", **_BERT_TARGETS),
    _exchanged("unilora-t5", "t5", r=2, theta_d_length=32, target_modules=["q", "v", "wo"]),
]

FUZZ_SEEDS = {
    "unilora": FuzzSeed("UniLoraConfig", dict(target_modules=["q_proj", "v_proj"], r=2, init_weights=False)),
    "unilora_indices": FuzzSeed("UniLoraConfig", dict(target_modules=["q_proj"], r=2, save_indices=True)),
}

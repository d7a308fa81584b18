"""PVeRA: the shared matrix (the fresh adapter is the base model; outside training the latent code is its mean, so
merging and cached generation are deterministic) and adapters exchanged with peft, with the projections saved and
regenerated from the seed, on Linear, GPT-2's Conv1D and T5, with ``bias="pvera_only"``."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code

# init_weights=False: b = 1 and d ~ N(0, 1), a clearly non-zero delta (the default starts with b = 0)
_pvera = linear_cases("PveraConfig", families=ALL_FAMILIES, bert_kwargs={}, nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _pvera("pvera_default", r=8),
    _pvera("pvera_prng_dropout", without_remote_code(), r=4, save_projection=False, projection_prng_key=9,
           pvera_dropout=0.1, generator_seed=3),
]


_exchanged = interop_builder("PveraConfig", r=8)


INTEROP = [
    _exchanged("pvera-llama-saved", "llama", target_modules="all-linear"),
    _exchanged("pvera-llama-prng", "llama", save_projection=False, projection_prng_key=4,
               target_modules=["q_proj", "up_proj", "down_proj"]),
    _exchanged("pvera-gpt2", "gpt2", target_modules=["c_attn", "c_fc"]),
    _exchanged("pvera-bert-bias", "bert", bias="pvera_only", d_initial=0.5,
               target_modules=["query", "value", "intermediate.dense"]),
    _exchanged("pvera-t5-prng", "t5", save_projection=False, target_modules=["q", "v", "wi", "wo"]),
]

FUZZ_SEEDS = {
    "pvera": FuzzSeed("PveraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False,
                                          generator_seed=1)),
}

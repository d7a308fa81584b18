"""RandLoRA: the shared matrix and adapters exchanged with peft: bases saved and regenerated from the seed (which only
works if both libraries draw them bit for bit alike), dense, sparse and very sparse, on targets where the input or the
output is the smaller side (the update is transposed in one of them), GPT-2's Conv1D and ``bias="randlora_only"``."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code

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


_exchanged = interop_builder("RandLoraConfig", r=8)


INTEROP = [
    _exchanged("randlora-llama-saved", "llama", target_modules="all-linear"),
    _exchanged("randlora-llama-prng", "llama", target_modules=["q_proj", "up_proj", "down_proj"],
               save_projection=False, projection_prng_key=5),
    _exchanged("randlora-llama-very-sparse-prng", "llama", very_sparse=True, save_projection=False, randlora_alpha=32),
    _exchanged("randlora-gpt2-sparse", "gpt2", target_modules=["c_attn", "c_proj"], sparse=True),
    _exchanged("randlora-bert-bias", "bert", bias="randlora_only", target_modules=["query", "value", "dense"]),
    _exchanged("randlora-t5-prng", "t5", target_modules=["q", "v", "wi", "wo"], save_projection=False,
               randlora_alpha=16),
]

FUZZ_SEEDS = {
    "randlora": FuzzSeed("RandLoraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False)),
}

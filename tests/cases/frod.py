"""FRoD: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft, with each category's basis
and sparse positions saved (the default) or regenerated from the base weights and the seed."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS

# W' = U diag(λ) Vᵀ rebuilds the base weight only up to the rounding of the factorization, so a fresh adapter is the
# base model up to rounding (exact_identity=False); init_weights=False draws S and perturbs λ, as in peft
_frod = linear_cases("FrodConfig", families=ALL_FAMILIES, defaults=dict(progressbar=False), exact_identity=False,
                     nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _frod("frod_default", sparse_rate=0.05),
    _frod("frod_regenerated_dropout", without_remote_code(ALL_FAMILIES), sparse_rate=0.2, projection_prng_key=7,
          save_projection=False, frod_dropout=0.1, regularization_alpha=0.1, bias="all"),
]


_exchanged = interop_builder("FrodConfig", progressbar=False)


INTEROP = [
    _exchanged("frod-llama", "llama"),
    _exchanged("frod-llama-all-linear-seed", "llama", target_modules="all-linear", sparse_rate=0.1,
               projection_prng_key=5, regularization_alpha=0.01),
    _exchanged("frod-gpt2-regenerated", "gpt2", sparse_rate=0.05, save_projection=False,
               target_modules=["c_attn", "c_fc", "c_proj"]),
    _exchanged("frod-bert-bias", "bert", sparse_rate=0.02, bias="frod_only", **_BERT_TARGETS),
    _exchanged("frod-t5", "t5", sparse_rate=0.05, target_modules=["q", "v", "wo"]),
]

FUZZ_SEEDS = {
    "frod": FuzzSeed("FrodConfig", dict(target_modules=["q_proj", "v_proj"], sparse_rate=0.1, init_weights=False,
                                        progressbar=False)),
    "frod_regenerated": FuzzSeed("FrodConfig", dict(target_modules=["q_proj"], save_projection=False,
                                                    progressbar=False)),
}

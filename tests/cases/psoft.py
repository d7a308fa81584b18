"""PSOFT: the shared matrix (GPT-2 is left out: its Conv1D projections are not PSOFT targets, in peft either) and
adapters exchanged with peft: both SVD backends (the low-rank one seeded), both factor inits, the Cayley-Neumann
series and a free ``R`` without scales. The frozen factors are not in the file: each library rebuilds them."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_psoft = linear_cases("PsoftConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _psoft("psoft_default", r=4),
    _psoft("psoft_lowrank_pissa_neumann", without_remote_code(_FAMILIES), r=4, psoft_alpha=8,
           ab_svd_init="pissa_init", psoft_svd="lowrank", random_seed=3, use_cayley_neumann=True,
           cayley_neumann_eps=0.9, psoft_dropout=0.1),
]


_exchanged = interop_builder("PsoftConfig")


INTEROP = [
    _exchanged("psoft-llama", "llama", r=4),
    _exchanged("psoft-llama-lowrank", "llama", r=4, psoft_alpha=6, psoft_svd="lowrank", psoft_svd_lowrank_niter=3,
               random_seed=7, ab_svd_init="pissa_init", target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("psoft-llama-neumann", "llama", r=4, use_cayley_neumann=True, num_cayley_neumann_terms=4,
               cayley_neumann_eps=0.5),
    _exchanged("psoft-llama-free", "llama", r=3, psoft_orth=False, psoft_mag_a=False, psoft_mag_b=False),
    _exchanged("psoft-bert", "bert", r=4, psoft_mag_a=False, **_BERT_TARGETS),
    _exchanged("psoft-t5", "t5", r=4, target_modules=["q", "v", "wo"]),
    _exchanged("psoft-convnet", "convnet", r=3, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "psoft": FuzzSeed("PsoftConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

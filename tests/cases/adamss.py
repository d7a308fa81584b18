"""AdaMSS: the shared matrix (GPT-2 is left out: its Conv1D projections are not AdaMSS targets, in peft either) and
adapters exchanged with peft, with and without biases, fixed and dynamic subspace ranks. The subspaces are not in the
file: each library rebuilds them from the base weight (seeded SVD, seeded KMeans)."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_adamss = linear_cases("AdamssConfig")  # no nonzero_kwargs: the matrix perturbs the trained factors


MATRIX = [
    _adamss("adamss_default", r=8, num_subspaces=3, subspace_rank=2),
    _adamss("adamss_dynamic_rank", without_remote_code(_FAMILIES), r=6, num_subspaces=2, subspace_rank=3,
            use_dynamic_rank=True, svd_threshold=0.2, random_seed=5),
]


_exchanged = interop_builder("AdamssConfig")


INTEROP = [
    _exchanged("adamss-llama", "llama", r=8, num_subspaces=3, subspace_rank=2),
    _exchanged("adamss-llama-dynamic", "llama", r=6, num_subspaces=2, subspace_rank=3, use_dynamic_rank=True,
               random_seed=9, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("adamss-bert-bias", "bert", r=8, num_subspaces=4, **_BERT_TARGETS),
    _exchanged("adamss-t5", "t5", r=8, num_subspaces=3, target_modules=["q", "v", "wo"]),
    _exchanged("adamss-convnet", "convnet", r=5, num_subspaces=2, subspace_rank=2, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "adamss": FuzzSeed("AdamssConfig", dict(target_modules=["q_proj", "v_proj"], r=8, num_subspaces=3,
                                            init_weights=None)),
}

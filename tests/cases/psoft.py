"""PSOFT: the shared matrix (GPT-2 is left out: its Conv1D projections are not PSOFT targets, in peft either) and
adapters exchanged with peft: both SVD backends (the low-rank one seeded), both factor inits, the Cayley-Neumann
series and a free ``R`` without scales. The frozen factors are not in the file: each library rebuilds them."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, InteropCase, convnet_inputs
from tests.cases import without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS, LINEAR_FAMILIES as _FAMILIES, linear_cases
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_t5,
)


_psoft = linear_cases("PsoftConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _psoft("psoft_default", r=4),
    _psoft("psoft_lowrank_pissa_neumann", without_remote_code(_FAMILIES), r=4, psoft_alpha=8,
           ab_svd_init="pissa_init", psoft_svd="lowrank", random_seed=3, use_cayley_neumann=True,
           cayley_neumann_eps=0.9, psoft_dropout=0.1),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "PsoftConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("psoft-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("psoft-llama-lowrank", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, psoft_alpha=6,
               psoft_svd="lowrank", psoft_svd_lowrank_niter=3, random_seed=7, ab_svd_init="pissa_init",
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("psoft-llama-neumann", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4,
               use_cayley_neumann=True, num_cayley_neumann_terms=4, cayley_neumann_eps=0.5),
    _exchanged("psoft-llama-free", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=3, psoft_orth=False,
               psoft_mag_a=False, psoft_mag_b=False),
    _exchanged("psoft-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=4,
               psoft_mag_a=False, **_BERT_TARGETS),
    _exchanged("psoft-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4,
               target_modules=["q", "v", "wo"]),
    _exchanged("psoft-convnet", tiny_convnet, convnet_inputs, r=3, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "psoft": FuzzSeed("PsoftConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

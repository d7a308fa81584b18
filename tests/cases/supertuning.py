"""Super-Tuning: the shared matrix (GPT-2 is left out: its Conv1D projections are not Super-Tuning targets, in peft
either) and adapters exchanged with peft: sparse only, with the Supra LoRA, bottom-magnitude entries, and files
without their indices (recomputed from the base weight on both sides)."""

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


_super = linear_cases("SupertuningConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _super("supertuning_default", sparsity=0.9),
    _super("supertuning_supra_bottom", without_remote_code(_FAMILIES), sparsity=0.95, select_top=False, r=2,
           lora_dropout=0.1, save_precomputed_indices=False),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "SupertuningConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("supertuning-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", sparsity=0.9),
    _exchanged("supertuning-llama-supra", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", sparsity=0.95,
               r=4, lora_alpha=3, select_top=False, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("supertuning-llama-no-indices", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM",
               sparsity=0.8, r=2, save_precomputed_indices=False),
    _exchanged("supertuning-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS",
               sparsity=0.9, **_BERT_TARGETS),
    _exchanged("supertuning-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", sparsity=0.9,
               target_modules=["q", "v", "wo"]),
    _exchanged("supertuning-convnet", tiny_convnet, convnet_inputs, sparsity=0.9, r=2,
               target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "supertuning": FuzzSeed("SupertuningConfig", dict(target_modules=["q_proj", "v_proj"], sparsity=0.9, r=2,
                                                      init_weights=False)),
}

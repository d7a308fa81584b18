"""Super-Tuning: the shared matrix (GPT-2 is left out: its Conv1D projections are not Super-Tuning targets, in peft
either) and adapters exchanged with peft: sparse only, with the Supra LoRA, bottom-magnitude entries, and files
without their indices (recomputed from the base weight on both sides)."""

from __future__ import annotations

from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import FuzzSeed, interop_builder, linear_cases, without_remote_code

_super = linear_cases("SupertuningConfig", nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _super("supertuning_default", sparsity=0.9),
    _super("supertuning_supra_bottom", without_remote_code(_FAMILIES), sparsity=0.95, select_top=False, r=2,
           lora_dropout=0.1, save_precomputed_indices=False),
]


_exchanged = interop_builder("SupertuningConfig")


INTEROP = [
    _exchanged("supertuning-llama", "llama", sparsity=0.9),
    _exchanged("supertuning-llama-supra", "llama", sparsity=0.95, r=4, lora_alpha=3, select_top=False,
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("supertuning-llama-no-indices", "llama", sparsity=0.8, r=2, save_precomputed_indices=False),
    _exchanged("supertuning-bert", "bert", sparsity=0.9, **_BERT_TARGETS),
    _exchanged("supertuning-t5", "t5", sparsity=0.9, target_modules=["q", "v", "wo"]),
    _exchanged("supertuning-convnet", "convnet", sparsity=0.9, r=2, target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "supertuning": FuzzSeed("SupertuningConfig", dict(target_modules=["q_proj", "v_proj"], sparsity=0.9, r=2,
                                                      init_weights=False)),
}

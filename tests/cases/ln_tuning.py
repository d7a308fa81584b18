"""LayerNorm tuning: the shared matrix, and adapters exchanged with peft."""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, MatrixCase, interop_builder
from tests.models import REMOTE_CODE_NORMS


def _targets(family: str) -> dict[str, Any]:
    # peft has no default norm targets for BERT (deltatune does); name them so the parameter counts compare.
    return dict(target_modules=["LayerNorm"]) if family == "bert" else {}


MATRIX = [
    MatrixCase("LNTuningConfig", "ln_tuning", _targets, remote_kwargs=dict(target_modules=list(REMOTE_CODE_NORMS))),
]

_exchanged = interop_builder("LNTuningConfig")

INTEROP = [
    # per-model-type default targets: LlamaRMSNorm, GPT-2's nn.LayerNorm ln_*, T5LayerNorm
    _exchanged("ln-llama", "llama"),
    _exchanged("ln-gpt2", "gpt2"),
    _exchanged("ln-t5", "t5"),
    # BERT's LayerNorms with the classifier head trained in full (the task's default modules_to_save)
    _exchanged("ln-bert-seq-cls", "bert", target_modules=["LayerNorm"]),
    _exchanged("ln-llama-regex-exclude-modules-to-save", "llama", target_modules=r".*layers\.\d+\..*layernorm",
               exclude_modules=["layers.0.post_attention_layernorm"], modules_to_save=["lm_head"]),
]

FUZZ_SEEDS = {"ln_tuning": FuzzSeed("LNTuningConfig", dict(target_modules=["input_layernorm", "norm"]))}

"""LoHa: the shared matrix, and adapters exchanged with peft (Linear on llama, bert and t5; Conv1d/Conv2d, flattened
and with the effective conv form).

GPT-2 is absent from both on purpose: peft's LoHa refuses transformers' Conv1D, and so does deltatune
(test_loha_lokr).
"""

from __future__ import annotations

from typing import Any

from tests.cases import (
    ALL_FAMILIES,
    REMOTE_TARGETS,
    FuzzSeed,
    MatrixCase,
    interop_builder,
    without_remote_code,
)
from tests.cases.lora import _PATTERN_TARGETS  # rank_pattern / alpha_pattern have the same names here

#: Families with nn.Linear projections (GPT-2's are transformers Conv1D).
LINEAR_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")


def _loha(name: str, kwargs: Any = None, families: tuple[str, ...] = LINEAR_FAMILIES) -> MatrixCase:
    # Non-zero deltas come from the matrix's seeded perturbation: LoHa's all-random init (init_weights=False) makes
    # a Hadamard product of two small products, too small on BERT to tell apart from rounding.
    return MatrixCase("LoHaConfig", name, kwargs or {}, families=families, remote_kwargs=REMOTE_TARGETS)


MATRIX = [
    _loha("loha"),
    _loha("loha_rank_dropout", dict(r=4, alpha=16, rank_dropout=0.2), without_remote_code(LINEAR_FAMILIES)),
    _loha("loha_all_linear", dict(target_modules="all-linear", r=2), without_remote_code(LINEAR_FAMILIES)),
    _loha("loha_patterns", _PATTERN_TARGETS.__getitem__, without_remote_code(LINEAR_FAMILIES)),
]

_exchanged = interop_builder("LoHaConfig")

INTEROP = [
    _exchanged("loha-llama", "llama"),
    _exchanged("loha-bert-seq-cls", "bert"),
    _exchanged("loha-t5", "t5", target_modules=["q", "v", "wo"], r=4, alpha=8, rank_dropout=0.1),
    _exchanged("loha-llama-patterns", "llama", target_modules="all-linear", rank_pattern={"down_proj": 2},
               alpha_pattern={r"layers\.1\..*": 4}),
    _exchanged("loha-convnet-conv-and-linear", "convnet", target_modules=["conv2d", "conv1d", "fc1", "fc2"], r=2),
    _exchanged("loha-convnet-effective-conv", "convnet", target_modules=["conv2d", "conv1d"], r=2, alpha=32,
               use_effective_conv2d=True),
]

FUZZ_SEEDS = {
    "loha": FuzzSeed("LoHaConfig", dict(
        target_modules=["q_proj", "v_proj"], r=2, alpha=4, init_weights=False, rank_pattern={"v_proj": 3},
        alpha_pattern={"v_proj": 2.0},
    )),
}

"""LoKr: the shared matrix, and adapters exchanged with peft in every storage form of the two Kronecker factors on
Linear and Conv1d/Conv2d.

At the tiny models' sizes (dims 16..64, split near their square roots) r = 8 stores both factors full; r = 1 with
``decompose_both`` stores both as low-rank products; ``decompose_factor`` changes the split. GPT-2 is absent from both
on purpose: peft's LoKr refuses transformers' Conv1D, and so does deltatune (test_loha_lokr).
"""

from __future__ import annotations

from typing import Any

from tests.cases import REMOTE_TARGETS, FuzzSeed, MatrixCase, interop_builder, without_remote_code
from tests.cases.loha import LINEAR_FAMILIES
from tests.cases.lora import _PATTERN_TARGETS


def _lokr(name: str, kwargs: Any = None, families: tuple[str, ...] = LINEAR_FAMILIES) -> MatrixCase:
    return MatrixCase(
        "LoKrConfig", name, kwargs or {}, nonzero_kwargs=dict(init_weights=False), families=families,
        remote_kwargs=REMOTE_TARGETS,
    )


_MATH_ONLY = without_remote_code(LINEAR_FAMILIES)

MATRIX = [
    _lokr("lokr"),  # r = 8: both Kronecker factors stored full at these sizes
    _lokr("lokr_decompose_both", dict(r=1, decompose_both=True, rank_dropout=0.2, rank_dropout_scale=True), _MATH_ONLY),
    _lokr("lokr_factor_lycoris_init", dict(r=2, decompose_factor=2, init_weights="lycoris"), _MATH_ONLY),
    _lokr("lokr_patterns", _PATTERN_TARGETS.__getitem__, _MATH_ONLY),
]

_exchanged = interop_builder("LoKrConfig")

INTEROP = [
    _exchanged("lokr-llama", "llama"),
    _exchanged("lokr-llama-decompose-both", "llama", r=1, decompose_both=True, init_weights="lycoris"),
    _exchanged("lokr-llama-factor-patterns", "llama", target_modules="all-linear", r=2, decompose_factor=4,
               rank_pattern={"down_proj": 8}, alpha_pattern={r"layers\.1\..*": 4}),
    _exchanged("lokr-bert-seq-cls", "bert"),
    _exchanged("lokr-t5", "t5", target_modules=["q", "v", "wo"], r=2, rank_dropout_scale=True),
    # r = 2: full W2 on both convs (for the Conv1d a 3-D W2, whose Kronecker layout differs from the 4-D one)
    _exchanged("lokr-convnet-full-factors", "convnet", target_modules=["conv2d", "conv1d", "fc1", "fc2"], r=2),
    # r = 1: W2 low-rank with the kernel flattened into its input dim
    _exchanged("lokr-convnet-low-rank-w2", "convnet", target_modules=["conv2d", "conv1d"], r=1, decompose_both=True),
    # r = 1 with the effective form: W2 from the core lokr_t2. Conv2d only: peft 0.21.2 fails on the Conv1d case
    # (torch.kron on the core's (.., k, 1) result); deltatune computes it (test_loha_lokr checks it by hand).
    _exchanged("lokr-convnet-effective-conv2d", "convnet", target_modules=["conv2d"], r=1, use_effective_conv2d=True),
]

FUZZ_SEEDS = {
    "lokr": FuzzSeed("LoKrConfig", dict(
        target_modules=["q_proj", "down_proj"], r=1, alpha=2, decompose_both=True, init_weights=False,
    )),
}

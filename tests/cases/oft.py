"""OFT and its variants: the shared matrix (GPT-2 is left out: its Conv1D projections are not OFT targets, in peft
either), and adapters exchanged with peft.

The convnet's 3×3 ``conv2d`` is not among the interop cases: peft 0.21.2's unmerged forward on kernels above 1×1 is
not OFT's math (see ``deltatune.methods.oft``); ``tests/test_oft.py`` compares it with peft's merged model instead.
The 1×1 convolution below is where peft's unmerged forward and the merged kernel agree.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.cases import LINEAR_FAMILIES as _FAMILIES
from tests.cases import (
    FuzzSeed,
    convnet_inputs,
    interop_builder,
    linear_cases,
    without_remote_code,
)
from tests.models import tiny_convnet

_oft = linear_cases("OFTConfig", nonzero_kwargs=dict(init_weights=False))


_MATH_ONLY = without_remote_code(_FAMILIES)

MATRIX = [
    _oft("oft_default"),
    _oft("oft_r_dropout", _MATH_ONLY, r=4, oft_block_size=0, module_dropout=0.5),
    _oft("oft_exact_shared", _MATH_ONLY, oft_block_size=8, use_cayley_neumann=False, block_share=True),
    _oft("oft_coft", _MATH_ONLY, oft_block_size=8, coft=True, eps=0.5),
    _oft("oft_all_linear_bias", _MATH_ONLY, oft_block_size=16, target_modules="all-linear", bias="all"),
]


def convnet_1x1() -> nn.Module:
    """The tiny convnet with a pointwise (1×1, stride 2) ``conv2d``."""
    model = tiny_convnet()
    torch.manual_seed(1)
    model.conv2d = nn.Conv2d(3, 8, kernel_size=1, stride=2)
    return model.eval()


_exchanged = interop_builder("OFTConfig")


INTEROP = [
    _exchanged("oft-llama", "llama"),
    _exchanged("oft-llama-exact-cayley-shared", "llama", target_modules=["q_proj", "v_proj", "down_proj"],
               oft_block_size=8, use_cayley_neumann=False, block_share=True),
    # 6 divides neither 32 nor 64: both libraries move it to the nearest divisor, 4
    _exchanged("oft-llama-adjusted-block-size", "llama", target_modules=["q_proj", "down_proj"], oft_block_size=6),
    _exchanged("oft-llama-coft-r", "llama", r=4, oft_block_size=0, coft=True, eps=0.5, num_cayley_neumann_terms=7),
    _exchanged("oft-llama-embedding", "llama", target_modules=["embed_tokens", "q_proj"], oft_block_size=8),
    _exchanged("oft-bert-bias-oft-only", "bert", target_modules=["query", "value", "dense"], bias="oft_only",
               oft_block_size=16),
    _exchanged("oft-t5", "t5", target_modules=["q", "v", "wo"], oft_block_size=8),
    _exchanged("oft-convnet-linear-embedding", "convnet", target_modules=["fc1", "fc2", "embed"], oft_block_size=4,
               extra_ours={"base_model.model.embed.base_layer.weight"}),
    _exchanged("oft-convnet-conv2d-1x1", (convnet_1x1, convnet_inputs), target_modules=["conv2d"], oft_block_size=3),
]

FUZZ_SEEDS = {
    "oft": FuzzSeed("OFTConfig", dict(target_modules=["q_proj", "v_proj"], r=0, oft_block_size=8, init_weights=False)),
}

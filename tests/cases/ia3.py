"""IA3: the shared matrix, and adapters exchanged with peft (default targets per model type, Linear and Conv1D on both
vector sides, regex forms, Conv2d (grouped too) and Conv3d)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.cases import FuzzSeed, MatrixCase, interop_builder, without_remote_code
from tests.models import DEFAULT_SEED, REMOTE_CODE_LINEAR

# Every linear layer adapted, with one feed-forward (input-scaled) layer per family, biased where the family has
# biases (GPT-2's Conv1D c_fc, BERT's intermediate.dense), so both vector sides meet biases under merging.
_EXPLICIT: dict[str, dict[str, Any]] = {
    "llama": dict(target_modules="all-linear", feedforward_modules=["down_proj"]),
    "gpt2": dict(target_modules="all-linear", feedforward_modules=["c_fc"]),
    "bert": dict(
        target_modules=["query", "value", "intermediate.dense", "output.dense"],
        feedforward_modules=["intermediate.dense"],
    ),
    "t5": dict(target_modules=["q", "k", "v", "o", "wi", "wo"], feedforward_modules=["wi"]),
    "mt5": dict(target_modules=["q", "v", "wi_0", "wi_1", "wo"], feedforward_modules=["wo"]),
}

# Non-zero adapters draw their vectors at random (init_ia3_weights=False) rather than perturbing ones: tiny BERT's
# logits barely move under vectors near one (its LayerNorms absorb most of a rescaling).
MATRIX = [
    # per-model-type default targets and feed-forward modules
    MatrixCase(
        "IA3Config", "ia3_default", nonzero_kwargs=dict(init_ia3_weights=False),
        remote_kwargs=dict(target_modules=list(REMOTE_CODE_LINEAR), feedforward_modules=["w2"]),
    ),
    MatrixCase(
        "IA3Config", "ia3_explicit", _EXPLICIT.__getitem__, nonzero_kwargs=dict(init_ia3_weights=False),
        families=without_remote_code(),
    ),
]


class TinyVolNet(nn.Module):
    """A Conv3d, a grouped Conv2d and a Linear head: IA3 layer types ``tiny_convnet`` lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 2, D, H, W)
        h = torch.relu(self.conv3d(x))  # (B, 4, D, H, W)
        h = torch.relu(self.grouped(h.mean(2)))  # (B, 6, H, W)
        return self.head(h.mean((2, 3)))  # (B, 3)


def tiny_volnet(seed: int = DEFAULT_SEED) -> TinyVolNet:
    torch.manual_seed(seed)
    return TinyVolNet().eval()


def volnet_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))}


_ia3 = interop_builder("IA3Config")


INTEROP = [
    _ia3("ia3-llama-defaults", "llama"),
    _ia3("ia3-gpt2-conv1d-defaults", "gpt2"),
    # a biased Conv1D on the input side
    _ia3("ia3-gpt2-conv1d-feedforward-c-fc", "gpt2", target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]),
    _ia3("ia3-bert-seq-cls-defaults", "bert"),
    _ia3("ia3-t5-defaults", "t5"),
    _ia3("ia3-mt5-defaults", "mt5"),
    _ia3("ia3-llama-regex", "llama", target_modules=r".*layers\.1\..*(k_proj|v_proj|up_proj)",
         feedforward_modules=r".*up_proj"),
    _ia3("ia3-convnet-linear-feedforward", "convnet", target_modules=["conv2d", "fc1", "fc2"],
         feedforward_modules=["fc2"]),
    _ia3("ia3-convnet-conv2d-feedforward", "convnet", target_modules=["conv2d", "fc1"], feedforward_modules=["conv2d"]),
    _ia3("ia3-volnet-grouped-conv-feedforward", (tiny_volnet, volnet_inputs),
         target_modules=["conv3d", "grouped", "head"], feedforward_modules=["grouped"]),
    _ia3("ia3-volnet-conv3d-feedforward", (tiny_volnet, volnet_inputs), target_modules=["conv3d", "grouped"],
         feedforward_modules=["conv3d"]),
]

FUZZ_SEEDS = {
    "ia3": FuzzSeed("IA3Config", dict(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False,
    )),
}

"""LoRA and its variants: the shared matrix, and adapters exchanged with peft."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.cases import (
    ALL_FAMILIES,
    REMOTE_TARGETS,
    FuzzSeed,
    MatrixCase,
    interop_builder,
    without_remote_code,
)
from tests.models import make_causal_lm_inputs

# rank/alpha patterns must name real modules of each family
_PATTERN_TARGETS: dict[str, dict[str, Any]] = {
    "llama": dict(
        target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*v_proj": 32}
    ),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], rank_pattern={"c_attn": 2}, alpha_pattern={r"mlp\.c_proj": 32}),
    "bert": dict(
        target_modules=["query", "value"], rank_pattern={"query": 2}, alpha_pattern={r"layer\.1\..*value": 32}
    ),
    "t5": dict(target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={r"decoder\..*\.v": 32}),
    "mt5": dict(target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={r"decoder\..*\.v": 32}),
    "remote_code": dict(
        target_modules=["wqkv", "wo"], rank_pattern={"wqkv": 2}, alpha_pattern={r"layers\.1\..*wo": 32}
    ),
}


def _lora(name: str, families: tuple[str, ...] = ALL_FAMILIES, **kwargs: Any) -> MatrixCase:
    return MatrixCase(
        "LoraConfig", name, kwargs, nonzero_kwargs=dict(init_lora_weights=False), families=families,
        remote_kwargs=REMOTE_TARGETS,
    )


_MATH_ONLY = without_remote_code()


MATRIX = [
    _lora("default"),
    _lora("rslora", _MATH_ONLY, use_rslora=True, r=4, lora_alpha=16),
    _lora("dora", use_dora=True),
    _lora("gaussian", _MATH_ONLY, init_lora_weights="gaussian"),
    _lora("bias_all", _MATH_ONLY, bias="all"),
    # lora_bias merges into the base bias: the families whose targets have one (GPT-2's Conv1D, BERT's Linear)
    _lora("lora_bias", ("gpt2", "bert"), lora_bias=True),
    _lora("all_linear", target_modules="all-linear"),
    MatrixCase("LoraConfig", "pissa", dict(init_lora_weights="pissa"), weight_init=True, families=_MATH_ONLY),
    MatrixCase("LoraConfig", "olora", dict(init_lora_weights="olora"), weight_init=True, families=_MATH_ONLY),
    MatrixCase("LoraConfig", "patterns", _PATTERN_TARGETS.__getitem__, nonzero_kwargs=dict(init_lora_weights=False)),
    # LoRA on nn.Parameters: a 2-D weight (the MoE expert stacks are in INTEROP and tests/test_lora_moe.py)
    _lora("target_parameters", ("llama",), target_modules=["q_proj"], target_parameters=["mlp.up_proj.weight"]),
]


def _tiny_moe(kind: str) -> nn.Module:
    """A two-layer MoE causal LM with 4 experts per layer, each projection a fused 3-D expert tensor: Mixtral and
    Qwen3-MoE store ``(experts, out, in)``, GPT-OSS ``(experts, in, out)`` (``is_transposed``) with expert biases."""
    import transformers as tr

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, num_experts_per_tok=2)
    config = {
        "mixtral": lambda: (tr.MixtralForCausalLM, tr.MixtralConfig(num_local_experts=4, **common)),
        "qwen3_moe": lambda: (tr.Qwen3MoeForCausalLM, tr.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=8,
                                                                          **common)),
        "gpt_oss": lambda: (tr.GptOssForCausalLM, tr.GptOssConfig(num_local_experts=4, layer_types=["full_attention"] * 2,
                                                                  **common)),
    }[kind]
    cls, cfg = config()
    torch.manual_seed(0)
    return cls(cfg).eval()


def tiny_mixtral() -> nn.Module:
    return _tiny_moe("mixtral")


def tiny_qwen3_moe() -> nn.Module:
    return _tiny_moe("qwen3_moe")


def tiny_gpt_oss() -> nn.Module:
    return _tiny_moe("gpt_oss")


MOE_FACTORIES = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


class GroupedConvNet(nn.Module):
    """``x (B, 4, 6, 6)`` -> grouped ``conv2d`` (groups=2) -> ReLU -> grouped ``conv1d`` over the flattened pixels
    (groups=4) -> mean -> ``head`` -> ``(B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1, groups=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2d(x)).flatten(2)  # (B, 8, 36)
        return self.head(self.conv1d(hidden).mean(dim=2))


class AttentionNet(nn.Module):
    """``x (B, L, 8)`` -> ``nn.MultiheadAttention`` self-attention (``batch_first`` as given; the default layout is
    fed ``(L, B, 8)``) -> ``head`` -> ``(B, L, 3)``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, num_heads=2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attn.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.attn(x, x, x)
        return self.head(out if self.attn.batch_first else out.transpose(0, 1))


class BiasNet(nn.Module):
    """Every layer type ``lora_bias`` supports: ``x (B, 6)`` -> ``linear`` -> GPT-2 ``conv1d_gpt2`` -> as a
    ``(B, 4, 2, 2)`` image -> ``conv2d`` (3×3) -> as a ``(B, 4, 1, 2, 2)`` volume -> ``conv3d`` (1×3×3) -> mean ->
    ``head`` (no bias: lora_bias there cannot merge) -> ``(B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.conv1d_gpt2 = Conv1D(16, 8)
        self.conv2d = nn.Conv2d(4, 4, kernel_size=3, padding=1)
        # not 1×1×1: peft 0.21.2 merges a 1×1×1 Conv3d as if it were a 1×1 Conv2d and fails
        self.conv3d = nn.Conv3d(4, 5, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1d_gpt2(torch.relu(self.linear(x))).view(-1, 4, 2, 2)
        hidden = self.conv3d(torch.relu(self.conv2d(hidden)).unsqueeze(2))  # (B, 5, 1, 2, 2)
        return self.head(hidden.mean(dim=(2, 3, 4)))


def bias_net() -> BiasNet:
    torch.manual_seed(0)
    return BiasNet()


def bias_net_inputs(model: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 6, generator=torch.Generator().manual_seed(0))}


class Groups8Net(nn.Module):
    """``x (B, 8, 5, 5)`` -> ``conv`` (3×3, groups=8, 8 -> 16 channels) -> mean -> ``head`` -> ``(B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, kernel_size=3, padding=1, groups=8)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def groups8_net() -> Groups8Net:
    torch.manual_seed(0)
    return Groups8Net()


def groups8_inputs(model: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 8, 5, 5, generator=torch.Generator().manual_seed(0))}


def grouped_convnet() -> GroupedConvNet:
    torch.manual_seed(0)
    return GroupedConvNet()


def attention_net(batch_first: bool = True) -> AttentionNet:
    torch.manual_seed(0)
    return AttentionNet(batch_first)


def grouped_convnet_inputs(model: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(0))}


def attention_inputs(model: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(0))}


_exchanged = interop_builder("LoraConfig")

# LoRA on nn.MultiheadAttention is exchanged with peft in tests/test_lora.py instead: peft 0.21.2 adds the out_proj
# update twice in its forward (huggingface/peft#3774), so outputs agree only once that is accounted for.
INTEROP = [
    _exchanged("llama", "llama"),
    _exchanged("gpt2-conv1d", "gpt2", target_modules=["c_attn", "c_fc"]),
    _exchanged("bert-seq-cls-heads", "bert"),
    _exchanged("bert-extra-modules-to-save", "bert", modules_to_save=["bert.pooler"]),
    _exchanged("t5", "t5", target_modules=["q", "v", "wo"]),
    _exchanged("llama-dora", "llama", use_dora=True),
    _exchanged("gpt2-dora", "gpt2", use_dora=True),
    _exchanged("llama-rslora", "llama", use_rslora=True, r=4, lora_alpha=16),
    # peft writes the base weight of a targeted layer for the names it knows (embed_tokens, lm_head), including a
    # targeted Linear lm_head; deltatune writes it for every targeted nn.Embedding (so a resized vocabulary travels
    # with the adapter) and never for Linear layers.
    _exchanged("llama-embedding", "llama", target_modules=["embed_tokens", "q_proj", "lm_head"],
               extra_theirs={"base_model.model.lm_head.base_layer.weight"}),
    _exchanged("llama-patterns", "llama", target_modules="all-linear", rank_pattern={"down_proj": 2},
               alpha_pattern={r"layers\.1\..*": 4}),
    _exchanged("convnet-conv-and-linear", "convnet", target_modules=["conv2d", "conv1d", "fc1", "fc2"], r=2),
    _exchanged("convnet-dora-conv", "convnet", target_modules=["conv2d", "conv1d"], use_dora=True, r=2),
    _exchanged("convnet-embedding", "convnet", target_modules=["embed"], r=2,
               extra_ours={"base_model.model.embed.base_layer.weight"}),
    _exchanged("gpt2-bias-all", "gpt2", bias="all"),
    # under bias="all" peft also writes a modules_to_save bias a second time as "<head>.modules_to_save.bias"
    _exchanged("bert-bias-all", "bert", bias="all",
               extra_theirs={"base_model.model.classifier.modules_to_save.bias"}),
    _exchanged("bert-bias-lora-only", "bert", bias="lora_only"),
    _exchanged("lora-bias-linear-conv2d-conv3d", (bias_net, bias_net_inputs),
               target_modules=["linear", "conv2d", "conv3d", "head"], r=2, lora_bias=True),
    # Conv1D apart: with Linear targets beside it peft's file records the fan_in_fan_out of whichever layer it built
    # last, deltatune's True (it adapts a Conv1D)
    _exchanged("lora-bias-conv1d", (bias_net, bias_net_inputs), target_modules=["conv1d_gpt2"], r=2, lora_bias=True,
               fan_in_fan_out=True),
    _exchanged("gpt2-lora-bias", "gpt2", lora_bias=True),
    # peft's rule: the rank must divide by groups (here 2 and 4)
    _exchanged("grouped-conv", (grouped_convnet, grouped_convnet_inputs), target_modules=["conv2d", "conv1d", "head"],
               r=4),
    _exchanged("grouped-conv-rank-pattern", (grouped_convnet, grouped_convnet_inputs),
               target_modules=["conv2d", "conv1d"], r=2, rank_pattern={"conv1d": 8}, use_rslora=True),
]

# MoE experts (target_parameters): the fused 3-D expert tensors of each style, beside attention modules
INTEROP += [
    _exchanged(f"{kind}-experts", (factory, make_causal_lm_inputs), task_type="CAUSAL_LM", target_modules=["q_proj"],
               target_parameters=EXPERTS, r=2)
    for kind, factory in MOE_FACTORIES.items()
]
INTEROP.append(_exchanged("llama-2d-parameter-rank-pattern", "llama", target_modules=[],
                          target_parameters=["up_proj.weight", "o_proj.weight"], r=2,
                          rank_pattern={"o_proj.weight": 4}, use_rslora=True))

# trainable_token_indices: rows every third token, so the random inputs read some of them; GPT-2's tied lm_head follows
# the embedding's rows (peft saves them under the embedding only)
_TOKENS = list(range(0, 128, 3))
INTEROP += [
    _exchanged("llama-trainable-tokens", "llama", target_modules=["q_proj"], trainable_token_indices=_TOKENS),
    _exchanged("gpt2-trainable-tokens-tied", "gpt2", target_modules=["c_attn"],
               trainable_token_indices={"wte": _TOKENS}),
    _exchanged("gpt2-trainable-tokens-ensure-tying", "gpt2", target_modules=["c_attn"],
               trainable_token_indices=_TOKENS, ensure_weight_tying=True),
]

# DoRA where peft has it beyond Linear/Conv: embeddings (the magnitude per embedding dimension) and grouped convolutions
# (groups 2, 4 and 8; the norm from peft's reshaped B·A)
INTEROP += [
    _exchanged("convnet-dora-embedding", "convnet", target_modules=["embed"], r=2, use_dora=True,
               extra_ours={"base_model.model.embed.base_layer.weight"}),
    _exchanged("grouped-conv-dora", (grouped_convnet, grouped_convnet_inputs), target_modules=["conv2d", "conv1d"],
               r=8, use_dora=True),
    _exchanged("groups8-conv-dora", (groups8_net, groups8_inputs), target_modules=["conv"], r=8, use_dora=True),
]

# layer_replication: layers 0 1 1 (the copy shares layer 1's weights, with an adapter of its own)
INTEROP.append(_exchanged("llama-layer-replication", "llama", target_modules=["q_proj", "v_proj"],
                          layer_replication=[[0, 2], [1, 2]]))

# Seed adapters for tests/test_fuzz_loading.py: LoRA, and DoRA beside a fully trained output head.
FUZZ_SEEDS = {
    "lora": FuzzSeed(
        "LoraConfig", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    ),
    "dora_mts": FuzzSeed("LoraConfig", dict(
        target_modules=["k_proj", "down_proj"], r=2, use_dora=True, init_lora_weights=False,
        modules_to_save=["lm_head"], task_type="CAUSAL_LM",
    )),
}

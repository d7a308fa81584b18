"""AdaLoRA: the shared matrix, and fresh adapters exchanged with peft (adapters pruned by training are exchanged in
``tests/test_adalora.py``).

The forwards compared with peft carry no labels: peft's AdaLoRA model fails on any forward that returns a loss once
its adapter is loaded for inference (it looks for the trainable adapter whose regulariser it would add).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.cases import REMOTE_TARGETS, FuzzSeed, InteropCase, MatrixCase, interop_builder, without_remote_code
from tests.models import FAMILIES, make_seq2seq_inputs

# Two layers per family whose allocation was pruned by training (init_r=4), to ranks 1 and 2. (A layer pruned to rank
# 0 has empty tensors, which no gradient check can see; tests/test_adalora.py covers it.)
_PRUNED_LAYERS: dict[str, tuple[str, str]] = {
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"),
    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"),
    "bert": ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.v"),
    "mt5": ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.v"),
}


def _pruned(family: str) -> dict[str, Any]:
    one, two = _PRUNED_LAYERS[family]
    pattern = {f"{one}.lora_E": [False, True, False, False], f"{two}.lora_E": [True, False, False, True]}
    return dict(total_step=10, init_r=4, target_r=2, lora_alpha=32, rank_pattern=pattern)


MATRIX = [
    MatrixCase("AdaLoraConfig", "adalora", dict(total_step=10), remote_kwargs=REMOTE_TARGETS),
    # peft builds a config's rank_pattern at full init_r and shrinks the layers only when loading a file; deltatune
    # builds them at the kept ranks, so counts differ (loading files is compared in tests/test_adalora.py)
    MatrixCase("AdaLoraConfig", "adalora_pruned", _pruned, families=without_remote_code(), in_peft=False),
]


def without_labels(make_inputs: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    """``make_inputs`` minus ``labels``; an encoder-decoder gets them as ``decoder_input_ids`` instead."""

    def inputs(model: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch = make_inputs(model, **kwargs)
        labels = batch.pop("labels")
        if make_inputs is make_seq2seq_inputs:
            batch["decoder_input_ids"] = labels
        return batch

    return inputs


_adalora = interop_builder("AdaLoraConfig", total_step=10)


def _exchanged(name: str, family: str, **kwargs: Any) -> InteropCase:
    """A case on ``family``'s model, its inputs without labels."""
    factory, task_type, make_inputs = FAMILIES[family]
    return _adalora(name, (factory, without_labels(make_inputs)), task_type=task_type, **kwargs)


INTEROP = [
    _exchanged("adalora-llama", "llama"),
    _exchanged("adalora-gpt2-conv1d", "gpt2", target_modules=["c_attn", "c_fc"], init_r=6),
    _exchanged("adalora-bert-seq-cls", "bert", lora_alpha=16),
    _exchanged("adalora-t5-default-targets", "t5"),
    _adalora("adalora-convnet-conv2d-and-linear", "convnet", target_modules=["conv2d", "fc1"], init_r=3),
]

# AdaLoRA fresh, and pruned by training: which of the init_r=4 triplets each layer kept (layer 1's q_proj lost them
# all).
_FUZZ_ADALORA: dict[str, Any] = dict(
    target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=10, lora_alpha=8, init_lora_weights=False
)
_FUZZ_PRUNED = {f"model.layers.{i}.self_attn.{m}.lora_E": mask for i, masks in enumerate(
    [{"q_proj": [True, False, True, False], "v_proj": [False, False, False, True]},
     {"q_proj": [False] * 4, "v_proj": [True, True, True, False]}]) for m, mask in masks.items()}

FUZZ_SEEDS = {
    "adalora": FuzzSeed("AdaLoraConfig", _FUZZ_ADALORA),
    "adalora_pruned": FuzzSeed("AdaLoraConfig", dict(_FUZZ_ADALORA, rank_pattern=_FUZZ_PRUNED)),
}

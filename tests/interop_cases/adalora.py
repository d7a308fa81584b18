"""AdaLoRA exchanged with peft (fresh adapters; adapters pruned by training are in ``tests/test_adalora.py``).

The compared forwards carry no labels: peft's AdaLoRA model fails on any forward that returns a loss once its adapter
is loaded for inference (it looks for the trainable adapter whose regulariser it would add).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.interop_cases import InteropCase, convnet_inputs
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)


def without_labels(make_inputs: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    """``make_inputs`` minus ``labels``; an encoder-decoder gets them as ``decoder_input_ids`` instead."""

    def inputs(model: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch = make_inputs(model, **kwargs)
        labels = batch.pop("labels")
        if make_inputs is make_seq2seq_inputs:
            batch["decoder_input_ids"] = labels
        return batch

    return inputs


_STEPS = dict(total_step=10)

CASES = [
    InteropCase(
        "adalora-llama", "AdaLoraConfig", tiny_llama, without_labels(make_causal_lm_inputs),
        dict(task_type="CAUSAL_LM", **_STEPS),
    ),
    InteropCase(
        "adalora-gpt2-conv1d", "AdaLoraConfig", tiny_gpt2, without_labels(make_causal_lm_inputs),
        dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], init_r=6, **_STEPS),
    ),
    InteropCase(
        "adalora-bert-seq-cls", "AdaLoraConfig", lambda: tiny_bert("seq_cls"), without_labels(make_seq_cls_inputs),
        dict(task_type="SEQ_CLS", lora_alpha=16, **_STEPS),
    ),
    InteropCase(
        "adalora-t5-default-targets", "AdaLoraConfig", tiny_t5, without_labels(make_seq2seq_inputs),
        dict(task_type="SEQ_2_SEQ_LM", **_STEPS),
    ),
    InteropCase(
        "adalora-convnet-conv2d-and-linear", "AdaLoraConfig", tiny_convnet, convnet_inputs,
        dict(target_modules=["conv2d", "fc1"], init_r=3, **_STEPS),
    ),
]

"""HiRA: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft on every layer type peft
supports for it: Linear, Conv1D, Embedding, Conv1d and Conv2d, and the gaussian init."""

from __future__ import annotations

from typing import Any

from tests.cases import ALL_FAMILIES, FuzzSeed, InteropCase, convnet_inputs, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS
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


_hira = linear_cases("HiraConfig", families=ALL_FAMILIES, nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _hira("hira_default", r=4),
    _hira("hira_gaussian_dropout", without_remote_code(ALL_FAMILIES), r=2, init_weights="gaussian",
          hira_dropout=0.1),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "HiraConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("hira-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("hira-llama-embedding", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=2,
               init_weights="gaussian", target_modules=["embed_tokens", "v_proj", "down_proj"]),
    # peft writes the field as given (it reads the layout per layer); deltatune records True for Conv1D targets
    _exchanged("hira-gpt2", tiny_gpt2, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4, fan_in_fan_out=True,
               target_modules=["c_attn", "c_fc"]),
    _exchanged("hira-bert", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=4,
               **_BERT_TARGETS),
    _exchanged("hira-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4,
               target_modules=["q", "v", "wo"]),
    # deltatune's save_embedding_layers="auto" keeps the adapted embedding's base weight (see tests/cases/lora.py)
    InteropCase("hira-convnet", "HiraConfig", tiny_convnet, convnet_inputs,
                dict(r=3, target_modules=["conv2d", "conv1d", "embed", "fc1"]),
                extra_ours=frozenset({"base_model.model.embed.base_layer.weight"})),
]

FUZZ_SEEDS = {
    "hira": FuzzSeed("HiraConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

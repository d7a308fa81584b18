"""TinyLoRA: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft on Linear, Conv1D and
Embedding layers, with weight tying, and with the projections saved or regenerated from the seed."""

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


_tinylora = linear_cases("TinyLoraConfig", families=ALL_FAMILIES, nonzero_kwargs=dict(init_weights="uniform",
                                                                                     init_v_bound=1.0))


MATRIX = [
    _tinylora("tinylora_default", r=2, u=8),
    _tinylora("tinylora_tied_regenerated", without_remote_code(ALL_FAMILIES), r=4, u=3, weight_tying=0.5,
              save_projection=False, projection_seed=7, tinylora_dropout=0.1),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "TinyLoraConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("tinylora-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM"),
    _exchanged("tinylora-llama-tied-embedding", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=3, u=5,
               weight_tying=0.7, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    _exchanged("tinylora-gpt2-regenerated", tiny_gpt2, make_causal_lm_inputs, task_type="CAUSAL_LM", u=4,
               save_projection=False, projection_seed=3, target_modules=["c_attn", "c_fc"]),
    _exchanged("tinylora-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", u=6,
               bias="tinylora_only", weight_tying=1.0, **_BERT_TARGETS),
    _exchanged("tinylora-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4, u=16,
               target_modules=["q", "v", "wo"]),
    # deltatune's save_embedding_layers="auto" keeps the adapted embedding's base weight (see tests/cases/lora.py)
    InteropCase("tinylora-convnet", "TinyLoraConfig", tiny_convnet, convnet_inputs,
                dict(r=2, u=4, target_modules=["embed", "fc1", "fc2"]),
                extra_ours=frozenset({"base_model.model.embed.base_layer.weight"})),
]

FUZZ_SEEDS = {
    "tinylora": FuzzSeed("TinyLoraConfig", dict(target_modules=["q_proj", "v_proj"], u=4, init_weights="uniform")),
}

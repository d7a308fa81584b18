"""DeFT: the shared matrix on every family (GPT-2's Conv1D included, as in peft) and adapters exchanged with peft:
both decompositions, alpha scaling, PaRa (no injection), a biased BERT and GPT-2."""

from __future__ import annotations

from typing import Any

from tests.cases import ALL_FAMILIES, FuzzSeed, InteropCase, convnet_inputs
from tests.cases import without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS, linear_cases
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


_deft = linear_cases("DeftConfig", families=ALL_FAMILIES, nonzero_kwargs=dict(init_weights=False, init_scale=50.0))


MATRIX = [
    _deft("deft_default", r=4),
    # alpha = 2r: s = 2 divides exactly, so the identity init stays exact
    _deft("deft_qr_alpha_dropout_bias", without_remote_code(), r=2, decomposition_method="qr", alpha=4,
          deft_dropout=0.1, bias="all"),
]


def _exchanged(name: str, factory, make_inputs, **kwargs: Any) -> InteropCase:
    return InteropCase(name, "DeftConfig", factory, make_inputs, kwargs)


INTEROP = [
    _exchanged("deft-llama", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4),
    _exchanged("deft-llama-qr-alpha", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4,
               decomposition_method="qr", alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("deft-llama-para", tiny_llama, make_causal_lm_inputs, task_type="CAUSAL_LM", r=2, para=True),
    _exchanged("deft-gpt2", tiny_gpt2, make_causal_lm_inputs, task_type="CAUSAL_LM", r=4,
               target_modules=["c_attn", "c_proj"]),
    _exchanged("deft-bert-bias", lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, task_type="SEQ_CLS", r=4,
               bias="deft_only", **_BERT_TARGETS),
    _exchanged("deft-t5", tiny_t5, make_seq2seq_inputs, task_type="SEQ_2_SEQ_LM", r=4,
               target_modules=["q", "v", "wo"]),
    _exchanged("deft-convnet", tiny_convnet, convnet_inputs, r=3, decomposition_method="qr",
               target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "deft": FuzzSeed("DeftConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

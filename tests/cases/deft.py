"""DeFT: the shared matrix on every family (GPT-2's Conv1D included, as in peft) and adapters exchanged with peft:
both decompositions, alpha scaling, PaRa (no injection), a biased BERT and GPT-2."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS

_deft = linear_cases("DeftConfig", families=ALL_FAMILIES, nonzero_kwargs=dict(init_weights=False, init_scale=50.0))


MATRIX = [
    _deft("deft_default", r=4),
    # alpha = 2r: s = 2 divides exactly, so the identity init stays exact
    _deft("deft_qr_alpha_dropout_bias", without_remote_code(), r=2, decomposition_method="qr", alpha=4,
          deft_dropout=0.1, bias="all"),
]


_exchanged = interop_builder("DeftConfig")


INTEROP = [
    _exchanged("deft-llama", "llama", r=4),
    _exchanged("deft-llama-qr-alpha", "llama", r=4, decomposition_method="qr", alpha=3,
               target_modules=["q_proj", "v_proj", "down_proj"]),
    _exchanged("deft-llama-para", "llama", r=2, para=True),
    _exchanged("deft-gpt2", "gpt2", r=4, target_modules=["c_attn", "c_proj"]),
    _exchanged("deft-bert-bias", "bert", r=4, bias="deft_only", **_BERT_TARGETS),
    _exchanged("deft-t5", "t5", r=4, target_modules=["q", "v", "wo"]),
    _exchanged("deft-convnet", "convnet", r=3, decomposition_method="qr", target_modules=["fc1", "fc2"]),
]

FUZZ_SEEDS = {
    "deft": FuzzSeed("DeftConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

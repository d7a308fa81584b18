"""HiRA: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft on every layer type peft
supports for it: Linear, Conv1D, Embedding, Conv1d and Conv2d, and the gaussian init."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS

_hira = linear_cases("HiraConfig", families=ALL_FAMILIES, nonzero_kwargs=dict(init_weights=False))


MATRIX = [
    _hira("hira_default", r=4),
    _hira("hira_gaussian_dropout", without_remote_code(ALL_FAMILIES), r=2, init_weights="gaussian",
          hira_dropout=0.1),
]


_exchanged = interop_builder("HiraConfig")


INTEROP = [
    _exchanged("hira-llama", "llama", r=4),
    _exchanged("hira-llama-embedding", "llama", r=2, init_weights="gaussian",
               target_modules=["embed_tokens", "v_proj", "down_proj"]),
    # peft writes the field as given (it reads the layout per layer); deltatune records True for Conv1D targets
    _exchanged("hira-gpt2", "gpt2", r=4, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
    _exchanged("hira-bert", "bert", r=4, **_BERT_TARGETS),
    _exchanged("hira-t5", "t5", r=4, target_modules=["q", "v", "wo"]),
    # deltatune's save_embedding_layers="auto" keeps the adapted embedding's base weight (see tests/cases/lora.py)
    _exchanged("hira-convnet", "convnet", r=3, target_modules=["conv2d", "conv1d", "embed", "fc1"],
               extra_ours={"base_model.model.embed.base_layer.weight"}),
]

FUZZ_SEEDS = {
    "hira": FuzzSeed("HiraConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)),
}

"""TinyLoRA: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft on Linear, Conv1D and
Embedding layers, with weight tying, and with the projections saved or regenerated from the seed."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code
from tests.cases import BERT_DENSE_TARGETS as _BERT_TARGETS

_tinylora = linear_cases("TinyLoraConfig", families=ALL_FAMILIES, nonzero_kwargs=dict(init_weights="uniform",
                                                                                     init_v_bound=1.0))


MATRIX = [
    _tinylora("tinylora_default", r=2, u=8),
    _tinylora("tinylora_tied_regenerated", without_remote_code(ALL_FAMILIES), r=4, u=3, weight_tying=0.5,
              save_projection=False, projection_seed=7, tinylora_dropout=0.1),
]


_exchanged = interop_builder("TinyLoraConfig")


INTEROP = [
    _exchanged("tinylora-llama", "llama"),
    _exchanged("tinylora-llama-tied-embedding", "llama", r=3, u=5, weight_tying=0.7,
               target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    _exchanged("tinylora-gpt2-regenerated", "gpt2", u=4, save_projection=False, projection_seed=3,
               target_modules=["c_attn", "c_fc"]),
    _exchanged("tinylora-bert-bias", "bert", u=6, bias="tinylora_only", weight_tying=1.0, **_BERT_TARGETS),
    _exchanged("tinylora-t5", "t5", r=4, u=16, target_modules=["q", "v", "wo"]),
    # deltatune's save_embedding_layers="auto" keeps the adapted embedding's base weight (see tests/cases/lora.py)
    _exchanged("tinylora-convnet", "convnet", r=2, u=4, target_modules=["embed", "fc1", "fc2"],
               extra_ours={"base_model.model.embed.base_layer.weight"}),
]

FUZZ_SEEDS = {
    "tinylora": FuzzSeed("TinyLoraConfig", dict(target_modules=["q_proj", "v_proj"], u=4, init_weights="uniform")),
}

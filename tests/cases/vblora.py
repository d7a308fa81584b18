"""VB-LoRA: the shared matrix (a bank bound of 0 starts at the base model; the non-zero variant draws a real bank) and
adapters exchanged with peft: logits saved in full and in the ``save_only_topk_weights`` form, on Linear and GPT-2's
Conv1D, with ``bias="vblora_only"``."""

from __future__ import annotations

from tests.cases import ALL_FAMILIES, FuzzSeed, interop_builder, linear_cases, without_remote_code

# every tiny model's layer sizes are multiples of 8
_SMALL = dict(r=4, num_vectors=16, vector_length=8)


# init_vector_bank_bound=0: an all-zero bank, so the fresh adapter is exactly the base (peft's default 0.02 is not)
_vblora = linear_cases("VBLoRAConfig", families=ALL_FAMILIES, bert_kwargs={}, defaults=dict(init_vector_bank_bound=0.0),
                       nonzero_kwargs=dict(init_vector_bank_bound=0.5, init_logits_std=1.0))


MATRIX = [
    _vblora("vblora_default", **_SMALL),
    # (the save_only_topk_weights form reloads equal only up to rounding: exchanged with peft below, at 1e-5)
    _vblora("vblora_top3_dropout", without_remote_code(), **_SMALL, topk=3, vblora_dropout=0.1),
]


_exchanged = interop_builder("VBLoRAConfig", **_SMALL)


INTEROP = [
    _exchanged("vblora-llama", "llama", target_modules="all-linear"),
    _exchanged("vblora-llama-topk", "llama", topk=3, save_only_topk_weights=True),
    _exchanged("vblora-gpt2", "gpt2"),
    _exchanged("vblora-bert-bias", "bert", bias="vblora_only", target_modules=["query", "value", "dense"]),
    _exchanged("vblora-t5", "t5"),
]

FUZZ_SEEDS = {
    "vblora": FuzzSeed("VBLoRAConfig", dict(target_modules=["q_proj", "v_proj"], **_SMALL)),
    "vblora_topk": FuzzSeed("VBLoRAConfig", dict(target_modules=["q_proj", "v_proj"], save_only_topk_weights=True,
                                                 **_SMALL)),
}

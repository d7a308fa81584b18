"""LoRA's variants (``methods/lora_<variant>.py``): a lean share of the matrix, and adapters exchanged with peft.

QALoRA has no exchange case: peft applies ``use_qalora`` on GPTQ layers only (and ignores it elsewhere), which this
machine cannot build; its math is checked in tests/test_lora_variants.py.
"""

from __future__ import annotations

from typing import Any

from tests.cases import FuzzSeed, MatrixCase, interop_builder

_BD = dict(target_modules_bd_a=["v_proj"], target_modules_bd_b=["q_proj"], nblocks=2)


def _variant(name: str, families: tuple[str, ...], **kwargs: Any) -> MatrixCase:
    return MatrixCase("LoraConfig", name, dict(r=4, **kwargs), nonzero_kwargs=dict(init_lora_weights=False),
                      families=families)


# KaSA is not here: its fresh adapter is the *truncated* base, which the matrix's identities do not describe
# (tests/test_lora_variants.py checks it). BD-LoRA's block-diagonal B starts at zero even with
# init_lora_weights=False (peft's rule), so the matrix's case makes A block-diagonal.
MATRIX = [
    _variant("velora", ("gpt2", "llama"), velora_config=dict(num_groups=4)),
    _variant("bdlora", ("llama",), target_modules=["q_proj", "v_proj"],
             use_bdlora=dict(target_modules_bd_a=["q_proj", "v_proj"], nblocks=2)),
    _variant("monteclora", ("llama",), monteclora_config=dict(num_samples=2, buffer_size=4)),
]


_exchanged = interop_builder("LoraConfig", r=4, target_modules=["q_proj", "v_proj", "down_proj"])


INTEROP = [
    _exchanged("kasa", "llama", kasa_config=dict(beta=0.5, gamma=0.25)),
    _exchanged("velora-random", "llama", velora_config=dict(num_groups=3, scale=2.0, init_type="random")),
    _exchanged("velora-gpt2", "gpt2", target_modules=None, velora_config=dict(num_groups=4)),
    _exchanged("monteclora", "llama", monteclora_config=dict(num_samples=3, buffer_size=2, use_entropy=True)),
    _exchanged("bdlora", "llama", use_bdlora=dict(_BD, target_modules_bd_a=["v_proj", "down_proj"])),
]

FUZZ_SEEDS = {
    "lora_bdlora": FuzzSeed("LoraConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False,
                                               use_bdlora=_BD)),
}

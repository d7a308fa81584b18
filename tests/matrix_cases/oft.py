"""OFT and its variants in the shared matrix (GPT-2 is left out: its Conv1D projections are not OFT targets, in peft
either)."""

from __future__ import annotations

from typing import Any

from tests.matrix_cases import ALL_FAMILIES, MatrixCase

_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")
# The tiny BERT's classifier logits barely move when only query/value rotate; its dense layers make the delta visible.
_BERT_TARGETS = dict(target_modules=["query", "value", "dense"])


def _oft(name: str, **kwargs: Any) -> MatrixCase:
    def family_kwargs(family: str) -> dict[str, Any]:
        return {**(_BERT_TARGETS if family == "bert" else {}), **kwargs}

    return MatrixCase("OFTConfig", name, family_kwargs, nonzero_kwargs=dict(init_weights=False), families=_FAMILIES)


CASES = [
    _oft("oft_default"),
    _oft("oft_r_dropout", r=4, oft_block_size=0, module_dropout=0.5),
    _oft("oft_exact_shared", oft_block_size=8, use_cayley_neumann=False, block_share=True),
    _oft("oft_coft", oft_block_size=8, coft=True, eps=0.5),
    _oft("oft_all_linear_bias", oft_block_size=16, target_modules="all-linear", bias="all"),
]

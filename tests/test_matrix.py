"""The shared matrix: every tiny model family (the transformers families and the ``trust_remote_code`` model) × every
method configuration in ``tests/cases`` (each module's ``MATRIX``), checked for the properties every layer method must
have (DESIGN.md, "Tests").

Each cell builds the family's model through the task wrapper its task type selects. Where a property needs a
non-zero delta, the adapter is made with the case's ``nonzero_kwargs`` or, without them, has every parameter
perturbed as training would do.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import peft
import pytest
import torch

import deltatune as dt
from tests.adapter_utils import (
    assert_clearly_different,
    assert_close_scaled,
    assert_same_state,
    family_batch,
    logits,
    snapshot,
)
from tests.cases import MatrixCase, matrix_cases, perturb_adapter
from tests.models import MATRIX_FAMILIES

CASES = {f"{case.config_class}:{case.name}": case for case in matrix_cases()}


def _cells(predicate=lambda case, family: True) -> list[Any]:
    return [
        pytest.param(family, key, id=f"{family}-{case.name}")
        for key, case in CASES.items() for family in case.families if predicate(case, family)
    ]


CELLS = _cells()
GENERATIVE_CELLS = _cells(lambda case, family: MATRIX_FAMILIES[family].task_type != "SEQ_CLS")


def build(family: str, key: str, *, nonzero: bool = True) -> dt.PeftModel:
    """The family's model with one adapter of case ``key``; with ``nonzero`` the adapter's delta is non-zero."""
    case: MatrixCase = CASES[key]
    torch.manual_seed(1)  # adapter init
    model = dt.get_peft_model(MATRIX_FAMILIES[family].factory(), case.make_config(dt, family, nonzero=nonzero))
    if nonzero and not case.nonzero_kwargs:
        perturb_adapter(model)
    return model


@pytest.mark.parametrize("family, key", _cells(lambda case, family: case.in_peft))
def test_trainable_and_total_parameter_counts_equal_peft(family: str, key: str) -> None:
    ours = build(family, key, nonzero=False)
    theirs = peft.get_peft_model(MATRIX_FAMILIES[family].factory(), CASES[key].make_config(peft, family))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("family, key", CELLS)
def test_fresh_adapter_keeps_base_output_and_nonzero_delta_changes_it(family: str, key: str) -> None:
    base = MATRIX_FAMILIES[family].factory()
    inputs = family_batch(family, base)
    expected = logits(base, inputs)
    fresh = logits(build(family, key, nonzero=False), inputs)
    if CASES[key].weight_init or not CASES[key].exact_identity:
        # W split into residual + BA, or reflections that cancel in pairs: the base output up to rounding
        assert_close_scaled(fresh, expected)
    else:
        assert torch.equal(fresh, expected)
    assert_clearly_different(logits(build(family, key), inputs), expected)


@pytest.mark.parametrize("family, key", CELLS)
def test_gradients_reach_only_trainable_adapter_parameters(family: str, key: str) -> None:
    model = build(family, key)
    model.train()
    model(**family_batch(family, model)).loss.backward()
    bias_all = CASES[key].config_kwargs(family).get("bias") == "all"
    for name, param in model.named_parameters():
        if param.requires_grad:
            owned = any(f".{holder}.default." in name for holder in ("deltas", "modules_to_save", "shared_state"))
            assert owned or (bias_all and name.endswith("bias")), f"{name} trains but is not adapter-owned"
            if any(re.search(pattern, name) for pattern in CASES[key].gradless):
                continue
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("family, key", CELLS)
def test_save_then_load_gives_identical_outputs(family: str, key: str, tmp_path) -> None:
    model = build(family, key)
    inputs = family_batch(family, model)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(MATRIX_FAMILIES[family].factory(), tmp_path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family, key", _cells(lambda case, family: case.mergeable))
def test_merged_output_matches_unmerged_and_unmerge_restores_it(family: str, key: str) -> None:
    model = build(family, key)
    inputs = family_batch(family, model)
    unmerged = logits(model, inputs)
    model.merge_adapter()
    assert_close_scaled(logits(model, inputs), unmerged)
    model.unmerge_adapter()
    assert_close_scaled(logits(model, inputs), unmerged)


@pytest.mark.parametrize("family, key", _cells(lambda case, family: not case.weight_init))
def test_unload_restores_the_base_model_exactly(family: str, key: str) -> None:
    expected = snapshot(MATRIX_FAMILIES[family].factory())
    model = build(family, key)
    model.train()
    model(**family_batch(family, model)).loss.backward()  # gradients and train mode must not matter
    assert_same_state(expected, model.unload())


@pytest.mark.parametrize("family, key", _cells(lambda case, family: case.weight_init))
def test_weight_init_residual_plus_fresh_adapter_merges_back_to_the_base_weights(family: str, key: str) -> None:
    expected = MATRIX_FAMILIES[family].factory().state_dict()
    merged = build(family, key, nonzero=False).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)


def _generate(model, family: str, **kwargs: Any) -> torch.Tensor:
    batch = family_batch(family, model)
    return model.generate(
        input_ids=batch["input_ids"][:, :4], attention_mask=batch["attention_mask"][:, :4], max_new_tokens=5,
        do_sample=False, **kwargs,
    )


@pytest.mark.parametrize("family, key", GENERATIVE_CELLS)
def test_generate_with_kv_cache_is_deterministic_and_equals_the_merged_model(family: str, key: str) -> None:
    model = build(family, key)
    first = _generate(model, family)
    assert first.shape[1] > 4 if MATRIX_FAMILIES[family].task_type == "CAUSAL_LM" else first.shape[1] > 1
    assert torch.equal(_generate(model, family), first)
    if CASES[key].cache_exact:
        assert torch.equal(_generate(model, family, use_cache=False), first)  # the cache changes nothing
    if not CASES[key].mergeable:
        return
    merged = copy.deepcopy(model).merge_and_unload()
    assert not isinstance(merged, dt.PeftModel)
    assert torch.equal(_generate(merged, family), first)

"""The shared matrix: every tiny transformers family × every LoRA configuration, checked for the properties every
layer method must have (DESIGN.md, "Tests").

Each cell builds the family's model through the task wrapper its task type selects. Where a property needs a
non-zero delta, the adapter is made with ``init_lora_weights=False`` (PiSSA/OLoRA, whose init *is* the point, get
their zero-initialised factor perturbed instead, as training would do).
"""

from __future__ import annotations

import copy
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
    perturb_lora,
    snapshot,
)
from tests.models import FAMILIES

# Targets and patterns per family for the rank/alpha-pattern config: patterns must name real modules of each model.
_PATTERN_TARGETS: dict[str, dict[str, Any]] = {
    "llama": dict(
        target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*v_proj": 32}
    ),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], rank_pattern={"c_attn": 2}, alpha_pattern={r"mlp\.c_proj": 32}),
    "bert": dict(
        target_modules=["query", "value"], rank_pattern={"query": 2}, alpha_pattern={r"layer\.1\..*value": 32}
    ),
    "t5": dict(target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={r"decoder\..*\.v": 32}),
    "mt5": dict(target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={r"decoder\..*\.v": 32}),
}

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "rslora": dict(use_rslora=True, r=4, lora_alpha=16),
    "dora": dict(use_dora=True),
    "gaussian": dict(init_lora_weights="gaussian"),
    "bias_all": dict(bias="all"),
    "all_linear": dict(target_modules="all-linear"),
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "patterns": {},  # filled per family from _PATTERN_TARGETS
}
_WEIGHT_INITS = ("pissa", "olora")  # init schemes that rewrite the base weight and start from a non-zero delta

CELLS = [pytest.param(f, c, id=f"{f}-{c}") for f in sorted(FAMILIES) for c in CONFIGS]
GENERATIVE_CELLS = [p for p in CELLS if FAMILIES[p.values[0]].task_type != "SEQ_CLS"]


def config_kwargs(family: str, config: str) -> dict[str, Any]:
    kwargs = dict(task_type=FAMILIES[family].task_type, **CONFIGS[config])
    if config == "patterns":
        kwargs.update(_PATTERN_TARGETS[family])
    return kwargs


def build(family: str, config: str, *, nonzero: bool = True) -> dt.PeftModel:
    """The family's model with one LoRA adapter; with ``nonzero`` the adapter's delta is non-zero."""
    kwargs = config_kwargs(family, config)
    if nonzero and config not in _WEIGHT_INITS:
        kwargs["init_lora_weights"] = False
    torch.manual_seed(1)  # adapter init
    model = dt.get_peft_model(FAMILIES[family].factory(), dt.LoraConfig(**kwargs))
    if nonzero and config in _WEIGHT_INITS:
        perturb_lora(model)
    return model


@pytest.mark.parametrize("family, config", CELLS)
def test_trainable_and_total_parameter_counts_equal_peft(family: str, config: str) -> None:
    ours = build(family, config, nonzero=False)
    theirs = peft.get_peft_model(FAMILIES[family].factory(), peft.LoraConfig(**config_kwargs(family, config)))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("family, config", CELLS)
def test_fresh_adapter_keeps_base_output_and_nonzero_delta_changes_it(family: str, config: str) -> None:
    base = FAMILIES[family].factory()
    inputs = family_batch(family, base)
    expected = logits(base, inputs)
    fresh = logits(build(family, config, nonzero=False), inputs)
    if config in _WEIGHT_INITS:  # W is split into residual + BA: equal up to the rounding of that split
        assert_close_scaled(fresh, expected)
    else:
        assert torch.equal(fresh, expected)
    assert_clearly_different(logits(build(family, config), inputs), expected)


@pytest.mark.parametrize("family, config", CELLS)
def test_gradients_reach_only_trainable_adapter_parameters(family: str, config: str) -> None:
    model = build(family, config)
    model.train()
    model(**family_batch(family, model)).loss.backward()
    bias_all = CONFIGS[config].get("bias") == "all"
    for name, param in model.named_parameters():
        if param.requires_grad:
            owned = ".deltas.default." in name or ".modules_to_save.default." in name
            assert owned or (bias_all and name.endswith("bias")), f"{name} trains but is not adapter-owned"
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("family, config", CELLS)
def test_save_then_load_gives_identical_outputs(family: str, config: str, tmp_path) -> None:
    model = build(family, config)
    inputs = family_batch(family, model)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(FAMILIES[family].factory(), tmp_path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family, config", CELLS)
def test_merged_output_matches_unmerged_and_unmerge_restores_it(family: str, config: str) -> None:
    model = build(family, config)
    inputs = family_batch(family, model)
    unmerged = logits(model, inputs)
    model.merge_adapter()
    assert_close_scaled(logits(model, inputs), unmerged)
    model.unmerge_adapter()
    assert_close_scaled(logits(model, inputs), unmerged)


@pytest.mark.parametrize("family, config", [p for p in CELLS if p.values[1] not in _WEIGHT_INITS])
def test_unload_restores_the_base_model_exactly(family: str, config: str) -> None:
    expected = snapshot(FAMILIES[family].factory())
    model = build(family, config)
    model.train()
    model(**family_batch(family, model)).loss.backward()  # gradients and train mode must not matter
    assert_same_state(expected, model.unload())


@pytest.mark.parametrize("config", _WEIGHT_INITS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weight_init_residual_plus_fresh_adapter_merges_back_to_the_base_weights(family: str, config: str) -> None:
    expected = FAMILIES[family].factory().state_dict()
    merged = build(family, config, nonzero=False).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def _generate(model, family: str, **kwargs: Any) -> torch.Tensor:
    batch = family_batch(family, model)
    return model.generate(
        input_ids=batch["input_ids"][:, :4], attention_mask=batch["attention_mask"][:, :4], max_new_tokens=5,
        do_sample=False, **kwargs,
    )


@pytest.mark.parametrize("family, config", GENERATIVE_CELLS)
def test_generate_with_kv_cache_is_deterministic_and_equals_the_merged_model(family: str, config: str) -> None:
    model = build(family, config)
    first = _generate(model, family)
    assert first.shape[1] > 4 if FAMILIES[family].task_type == "CAUSAL_LM" else first.shape[1] > 1
    assert torch.equal(_generate(model, family), first)
    assert torch.equal(_generate(model, family, use_cache=False), first)  # the cache changes nothing
    merged = copy.deepcopy(model).merge_and_unload()
    assert not isinstance(merged, dt.PeftModel)
    assert torch.equal(_generate(merged, family), first)

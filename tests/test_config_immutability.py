"""A user's config object is only read: every API that builds an adapter from it (``get_peft_model``,
``add_adapter``, ``from_pretrained``, ``load_adapter``, ``add_weighted_adapter``, ``inject_adapter_in_model``) resolves
a copy (``deltatune.resolve``), for every registered method on every tiny family, and the ``PeftModel`` stores that
resolved copy (targets as names, the layout and method fields the model decides)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.config import LayerConfig
from deltatune.layers import adapter_layers
from deltatune.registry import supported_types
from deltatune.targeting import trained_biases
from tests.cases import matrix_cases
from tests.models import MATRIX_FAMILIES

# Prompt methods have no matrix cases; one small config each.
_PROMPT_CONFIGS: dict[str, dict[str, Any]] = {
    "PromptTuningConfig": dict(num_virtual_tokens=2),
    "PromptEncoderConfig": dict(num_virtual_tokens=2, encoder_hidden_size=8),
    "PrefixTuningConfig": dict(num_virtual_tokens=2),
    "MultitaskPromptTuningConfig": dict(num_virtual_tokens=2, num_tasks=2),
    "CPTConfig": dict(cpt_token_ids=[5, 6]),
    "CartridgeConfig": dict(num_virtual_tokens=2),
}
_CAUSAL_ONLY = {"CPTConfig"}  # peft's CPT supports causal language models only
# Layer methods with no matrix cases (every forward needs task_ids); on the families whose targets are Linear.
_TASK_CONFIGS: dict[str, dict[str, Any]] = {"PolyConfig": dict(r=2, n_tasks=2)}
_LINEAR_DEFAULTS = ("bert", "llama", "mt5", "t5")  # GPT-2's Conv1D and the remote-code model's missing defaults


def _cases() -> list[Any]:
    cells = [
        pytest.param(family, case.config_class, case.config_kwargs(family), id=f"{family}-{case.name}")
        for case in matrix_cases() for family in case.families
    ]
    cells += [
        pytest.param(family, cls, dict(task_type=MATRIX_FAMILIES[family].task_type, **kwargs), id=f"{family}-{cls}")
        for cls, kwargs in _PROMPT_CONFIGS.items() for family in MATRIX_FAMILIES
        if cls not in _CAUSAL_ONLY or MATRIX_FAMILIES[family].task_type == "CAUSAL_LM"
    ]
    cells += [
        pytest.param(family, cls, dict(task_type=MATRIX_FAMILIES[family].task_type, **kwargs), id=f"{family}-{cls}")
        for cls, kwargs in _TASK_CONFIGS.items() for family in _LINEAR_DEFAULTS
    ]
    return cells


CELLS = _cases()


# Routers load their experts from files under fixed adapter names, which a static config cannot provide here.
_COVERED_ELSEWHERE = {"XLoraConfig": "tests/test_xlora.py::test_no_api_modifies_the_users_config"}


def test_every_registered_method_is_covered() -> None:
    classes = {cell.values[1] for cell in CELLS} | set(_COVERED_ELSEWHERE)
    assert {getattr(dt, cls).peft_type for cls in classes} == set(supported_types())


def _assert_resolved(stored: Any, user: Any, model: dt.PeftModel, adapter: str) -> None:
    """``stored`` is a resolved copy of ``user``: its own object, targets as names, the layout recorded."""
    assert stored is not user
    if not isinstance(stored, LayerConfig):
        return
    assert stored.target_modules is not None and stored.target_modules != "all-linear"
    if isinstance(user.target_modules, list):
        assert stored.target_modules == user.target_modules
    if hasattr(stored, "feedforward_modules"):
        assert stored.feedforward_modules is not None
    if hasattr(stored, "fan_in_fan_out") and not user.fan_in_fan_out:
        conv1d = any(
            isinstance(layer.base_layer, Conv1D)
            for _, layer in adapter_layers(model.get_base_model()) if adapter in layer.deltas
        )
        assert stored.fan_in_fan_out == conv1d


@pytest.mark.parametrize("family, config_class, kwargs", CELLS)
def test_no_api_modifies_the_users_config(family: str, config_class: str, kwargs: dict[str, Any],
                                          tmp_path: Path) -> None:
    factory = MATRIX_FAMILIES[family].factory
    config = getattr(dt, config_class)(**kwargs)
    before = copy.deepcopy(config)

    model = dt.get_peft_model(factory(), config)
    assert config == before
    _assert_resolved(model.peft_config["default"], config, model, "default")

    biased = trained_biases(config) != "none"
    if biased:  # a second adapter training the shared biases is refused (as by peft), the config untouched
        with pytest.raises(dt.ConfigError, match="already trains the model's biases"):
            model.add_adapter("second", config)
    else:
        model.add_adapter("second", config)
        _assert_resolved(model.peft_config["second"], config, model, "second")
    assert config == before

    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(factory(), tmp_path, config=config)
    assert config == before
    _assert_resolved(loaded.peft_config["default"], config, loaded, "default")

    if not biased:
        loaded.load_adapter(tmp_path / "second", "third")
        assert config == before
        _assert_resolved(loaded.peft_config["third"], config, loaded, "third")

    if isinstance(config, LayerConfig):
        try:
            dt.inject_adapter_in_model(config, factory())
        except dt.ConfigError:  # methods with shared state (VeRA) need the PeftModel
            pass
        assert config == before


# Not BERT: its task wrapper gives every adapter a trained copy of the classifier, which cannot be combined.
@pytest.mark.parametrize("family", sorted(f for f in MATRIX_FAMILIES if MATRIX_FAMILIES[f].task_type != "SEQ_CLS"))
def test_add_weighted_adapter_modifies_no_users_config(family: str) -> None:
    task_type = MATRIX_FAMILIES[family].task_type
    first = dt.LoraConfig(task_type=task_type, r=4, target_modules="all-linear")
    second = dt.LoraConfig(task_type=task_type, r=4, lora_alpha=16, target_modules="all-linear")
    before = copy.deepcopy((first, second))
    model = dt.get_peft_model(MATRIX_FAMILIES[family].factory(), first)
    model.add_adapter("other", second)
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined", combination_type="linear")
    assert (first, second) == before
    _assert_resolved(model.peft_config["combined"], first, model, "combined")

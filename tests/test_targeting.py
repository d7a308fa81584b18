"""Which modules an adapter adapts (``deltatune.targeting``): the pure matching rule, the layer index, the model
walk for every form of ``target_modules`` (checked against peft's choice as an oracle), and the errors."""

from __future__ import annotations

from typing import Any

import peft
import pytest
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer
from deltatune.registry import get_method
from deltatune.resolve import resolve
from deltatune.targeting import (
    expand_all_linear,
    find_modules_to_save,
    find_targets,
    layer_index,
    name_matches,
    trained_biases,
)
from tests.adapter_utils import assert_same_state, peft_wrapped_names, snapshot, wrapped_names
from tests.models import tiny_bert, tiny_convnet, tiny_gpt2, tiny_llama, tiny_mlp, tiny_mt5, tiny_t5

# --- the pure matching rule --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, patterns, expected",
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),  # leaf name
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),  # dotted suffix
        ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),  # full name
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix must start at a dot
        ("model.layers.0.self_attn.q_proj", ["attn.q_proj"], False),
        ("model.layers.0.self_attn.q_proj", ["k_proj", "v_proj"], False),
        ("model.layers.0.self_attn.q_proj", [], False),
        ("q", ["q"], True),
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),  # a string is a regex on the full name
        ("model.layers.0.self_attn.q_proj", r"q_proj", False),  # ...that must match all of it (fullmatch)
        ("model.layers.0.self_attn.q_proj", r".*layers\.(0|1)\..*(q|v)_proj", True),
        ("model.layers.2.self_attn.q_proj", r".*layers\.(0|1)\..*(q|v)_proj", False),
    ],
)
def test_name_matches(name: str, patterns, expected: bool) -> None:
    assert name_matches(name, patterns) is expected


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("model.layers.3.mlp.up_proj", None, 3),
        ("encoder.block.1.layer.0.SelfAttention.q", None, 1),  # the first number, not the sub-layer's
        ("transformer.h.0.attn.c_attn", None, 0),
        ("encoder.block.1.layer.0.SelfAttention.q", "layer", 0),  # a pattern picks which list
        ("model.layers.3.mlp.up_proj", "h", None),
        ("model.layers.3.mlp.up_proj", ["h", "layers"], 3),
        ("lm_head", None, None),
        ("0", None, 0),  # nn.Sequential children
    ],
)
def test_layer_index(name: str, pattern, expected) -> None:
    assert layer_index(name, pattern) == expected


# --- the model walk, against peft's choice -----------------------------------------------------------------------

_SELECTIONS: list[tuple[str, Any, dict[str, Any]]] = [
    ("llama-leaf-names", tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    ("llama-dotted-suffix", tiny_llama, dict(target_modules=["mlp.up_proj"])),
    ("llama-full-name", tiny_llama, dict(target_modules=["model.layers.1.self_attn.o_proj"])),
    ("llama-regex", tiny_llama, dict(target_modules=r".*\.(q|k)_proj")),
    ("llama-regex-one-layer", tiny_llama, dict(target_modules=r"model\.layers\.1\..*proj")),
    ("llama-all-linear", tiny_llama, dict(target_modules="all-linear")),
    ("llama-default", tiny_llama, dict()),
    ("llama-layers", tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama-layers-int-pattern", tiny_llama,
     dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("llama-exclude-list", tiny_llama, dict(target_modules="all-linear", exclude_modules=["q_proj", "down_proj"])),
    ("llama-exclude-regex", tiny_llama, dict(target_modules="all-linear", exclude_modules=r".*mlp.*")),
    ("gpt2-default", tiny_gpt2, dict()),
    ("gpt2-all-linear", tiny_gpt2, dict(target_modules="all-linear")),
    ("gpt2-layers-pattern", tiny_gpt2, dict(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h")),
    ("bert-default", lambda: tiny_bert("seq_cls"), dict()),
    ("bert-all-linear", lambda: tiny_bert("seq_cls"), dict(target_modules="all-linear")),
    ("t5-default", tiny_t5, dict()),
    ("t5-all-linear", tiny_t5, dict(target_modules="all-linear")),
    ("t5-layers", tiny_t5, dict(target_modules=["q", "v"], layers_to_transform=[1])),
    ("t5-layers-pattern", tiny_t5, dict(target_modules=["q", "v"], layers_to_transform=[0], layers_pattern="block")),
    ("mt5-all-linear", tiny_mt5, dict(target_modules="all-linear")),
    ("mlp-all-linear", tiny_mlp, dict(target_modules="all-linear")),
    ("convnet-mixed-types", tiny_convnet, dict(target_modules=["embed", "conv1d", "conv2d", "fc2"])),
]


@pytest.mark.parametrize("factory, kwargs", [pytest.param(f, k, id=i) for i, f, k in _SELECTIONS])
def test_selection_matches_peft(factory, kwargs: dict[str, Any]) -> None:
    ours = dt.get_peft_model(factory(), dt.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**kwargs))
    assert wrapped_names(ours) == peft_wrapped_names(theirs)
    assert wrapped_names(ours)


def test_all_linear_never_adapts_the_output_head() -> None:
    names = expand_all_linear(tiny_llama())
    assert "lm_head" not in names
    assert set(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_linear_is_stored_as_the_names_it_expanded_to() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules="all-linear"))
    assert model.peft_config["default"].target_modules == ["c_attn", "c_fc", "c_proj"]


def test_default_targets_are_recorded_in_the_config() -> None:
    config = dt.LoraConfig()
    assert find_targets(tiny_t5(), config)[0] == ["q", "v"]
    resolved = resolve(tiny_t5(), config, get_method(config.peft_type))
    assert resolved.config.target_modules == ["q", "v"]
    assert config.target_modules is None  # the caller's config is only read


def test_modules_trained_in_full_are_never_also_adapted() -> None:
    # The head is a default modules_to_save of sequence classification and a Linear that "all-linear" matches.
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    assert not any("classifier" in name for name in wrapped_names(model))
    head = model.base_model.model.classifier
    assert isinstance(head.original_module, nn.Linear) and isinstance(head.modules_to_save["default"], nn.Linear)


def test_modules_inside_a_module_trained_in_full_are_not_adapted() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["layers.0"]))
    assert wrapped_names(model) == ["model.layers.1.self_attn.q_proj"]


# --- errors ------------------------------------------------------------------------------------------------------

def test_targets_matching_nothing_raise_listing_the_candidates() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError) as info:
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["qproj"]))
    message = str(info.value)
    assert "['qproj']" in message and "LlamaForCausalLM" in message
    for candidate in ("q_proj", "v_proj", "down_proj", "lm_head"):
        assert candidate in message
    assert_same_state(before, model)


def test_layers_to_transform_matching_nothing_names_the_layers_in_the_error() -> None:
    with pytest.raises(dt.TargetError, match=r"in layers \[7\]"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_exclude_modules_excluding_everything_raises() -> None:
    with pytest.raises(dt.TargetError, match="matched no module"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], exclude_modules=r".*"))


def test_no_default_targets_for_an_unknown_model_type() -> None:
    with pytest.raises(dt.TargetError, match="no default target_modules for model type None.*lin0"):
        dt.get_peft_model(tiny_mlp(), dt.LoraConfig())


def test_an_unsupported_module_type_is_refused_naming_path_type_and_supported_types() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError) as info:
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    message = str(info.value)
    assert "'model.layers.0.input_layernorm'" in message and "LlamaRMSNorm" in message
    assert all(t in message for t in ("Linear", "Conv1D", "Conv2d", "Embedding"))
    # q_proj (a fine target, earlier in model order) was not wrapped either: all targets are checked first
    assert_same_state(before, model)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_modules_to_save_matching_nothing_raises_listing_top_level_modules() -> None:
    with pytest.raises(dt.TargetError, match=r"modules_to_save \['head'\].*\['model', 'lm_head'\]"):
        find_modules_to_save(tiny_llama(), ["head"])


def test_modules_to_save_alternatives_need_only_one_match() -> None:
    assert find_modules_to_save(tiny_bert("seq_cls"), ["classifier", "score"]) == ["classifier"]


# --- biases ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "config, expected",
    [
        (dt.LoraConfig(), "none"),
        (dt.LoraConfig(bias="all"), "all"),
        (dt.LoraConfig(bias="lora_only"), "adapted"),
        (dt.OFTConfig(oft_block_size=4, r=0, bias="oft_only"), "adapted"),  # peft reads any "<method>_only"
        (dt.VeraConfig(bias="vera_only"), "adapted"),
        (dt.IA3Config(), "none"),  # no bias field
    ],
)
def test_trained_biases_reads_the_bias_field_once_for_every_method(config, expected: str) -> None:
    assert trained_biases(config) == expected


_DEFAULTS: list[tuple[str, str, dict[str, Any]]] = [
    ("gpt_neo", "LoraConfig", {}),
    ("Gemma3ForCausalLM", "LoraConfig", {}),
    ("Gemma3ForCausalLM", "AdaLoraConfig", {"total_step": 1}),
    ("GPT2LMHeadModel", "FourierFTConfig", {"n_frequency": 10}),
    ("GPTBigCodeForCausalLM", "FourierFTConfig", {"n_frequency": 10}),
    ("GPTBigCodeForCausalLM", "C3AConfig", {"block_size": 1}),
    ("GPT2LMHeadModel", "WaveFTConfig", {"n_frequency": 8}),
    ("GPTBigCodeForCausalLM", "WaveFTConfig", {"n_frequency": 8}),
    ("GPTBigCodeForCausalLM", "OSFConfig", {}),
]


@pytest.mark.parametrize("model_id, config_name, kwargs", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in _DEFAULTS])
def test_default_targets_per_method_and_model_type_are_peft_s(model_id: str, config_name: str,
                                                              kwargs: dict[str, Any]) -> None:
    """With no target_modules, each method adapts the modules peft's table for that method and model type names
    (GPT-Neo and Gemma 3 have defaults; FourierFT / C3A / WaveFT adapt GPT-2's and GPTBigCode's ``mlp.c_proj``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tests.peft_decoder_table import build

    ours = dt.get_peft_model(build(model_id), getattr(dt, config_name)(task_type="CAUSAL_LM", **kwargs))
    theirs = peft.get_peft_model(build(model_id), getattr(peft, config_name)(task_type="CAUSAL_LM", **kwargs))
    their_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                         if isinstance(m, BaseTunerLayer))
    assert wrapped_names(ours) == their_names
    assert their_names

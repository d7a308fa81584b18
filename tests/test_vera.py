"""VeRA (``deltatune.methods.vera``): the math against hand-written formulas, the shared random projections (drawn
from the PRNG key, held once, saved under peft's keys, following the model's dtype), the rules for several VeRA
adapters in one model, mixed-adapter batches, loading edge cases and the config's checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer
from tests.adapter_utils import (
    assert_close_scaled,
    assert_mixed_batch_equals_each_row_alone,
    logits,
    trainable_by_peft_name,
)
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes on save_projection / fan_in_fan_out


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Kaiming-uniform draws, written out: A then B from one CPU generator seeded with ``key``."""
    gen = torch.Generator().manual_seed(key)
    a = torch.empty(r, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=gen)
    b = torch.empty(max_out, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=gen)
    return a, b


def _randomise(model: nn.Module, seed: int) -> None:
    """Deterministic non-zero values for every trainable tensor, as training would give."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen))


def test_projections_are_drawn_from_the_prng_key_and_sized_to_the_largest_target() -> None:
    config = dt.VeraConfig(r=4, projection_prng_key=5, target_modules=["k_proj", "down_proj"])
    model = dt.get_peft_model(tiny_llama(), config)
    shared = model.base_model.shared_state["default"]
    a, b = _projections(5, 4, max_in=64, max_out=32)  # k_proj 32 -> 16, down_proj 64 -> 32
    torch.testing.assert_close(shared.vera_A, a, rtol=1e-6, atol=0)
    torch.testing.assert_close(shared.vera_B, b, rtol=1e-6, atol=0)


def test_linear_output_is_base_plus_scaled_corner_of_the_shared_projections() -> None:
    base = tiny_mlp()
    model = dt.get_peft_model(tiny_mlp(), dt.VeraConfig(r=6, target_modules=["lin0", "lin1", "head"]))
    _randomise(model, seed=0)
    a, b = _projections(0, 6, max_in=32, max_out=32)  # lin0 16 -> 32, lin1 32 -> 32, head 32 -> 3

    def layer(name: str, x: torch.Tensor) -> torch.Tensor:
        linear, delta = getattr(base, name), _layer(model, name).deltas["default"]
        a_l, b_l = a[:, : linear.in_features], b[: linear.out_features]
        return linear(x) + delta.vera_lambda_b * ((delta.vera_lambda_d * (x @ a_l.T)) @ b_l.T)

    x = make_mlp_inputs()["x"]
    with torch.no_grad():
        expected = layer("head", F.relu(layer("lin1", F.relu(layer("lin0", x)))))
    torch.testing.assert_close(logits(model, {"x": x}), expected, rtol=1e-5, atol=1e-6)


def test_conv1d_update_and_merge_use_the_transposed_weight_layout() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.VeraConfig(r=4, target_modules=["c_attn"]))
    _randomise(model, seed=1)
    layer = _layer(model, "transformer.h.0.attn.c_attn")  # Conv1D 32 -> 96, weight stored (32, 96)
    delta = layer.deltas["default"]
    a, b = _projections(0, 4, max_in=32, max_out=96)
    update = (delta.vera_lambda_b[:, None] * b) @ (delta.vera_lambda_d[:, None] * a)  # (96, 32)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ update.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        weight = layer.base_layer.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, weight + update.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert json.loads(model.peft_config["default"].to_json_string())["fan_in_fan_out"] is True


def test_default_init_has_zero_b_and_d_initial_and_init_false_is_non_zero() -> None:
    def q_proj_delta(config: dt.VeraConfig) -> nn.Module:
        return _layer(dt.get_peft_model(tiny_llama(), config), "model.layers.0.self_attn.q_proj").deltas["default"]

    delta = q_proj_delta(dt.VeraConfig(r=8, d_initial=0.3))
    assert torch.equal(delta.vera_lambda_b, torch.zeros(32)) and torch.equal(delta.vera_lambda_d, torch.full((8,), 0.3))
    torch.manual_seed(0)
    delta = q_proj_delta(dt.VeraConfig(r=8, init_weights=False))
    assert torch.equal(delta.vera_lambda_b, torch.ones(32))
    assert delta.vera_lambda_d.std() > 0.3


@pytest.mark.parametrize("save_projection", [True, False])
def test_projections_are_held_once_and_saved_once_under_peft_keys(save_projection: bool, tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8, save_projection=save_projection))
    shared = model.base_model.shared_state["default"]
    for _, layer in model.base_model.model.named_modules():
        if isinstance(layer, AdapterLayer):
            delta = layer.deltas["default"]
            assert delta.projections is shared
            assert set(delta.state_dict()) == {"vera_lambda_b", "vera_lambda_d"}
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    projection_keys = {"base_model.vera_A", "base_model.vera_B"}
    assert (keys & projection_keys == projection_keys) is save_projection
    assert all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in keys - projection_keys)
    assert len(keys - projection_keys) == 8  # q_proj and v_proj of two layers, two vectors each


def test_projections_follow_the_model_to_another_dtype() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8, init_weights=False))
    inputs = make_causal_lm_inputs(model)
    expected = logits(model, inputs)
    model.to(torch.float64)
    shared = model.base_model.shared_state["default"]
    assert shared.vera_A.dtype == shared.vera_B.dtype == torch.float64
    assert _layer(model, "model.layers.1.self_attn.v_proj").deltas["default"].projections is shared
    torch.testing.assert_close(logits(model, inputs), expected.double(), rtol=1e-5, atol=1e-5)


def test_a_half_precision_base_keeps_vectors_and_projections_in_float32() -> None:
    model = dt.get_peft_model(tiny_llama().to(torch.bfloat16), dt.VeraConfig(r=8, init_weights=False))
    delta = _layer(model, "model.layers.0.self_attn.q_proj").deltas["default"]
    assert delta.vera_lambda_d.dtype == delta.projections.vera_A.dtype == torch.float32
    inputs = make_causal_lm_inputs(model)
    unmerged = logits(model, inputs)
    assert unmerged.dtype == torch.bfloat16
    model.merge_adapter()
    assert_close_scaled(logits(model, inputs).float(), unmerged.float(), rel=0.05)


def test_later_adapters_share_the_first_adapters_projections_and_match_peft(tmp_path: Path) -> None:
    ours = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8, target_modules="all-linear"))
    ours.add_adapter("attn", dt.VeraConfig(r=8, target_modules=["k_proj"]))
    shared = ours.base_model.shared_state
    assert shared["attn"] is shared["default"]  # one pair, sized by the first adapter (64 -> 64)
    for name in ("default", "attn"):
        ours.set_adapter(name)
        _randomise(ours, seed=3)
    ours.save_pretrained(tmp_path)
    assert load_file(tmp_path / "attn/adapter_model.safetensors")["base_model.vera_A"].shape == (8, 64)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "attn", adapter_name="attn")
    inputs = make_causal_lm_inputs(ours)
    for name in ("default", "attn"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)
    ours.set_adapter("attn")
    ours.delete_adapter("default")
    assert list(ours.base_model.shared_state) == ["attn"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=4), "r=4 differs"),
        (dict(projection_prng_key=1), "projection_prng_key=1 differs"),
        (dict(save_projection=False), "save_projection=False differs"),
    ],
)
def test_adapters_that_disagree_on_the_shared_projections_are_refused(kwargs, message) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8))
    with pytest.raises(dt.ConfigError, match=message):
        model.add_adapter("other", dt.VeraConfig(**{"r": 8, **kwargs}))
    assert list(model.peft_config) == ["default"]
    assert list(_layer(model, "model.layers.0.self_attn.q_proj").deltas) == ["default"]


def test_a_later_adapter_with_a_layer_larger_than_the_shared_projections_is_refused() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8))  # q_proj / v_proj: projections 32 -> 32
    with pytest.raises(dt.TargetError, match="does not fit the shared VeRA projections"):
        model.add_adapter("mlp", dt.VeraConfig(r=8, target_modules=["up_proj"]))  # 32 -> 64
    assert list(model.peft_config) == ["default"]
    assert not isinstance(model.get_base_model().model.layers[0].mlp.up_proj, AdapterLayer)


def test_mixed_adapter_batch_rows_equal_each_adapter_alone() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.VeraConfig(r=8, target_modules=["c_attn", "c_fc"]))
    model.add_adapter("other", dt.VeraConfig(r=8, target_modules=["c_attn"]))
    _randomise(model, seed=4)
    model.set_adapter("other")
    _randomise(model, seed=5)
    inputs = make_causal_lm_inputs(model, batch=3)
    mixed = assert_mixed_batch_equals_each_row_alone(model, inputs, ["other", "__base__", "default"])
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3


def test_dropout_training_forward_and_gradients_equal_peft(tmp_path: Path) -> None:
    config = dt.VeraConfig(task_type="CAUSAL_LM", r=8, vera_dropout=0.3, init_weights=False)
    ours = dt.get_peft_model(tiny_llama(), config)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    batch = make_causal_lm_inputs(ours)
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        losses.append(model(**batch).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = [{n: p.grad for n, p in trainable_by_peft_name(m).items()} for m in (ours, theirs)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-6)


def test_bias_vera_only_trains_the_biases_of_adapted_layers_only() -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.VeraConfig(task_type="SEQ_CLS", r=4, bias="vera_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert not any("key" in n or "intermediate" in n for n in trainable)
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias" in model.adapter_state_dict()


def test_a_file_lacking_the_projections_its_config_promises_is_refused(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.vera_B"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(dt.AdapterLoadError, match="lacks 'base_model.vera_B'"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_projections_in_a_file_whose_config_regenerates_them_are_ignored_with_a_warning(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8, init_weights=False))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.vera_A"] = torch.zeros_like(tensors["base_model.vera_A"])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="ignoring 'base_model.vera_A'"):
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    inputs = make_causal_lm_inputs(model)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_an_absurd_rank_in_the_config_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=8, save_projection=False)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 10**9}))
    with pytest.raises(dt.AdapterLoadError, match="Nothing was allocated"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_vera_needs_the_peft_model_wrapper_for_its_shared_projections() -> None:
    with pytest.raises(dt.ConfigError, match="use get_peft_model"):
        dt.inject_adapter_in_model(dt.VeraConfig(r=8), tiny_llama())
    with pytest.raises(ValueError):  # peft refuses as well
        peft.inject_adapter_in_model(peft.VeraConfig(r=8), tiny_llama())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=True), "r must be a positive integer"),
        (dict(vera_dropout=1.0), "vera_dropout must be in"),
        (dict(bias="lora_only"), "bias must be 'none', 'all' or 'vera_only'"),
        (dict(projection_prng_key=1.5), "projection_prng_key must be an integer"),
        (dict(exclude_modules=["k_proj"]), "VeraConfig has no exclude_modules"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.VeraConfig(**kwargs)


def test_config_round_trips_with_peft_field_names_and_defaults() -> None:
    ours = dt.VeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]).to_dict()
    theirs = peft.VeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]).to_dict()
    assert set(ours) == set(theirs) - {"peft_version"}
    for field in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "bias", "init_weights"):
        assert ours[field] == theirs[field], field
    assert ours["peft_type"] == "VERA"
    config = dt.PeftConfig.from_dict({**ours, "r": 16, "save_projection": False})
    assert isinstance(config, dt.VeraConfig) and (config.r, config.save_projection) == (16, False)


def test_peft_refuses_the_same_multi_adapter_configurations() -> None:
    """The refusals above mirror peft's (r larger than the shared projections, another key, mixed saving)."""
    for kwargs in (dict(r=16), dict(projection_prng_key=1), dict(save_projection=False)):
        model = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8))
        with pytest.raises(ValueError):
            model.add_adapter("other", peft.VeraConfig(**{"r": 8, **kwargs}))

"""What is specific to IA3: the forward against its formula on every layer type, the merge math, config validation
and defaults, and mixed-adapter batches. (The shared matrix and the peft interop cases cover the rest.)"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer, adapter_layers
from deltatune.methods.ia3 import IA3Delta
from tests.adapter_utils import (
    assert_clearly_different,
    assert_close_scaled,
    assert_mixed_batch_equals_each_row_alone,
    logits,
    snapshot,
)
from tests.cases.ia3 import tiny_volnet
from tests.models import (
    make_causal_lm_inputs,
    make_convnet_inputs,
    make_seq2seq_inputs,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_t5,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes (fan_in_fan_out, unmerge accuracy)


@torch.no_grad()
def _randomise(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Give every IA3 vector of ``adapter`` distinct values around one, as training would."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        if adapter in layer.deltas:
            v = layer.deltas[adapter].ia3_l
            v.copy_(1 + 0.5 * torch.randn(v.shape, generator=gen))


def _layer(model: dt.PeftModel, path: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(path)
    assert isinstance(layer, AdapterLayer)
    return layer


def _convnet_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    inputs = make_convnet_inputs(batch)
    inputs.pop("labels")
    return inputs


# --- forward against the formula --------------------------------------------------------------------------------

def test_linear_scales_the_output_or_the_feedforward_input_with_peft_shapes() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    _randomise(model)
    lin0, lin1 = _layer(model, "lin0"), _layer(model, "lin1")
    l0, l1 = lin0.deltas["default"].ia3_l, lin1.deltas["default"].ia3_l
    assert l0.shape == (lin0.base_layer.out_features, 1) and l1.shape == (1, lin1.base_layer.in_features)
    x = torch.randn(3, 4, lin0.base_layer.in_features)
    w0, b0 = lin0.base_layer.weight, lin0.base_layer.bias
    torch.testing.assert_close(lin0(x), F.linear(x, w0, b0) * l0[:, 0])  # l ⊙ (W x + b)
    h = torch.randn(3, 4, lin1.base_layer.in_features)
    w1, b1 = lin1.base_layer.weight, lin1.base_layer.bias
    torch.testing.assert_close(lin1(h), F.linear(h * l1[0], w1, b1))  # W (l ⊙ x) + b


def test_gpt2_conv1d_scales_output_and_feedforward_input() -> None:
    config = dt.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])
    model = dt.get_peft_model(tiny_gpt2(), config)
    _randomise(model)
    assert model.peft_config["default"].fan_in_fan_out  # recorded as peft records it for Conv1D
    attn, fc = _layer(model, "transformer.h.0.attn.c_attn"), _layer(model, "transformer.h.0.mlp.c_fc")
    x = torch.randn(2, 5, 32)
    w, b = attn.base_layer.weight, attn.base_layer.bias  # (in, out)
    torch.testing.assert_close(attn(x), (x @ w + b) * attn.deltas["default"].ia3_l[:, 0])
    w, b = fc.base_layer.weight, fc.base_layer.bias
    torch.testing.assert_close(fc(x), (x * fc.deltas["default"].ia3_l[0]) @ w + b)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward-input"])
def test_conv2d_and_grouped_conv_and_conv3d_follow_the_formula(feedforward: bool) -> None:
    targets = ["conv3d", "grouped"]
    model = dt.get_peft_model(
        tiny_volnet(), dt.IA3Config(target_modules=targets, feedforward_modules=targets if feedforward else [])
    )
    _randomise(model)
    for path, x in [("conv3d", torch.randn(2, 2, 3, 4, 4)), ("grouped", torch.randn(2, 4, 5, 5))]:
        layer = _layer(model, path)
        conv, vector = layer.base_layer, layer.deltas["default"].ia3_l  # (1, C, 1, ...)
        channels = conv.in_channels if feedforward else conv.out_channels
        assert vector.shape == (1, channels, *([1] * (conv.weight.ndim - 2)))
        expected = conv(x * vector) if feedforward else conv(x) * vector
        torch.testing.assert_close(layer(x), expected)


def test_bert_output_dense_default_is_feedforward_for_both_dense_layers_by_peft_endswith_rule() -> None:
    from tests.models import tiny_bert

    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.IA3Config(task_type="SEQ_CLS"))
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == ["key", "output.dense", "value"]
    assert config.feedforward_modules == ["output.dense"]
    attention_out = _layer(model, "bert.encoder.layer.0.attention.output.dense")
    ffn_out = _layer(model, "bert.encoder.layer.0.output.dense")
    key = _layer(model, "bert.encoder.layer.0.attention.self.key")
    assert attention_out.deltas["default"].transforms_input and ffn_out.deltas["default"].transforms_input
    assert not key.deltas["default"].transforms_input
    assert ffn_out.deltas["default"].ia3_l.shape == (1, 64)  # the intermediate size: the input side


def test_two_active_adapters_multiply_their_vectors() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    model.add_adapter("b", dt.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    _randomise(model, "default", seed=0)
    _randomise(model, "b", seed=1)
    model.set_adapter(["default", "b"])
    for path, feedforward in [("lin0", False), ("lin1", True)]:
        layer = _layer(model, path)
        product = (layer.deltas["default"].ia3_l * layer.deltas["b"].ia3_l).flatten()
        x = torch.randn(3, layer.base_layer.in_features)
        base = layer.base_layer
        expected = base(x * product) if feedforward else base(x) * product
        torch.testing.assert_close(layer(x), expected)


# --- merging ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "factory, targets, feedforward, paths",
    [
        (tiny_mlp, ["lin0", "lin1"], ["lin1"], ["lin0", "lin1"]),
        (tiny_gpt2, ["c_attn", "c_fc"], ["c_fc"], ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]),
        (tiny_volnet, ["conv3d", "grouped", "head"], ["grouped"], ["conv3d", "grouped", "head"]),
        (tiny_volnet, ["conv3d", "grouped"], ["conv3d"], ["conv3d", "grouped"]),
    ],
    ids=["linear", "gpt2-conv1d", "conv3d-and-grouped-feedforward", "conv3d-feedforward"],
)
def test_merged_weights_equal_peft_merged_weights_and_unmerge_restores_them(
    factory, targets: list[str], feedforward: list[str], paths: list[str], tmp_path: Path
) -> None:
    ours = dt.get_peft_model(factory(), dt.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    base_weights = {p: snapshot(_layer(ours, p).base_layer) for p in paths}
    ours.merge_adapter()
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path).merge_and_unload()
    for path in paths:  # peft as the oracle of the merge math: W ⊙ l on rows / input columns, bias ⊙ l on outputs
        for key, value in _layer(ours, path).base_layer.state_dict().items():
            torch.testing.assert_close(value, theirs.get_submodule(path).state_dict()[key], msg=f"{path}.{key}")
        assert not torch.equal(_layer(ours, path).base_layer.weight, base_weights[path]["weight"])
    ours.unmerge_adapter()
    for path in paths:
        for key, value in _layer(ours, path).base_layer.state_dict().items():
            torch.testing.assert_close(value, base_weights[path][key], rtol=1e-6, atol=1e-7)


def test_feedforward_merge_leaves_the_bias_and_output_merge_scales_it() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    _randomise(model)
    lin0, lin1 = _layer(model, "lin0"), _layer(model, "lin1")
    w0, b0 = lin0.base_layer.weight.detach().clone(), lin0.base_layer.bias.detach().clone()
    w1, b1 = lin1.base_layer.weight.detach().clone(), lin1.base_layer.bias.detach().clone()
    l0, l1 = lin0.deltas["default"].ia3_l.detach(), lin1.deltas["default"].ia3_l.detach()  # (out, 1), (1, in)
    model.merge_adapter()
    torch.testing.assert_close(lin0.base_layer.weight, w0 * l0)
    torch.testing.assert_close(lin0.base_layer.bias, b0 * l0[:, 0])
    torch.testing.assert_close(lin1.base_layer.weight, w1 * l1)
    assert torch.equal(lin1.base_layer.bias, b1)


def test_two_merged_adapters_equal_both_active_and_unmerge_in_reverse() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("b", dt.IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                        feedforward_modules=["down_proj"]))
    _randomise(model, "default", seed=0)
    _randomise(model, "b", seed=1)
    model.set_adapter(["default", "b"])
    inputs = make_causal_lm_inputs(model)
    expected = logits(model, inputs)
    before = snapshot(model)
    model.merge_adapter()
    assert_close_scaled(logits(model, inputs), expected)
    model.unmerge_adapter()
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("feedforward", [[], ["lin0"]], ids=["output-side", "input-side"])
def test_unmerge_restores_weights_that_a_zero_entry_wiped_out(feedforward: list[str]) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.IA3Config(target_modules=["lin0"], feedforward_modules=feedforward))
    _randomise(model)
    with torch.no_grad():
        _layer(model, "lin0").deltas["default"].ia3_l.view(-1)[:2] = 0.0  # two channels switched off
    before = snapshot(model)
    model.merge_adapter()
    model.unmerge_adapter()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.isfinite(after[key]).all(), key
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_safe_merge_refuses_a_vector_that_would_put_inf_into_the_weights() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with torch.no_grad():
        _layer(model, "lin0").deltas["default"].ia3_l[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(dt.AdapterStateError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --- config ---------------------------------------------------------------------------------------------------------

def test_feedforward_modules_outside_target_modules_are_refused() -> None:
    with pytest.raises(dt.ConfigError, match=r"feedforward_modules \['up_proj'\] are not in target_modules"):
        dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj", "up_proj"])


def test_feedforward_modules_are_checked_again_once_default_targets_are_filled_in() -> None:
    model = tiny_llama()
    before = snapshot(model)
    config = dt.IA3Config(task_type="CAUSAL_LM", feedforward_modules=["up_proj"])  # targets: llama's default
    with pytest.raises(dt.ConfigError, match="up_proj"):
        dt.get_peft_model(model, config)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_feedforward_modules_are_checked_against_all_linear_once_expanded() -> None:
    config = dt.IA3Config(target_modules="all-linear", feedforward_modules=["mlp.down_proj"])  # not a leaf name
    with pytest.raises(dt.ConfigError, match="mlp.down_proj"):
        dt.get_peft_model(tiny_llama(), config)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["k_proj"], layers_to_transform=[0]), "layers_to_transform"),
        (dict(feedforward_modules="(unclosed"), "not a valid regular expression"),
    ],
    ids=["layers-to-transform", "bad-regex"],
)
def test_invalid_config_values_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(dt.ConfigError, match=match):
        dt.IA3Config(**kwargs)


def test_unknown_model_type_needs_explicit_feedforward_modules() -> None:
    with pytest.raises(dt.TargetError, match="no default feedforward_modules"):
        dt.get_peft_model(tiny_convnet(), dt.IA3Config(target_modules=["fc1"]))
    model = dt.get_peft_model(tiny_convnet(), dt.IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    assert model.peft_config["default"].feedforward_modules == []


def test_unsupported_layer_types_are_refused_before_the_model_changes() -> None:
    model = tiny_convnet()
    with pytest.raises(dt.TargetError, match="Conv1d"):
        dt.get_peft_model(model, dt.IA3Config(target_modules=["fc1", "conv1d"], feedforward_modules=[]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_default_feedforward_modules_keep_only_targets_so_peft_reads_the_file_back(tmp_path: Path) -> None:
    """peft fills the default feed-forward modules even where they are not targets, and then refuses its own file;
    deltatune keeps the default's targeted entries only, so the file loads in peft with the same outputs."""
    config = dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj"])
    ours = dt.get_peft_model(tiny_llama(), dt.IA3Config(**config))
    assert ours.peft_config["default"].feedforward_modules == []
    _randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert saved["feedforward_modules"] == [] and "layers_to_transform" not in saved
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    inputs = make_causal_lm_inputs(ours)
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)

    peft.get_peft_model(tiny_llama(), peft.IA3Config(**config)).save_pretrained(tmp_path / "theirs")
    with pytest.raises(dt.ConfigError, match=r"\['down_proj'\] are not in target_modules"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")


def test_a_file_with_layers_to_transform_is_refused(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_llama(), dt.IA3Config(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_to_transform": [0]}))
    with pytest.raises(dt.ConfigError, match="layers_to_transform"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_random_init_gives_a_non_identity_vector_and_a_different_output() -> None:
    inputs = make_seq2seq_inputs(tiny_t5())
    model = dt.get_peft_model(tiny_t5(), dt.IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False))
    vectors = [layer.deltas["default"].ia3_l for _, layer in adapter_layers(model)]
    assert all(not torch.equal(v, torch.ones_like(v)) for v in vectors)
    assert_clearly_different(logits(model, inputs), logits(tiny_t5(), inputs))


def test_half_precision_base_keeps_float32_vectors_and_its_own_output_dtype() -> None:
    model = dt.get_peft_model(tiny_llama().to(torch.bfloat16), dt.IA3Config(task_type="CAUSAL_LM"))
    _randomise(model)
    deltas = [layer.deltas["default"] for _, layer in adapter_layers(model)]
    assert {d.ia3_l.dtype for d in deltas} == {torch.float32}
    inputs = make_causal_lm_inputs(model)
    unmerged = logits(model, inputs)
    assert unmerged.dtype == torch.bfloat16
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=0.05, atol=0.05)


# --- mixed-adapter batches ------------------------------------------------------------------------------------------

def _mixed_equals_rows_alone(model: dt.PeftModel, batch: dict[str, torch.Tensor], names: list[str]) -> None:
    mixed = assert_mixed_batch_equals_each_row_alone(model, batch, names, rel=1e-5)
    assert_clearly_different(mixed[0], mixed[1])  # the rows really differ by adapter


def test_mixed_batch_with_output_and_feedforward_layers_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(task_type="CAUSAL_LM"))  # k, v (output) + down (input)
    model.add_adapter("up", dt.IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj", "down_proj"],
                                         feedforward_modules=["up_proj"]))
    _randomise(model, "default", seed=0)
    _randomise(model, "up", seed=1)
    names = ["up", "__base__", "default", "up"]
    _mixed_equals_rows_alone(model, make_causal_lm_inputs(model, batch=len(names)), names)


def test_mixed_batch_on_conv_layers_equals_each_row_alone() -> None:
    model = dt.get_peft_model(
        tiny_convnet(), dt.IA3Config(target_modules=["conv2d", "fc1"], feedforward_modules=["conv2d"])
    )
    model.add_adapter("out", dt.IA3Config(target_modules=["conv2d", "fc2"], feedforward_modules=[]))
    _randomise(model, "default", seed=0)
    _randomise(model, "out", seed=1)
    names = ["out", "default", "__base__"]
    _mixed_equals_rows_alone(model, _convnet_inputs(len(names)), names)


def test_output_side_groups_take_one_gathered_multiply(monkeypatch) -> None:
    calls: list[int] = []
    original = IA3Delta.batched_forward.__func__

    def counting(cls, groups, x, out, base_layer):
        calls.append(len(groups))
        return original(cls, groups, x, out, base_layer)

    monkeypatch.setattr(IA3Delta, "batched_forward", classmethod(counting))
    model = dt.get_peft_model(tiny_mlp(), dt.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.add_adapter("b", dt.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    _randomise(model, "default", seed=0)
    _randomise(model, "b", seed=1)
    x = {"x": torch.randn(3, _layer(model, "lin0").base_layer.in_features)}
    mixed = logits(model, x, adapter_names=["b", "default", "b"])
    assert calls == [2]  # one call for both adapters' groups
    model.set_adapter("b")
    torch.testing.assert_close(mixed[[0, 2]], logits(model, {"x": x["x"][[0, 2]]}))

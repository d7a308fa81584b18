"""BitFit and bottleneck adapters (``deltatune.methods.bitfit`` / ``bottleneck``): outputs against hand-written
formulas, BitFit's merge into the bias (and its refusal on bias-less layers), the bottleneck's refusal to merge, the
saved format, the configs' checks and mixed-adapter batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer, adapter_layers
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, assert_same_state, logits, snapshot
from tests.cases import perturb_adapter
from tests.models import (
    make_causal_lm_inputs,
    make_convnet_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
)

CAUSAL = dict(task_type="CAUSAL_LM")


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _biased_then_bias_free() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)).eval()


# --- BitFit ---------------------------------------------------------------------------------------------------------

def test_bitfit_adds_the_trained_bias_on_linear_conv1d_conv_and_layernorm() -> None:
    gpt2 = dt.get_peft_model(tiny_gpt2(), dt.BitFitConfig(**CAUSAL))
    convnet = dt.get_peft_model(tiny_convnet(), dt.BitFitConfig(target_modules=["conv2d", "conv1d", "fc1"]))
    perturb_adapter(gpt2)
    perturb_adapter(convnet)
    x = torch.randn(2, 5, 32)
    attn = _layer(gpt2, "transformer.h.0.attn.c_attn")  # Conv1D: weight (in, out)
    delta = attn.deltas["default"].bitfit_bias
    torch.testing.assert_close(attn(x), x @ attn.base_layer.weight + attn.base_layer.bias + delta)
    ln = _layer(gpt2, "transformer.h.0.ln_1")
    expected = F.layer_norm(x, (32,), ln.base_layer.weight, ln.base_layer.bias + ln.deltas["default"].bitfit_bias)
    torch.testing.assert_close(ln(x), expected)
    conv = _layer(convnet, "conv2d")
    image = make_convnet_inputs(2)["pixel_values"]
    expected = F.conv2d(image, conv.base_layer.weight, conv.base_layer.bias + conv.deltas["default"].bitfit_bias,
                        padding=1)
    torch.testing.assert_close(conv(image), expected)
    fc1 = _layer(convnet, "fc1")
    h = torch.randn(3, 16)
    torch.testing.assert_close(fc1(h), F.linear(h, fc1.base_layer.weight, fc1.base_layer.bias + fc1.deltas["default"]
                                                .bitfit_bias))


def test_bitfit_default_targets_every_biased_layer_and_only_bias_deltas_train() -> None:
    base = tiny_bert("seq_cls")
    biased = sorted(n for n, m in base.named_modules()
                    if isinstance(getattr(m, "bias", None), torch.Tensor) and n != "classifier")
    model = dt.get_peft_model(base, dt.BitFitConfig(task_type="SEQ_CLS"))
    assert sorted(n for n, _ in adapter_layers(model.get_base_model())) == biased
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    bitfit = {n: k for n, k in trainable.items() if n.endswith(".deltas.default.bitfit_bias")}
    assert set(trainable) - set(bitfit) == {"base_model.model.classifier.modules_to_save.default.weight",
                                            "base_model.model.classifier.modules_to_save.default.bias"}
    assert sum(bitfit.values()) == sum(tiny_bert("seq_cls").get_submodule(n).bias.numel() for n in biased)
    with pytest.raises(dt.TargetError, match="no default target_modules for model type 'llama'"):
        dt.get_peft_model(tiny_llama(), dt.BitFitConfig(**CAUSAL))


def test_bitfit_merge_folds_the_delta_into_the_bias_and_leaves_weights_alone() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.BitFitConfig(**CAUSAL))
    perturb_adapter(model)
    inputs = make_causal_lm_inputs(model)
    unmerged, before = logits(model, inputs), snapshot(model)
    attn = _layer(model, "transformer.h.1.attn.c_attn")
    bias, weight = attn.base_layer.bias.clone(), attn.base_layer.weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(attn.base_layer.bias, bias + attn.deltas["default"].bitfit_bias, rtol=0, atol=0)
    assert torch.equal(attn.base_layer.weight, weight)
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6, msg=key)


def test_bitfit_on_a_bias_free_layer_runs_but_merging_raises_before_anything_changes() -> None:
    model = dt.get_peft_model(_biased_then_bias_free(), dt.BitFitConfig(target_modules=["0", "2"]))
    perturb_adapter(model)
    head = _layer(model, "2")
    h = torch.randn(4, 8)
    torch.testing.assert_close(head(h), F.linear(h, head.base_layer.weight) + head.deltas["default"].bitfit_bias)
    x = torch.randn(4, 6)
    out, before = model(x), snapshot(model)
    # layer "0" (biased) comes first: without the up-front check it would be merged before "2" refuses
    for merge in (model.merge_adapter, lambda: model.merge_adapter(safe_merge=True), model.merge_and_unload):
        with pytest.raises(dt.AdapterStateError, match="into 2: this Linear has no bias"):
            merge()
        assert_same_state(before, model)
        assert not any(layer.merged for _, layer in adapter_layers(model))
    assert torch.equal(model(x), out)
    with pytest.raises(dt.AdapterStateError, match="no bias"):
        head.merge(["default"])  # the layer itself refuses too, rather than marking a delta merged that is not
    assert not head.merged


def test_bitfit_keeps_a_float32_delta_beside_a_half_precision_base() -> None:
    model = dt.get_peft_model(tiny_gpt2().to(torch.bfloat16), dt.BitFitConfig(**CAUSAL))
    delta = _layer(model, "transformer.h.0.mlp.c_fc").deltas["default"].bitfit_bias
    assert delta.dtype == torch.float32 and torch.equal(delta, torch.zeros_like(delta))
    out = model(**make_causal_lm_inputs(model)).logits
    assert out.dtype == torch.bfloat16


# --- bottleneck -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act, fn", [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)])
def test_bottleneck_output_is_h_plus_scaled_up_act_down_h(act: str, fn) -> None:
    config = dt.BottleneckConfig(**CAUSAL, bottleneck_size=4, non_linearity=act, scaling=0.5)
    model = dt.get_peft_model(tiny_gpt2(), config)
    perturb_adapter(model)
    for name in ("transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj"):  # the default (Houlsby) targets
        layer = _layer(model, name)
        delta = layer.deltas["default"]
        x = torch.randn(2, 5, layer.base_layer.weight.shape[0])
        h = x @ layer.base_layer.weight + layer.base_layer.bias  # Conv1D
        down = F.linear(h, delta.adapter_down.weight, delta.adapter_down.bias)
        expected = h + 0.5 * F.linear(fn(down), delta.adapter_up.weight, delta.adapter_up.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_bottleneck_saved_keys_shapes_config_and_identity_init(tmp_path: Path) -> None:
    config = dt.BottleneckConfig(**CAUSAL, bottleneck_size=4, target_modules=["down_proj"], non_linearity="gelu")
    model = dt.get_peft_model(tiny_llama(), config)
    delta = _layer(model, "model.layers.0.mlp.down_proj").deltas["default"]
    assert not delta.adapter_up.weight.any() and not delta.adapter_up.bias.any() and delta.adapter_down.weight.any()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.{}.mlp.down_proj.adapter_"
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        prefix.format(i) + key: shape
        for i in range(2)
        for key, shape in [("down.weight", (4, 32)), ("down.bias", (4,)), ("up.weight", (32, 4)), ("up.bias", (32,))]
    }
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "BOTTLENECK" and written["bottleneck_size"] == 4
    loaded = dt.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, dt.BottleneckConfig) and loaded.non_linearity == "gelu"


def test_bottleneck_merge_raises_and_changes_nothing_even_beside_a_mergeable_adapter() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**CAUSAL, init_lora_weights=False), adapter_name="lora")
    model.add_adapter("bn", dt.BottleneckConfig(**CAUSAL, bottleneck_size=4))
    perturb_adapter(model, "bn")
    model.set_adapter(["lora", "bn"])
    inputs = make_causal_lm_inputs(model)
    out, before = logits(model, inputs), snapshot(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(dt.AdapterStateError, match="'bn' into model.layers.0.self_attn.o_proj: bottleneck"):
            merge()
        assert_same_state(before, model)  # the LoRA layers were not merged and rolled back: never touched
    assert isinstance(model, dt.PeftModel) and torch.equal(logits(model, inputs), out)
    expected = snapshot(tiny_llama())
    assert_same_state(expected, model.unload())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bottleneck_size=0), "bottleneck_size must be a positive integer"),
        (dict(non_linearity="swish"), r"non_linearity must be one of \['gelu', 'relu', 'silu', 'tanh'\]"),
        (dict(adapter_dropout=1.0), r"adapter_dropout must be in \[0, 1\)"),
        (dict(scaling=math.nan), "scaling must be a finite number"),
    ],
)
def test_bottleneck_config_errors(kwargs, message: str) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.BottleneckConfig(**kwargs)


def test_bottleneck_dropout_acts_only_in_training() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig(**CAUSAL, bottleneck_size=4, adapter_dropout=0.5))
    perturb_adapter(model)
    layer = _layer(model, "model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, 64)
    assert torch.equal(layer(x), layer(x))
    model.train()
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.equal(first, layer(x))
    torch.manual_seed(0)
    assert torch.equal(layer(x), first)


# --- mixed-adapter batches -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "config",
    [
        dt.BitFitConfig(task_type="SEQ_CLS"),
        dt.BottleneckConfig(task_type="SEQ_CLS", bottleneck_size=4),
    ],
    ids=["bitfit", "bottleneck"],
)
def test_mixed_adapter_batch_rows_equal_each_adapter_alone(config) -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), config, adapter_name="a")
    model.add_adapter("b", config)
    for seed, name in enumerate("ab"):
        perturb_adapter(model, name, seed=seed, std=1.0)
    inputs = make_seq_cls_inputs(model, batch=3)
    inputs.pop("labels")
    mixed = assert_mixed_batch_equals_each_row_alone(model, inputs, ["b", "__base__", "a"], atol=1e-6)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-4

"""MiSS (``deltatune.methods.miss``): each variant's output and merged weight against the weight update written out
entry by entry (balance, mini, a padded partial shard) or block by block (bat), bat's unmerge, mixed-adapter batches
and the config's checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_mlp


def _layer(model: dt.PeftModel, name: str = "lin1") -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _randomised(name: str = "lin1", **kwargs) -> AdapterLayer:
    layer = _layer(dt.get_peft_model(tiny_mlp(), dt.MissConfig(target_modules=[name], **kwargs)), name)
    with torch.no_grad():
        layer.deltas["default"].miss_block.normal_()
    return layer


def _check(layer: AdapterLayer, expected_weight: torch.Tensor) -> None:
    """The layer's output and merged weight equal ``expected_weight``'s; unmerging restores the base weight."""
    base = layer.base_layer
    x = torch.randn(4, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.T + base.bias, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, expected_weight, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, r", [("lin1", 8), ("lin0", 5)])  # lin0 reads 16 features: 5 leaves a partial shard
def test_balance_adds_the_shard_to_every_input_block(name: str, r: int) -> None:
    layer = _randomised(name, r=r)
    d, w = layer.deltas["default"].miss_block.detach(), layer.base_layer.weight.detach()
    expected = w.clone()
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            expected[o, i] += d[i % r, o]
    _check(layer, expected)


def test_mini_tiles_the_shard_along_the_output() -> None:
    layer = _randomised(r=4, init_weights="mini", mini_r=8)
    d, w = layer.deltas["default"].miss_block.detach(), layer.base_layer.weight.detach()
    assert d.shape == (4, 8)
    expected = w.clone()
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            expected[o, i] += d[i % 4, o % 8]
    _check(layer, expected)


def test_bat_applies_one_affine_map_per_output_block() -> None:
    layer = _randomised(r=8, init_weights="bat")
    with torch.no_grad():
        layer.deltas["default"].miss_block.mul_(0.1)  # keep I + B well conditioned
    b, w = layer.deltas["default"].miss_block.detach(), layer.base_layer.weight.detach()
    assert b.shape == (4, 8, 8)
    expected = w.clone()
    for i in range(4):
        for j in range(4):
            block = w[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8]
            expected[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8] = block @ (torch.eye(8) + b[i]) + b[i]
    _check(layer, expected)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.MissConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False))
    model.add_adapter("bat", dt.MissConfig(target_modules=["lin1"], r=8, init_weights="bat"))
    with torch.no_grad():
        _layer(model).deltas["bat"].miss_block.normal_(std=0.1)
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "bat"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(mini_r=-1), "mini_r must be a positive integer"),
        (dict(miss_dropout=1.0), "miss_dropout must be in"),
        (dict(init_weights="gaussian"), "init_weights must be"),
        (dict(init_weights=1), "init_weights must be"),
        (dict(bias="lora_only"), "bias must be"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.MissConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=33), "exceeds its in_features"),
        (dict(r=5, init_weights="bat"), "r=5 must divide its in_features=32 and out_features=32"),
        (dict(r=4, init_weights="mini", mini_r=5), "mini_r=5 must divide its out_features=32"),
    ],
)
def test_layers_the_blocks_do_not_fit_are_refused_before_the_model_changes(kwargs, match: str) -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match=match):
        dt.get_peft_model(model, dt.MissConfig(target_modules=["lin1"], **kwargs))
    assert isinstance(model.lin1, nn.Linear)

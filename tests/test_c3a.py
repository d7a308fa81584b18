"""C3A (``deltatune.methods.c3a``): the FFT forward and the merged weight against the block-circulant matrix written
out entry by entry, the three random inits' ranges, ``block_size_pattern``, several active adapters, mixed-adapter
batches and the config's checks."""

from __future__ import annotations

import math

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


def _circulant_update(kernel: torch.Tensor) -> torch.Tensor:
    """``ΔW[i·b+t, j·b+s] = w_ij[(s − t) mod b] / in``, entry by entry."""
    out_blocks, in_blocks, b = kernel.shape
    weight = torch.zeros(out_blocks * b, in_blocks * b, dtype=torch.float64)
    for i in range(out_blocks):
        for j in range(in_blocks):
            for t in range(b):
                for s in range(b):
                    weight[i * b + t, j * b + s] = kernel[i, j, (s - t) % b]
    return weight / (in_blocks * b)


@pytest.mark.parametrize("name, b", [("lin1", 8), ("lin0", 16), ("lin1", 1)])
def test_output_and_merged_weight_equal_the_written_out_circulant_blocks(name: str, b: int) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.C3AConfig(target_modules=[name], block_size=b, init_weights="gaussian"))
    layer = _layer(model, name)
    base, kernel = layer.base_layer, layer.deltas["default"].c3a_kernel.detach()
    assert kernel.shape == (32 // b, base.in_features // b, b)
    expected_weight = (base.weight.double() + _circulant_update(kernel)).float().detach()
    x = torch.randn(4, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.T + base.bias, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, expected_weight, rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "init, bound",
    [("xavier_uniform", math.sqrt(3 * 2 / 64)), (False, math.sqrt(3 * 2 / 64)), ("kaiming_uniform", math.sqrt(1 / 32))],
)
def test_uniform_inits_fill_their_range(init, bound: float) -> None:
    torch.manual_seed(0)
    layer = _layer(dt.get_peft_model(tiny_mlp(), dt.C3AConfig(target_modules=["lin1"], block_size=1,
                                                               init_weights=init)))
    kernel = layer.deltas["default"].c3a_kernel  # 1024 draws
    assert kernel.abs().max() <= bound and kernel.abs().max() > 0.95 * bound


def test_zero_init_is_the_base_model_and_pattern_sets_block_sizes() -> None:
    config = dt.C3AConfig(target_modules=["lin0", "lin1"], block_size=8, block_size_pattern={"lin0": 16},
                          init_weights=True)
    model = dt.get_peft_model(tiny_mlp(), config)
    assert _layer(model, "lin0").deltas["default"].c3a_kernel.shape == (2, 1, 16)
    assert _layer(model, "lin1").deltas["default"].c3a_kernel.shape == (4, 4, 8)
    x = make_mlp_inputs(3)["x"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_mlp()(x), rtol=0, atol=0)


def test_two_active_adapters_each_read_the_layer_input() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.C3AConfig(target_modules=["lin1"], block_size=8, init_weights="gaussian"))
    model.add_adapter("other", dt.C3AConfig(target_modules=["lin1"], block_size=4, init_weights="gaussian"))
    model.set_adapter(["default", "other"])
    layer = _layer(model)
    base = layer.base_layer
    x = torch.randn(3, 32)
    expected = base.weight.double().detach()
    for name in ("default", "other"):
        expected = expected + _circulant_update(layer.deltas[name].c3a_kernel.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.float().T + base.bias, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.C3AConfig(target_modules=["lin0", "lin1"], block_size=16))
    model.add_adapter("small", dt.C3AConfig(target_modules=["lin1"], block_size=2, init_weights="gaussian"))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "small"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(block_size_pattern={"q": -1}), r"block_size_pattern\['q'\] must be a positive integer"),
        (dict(block_size_pattern=[("q", 2)]), "block_size_pattern must be a dict"),
        (dict(block_size_pattern={"(": 2}), "block_size_pattern key"),
        (dict(init_weights="orthogonal"), "init_weights must be"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(exclude_modules=["q"]), "has no exclude_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.C3AConfig(**kwargs)


def test_a_block_size_that_does_not_divide_the_layer_is_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="lin0: block_size=32 must divide its in_features=16 and out_features=32"):
        dt.get_peft_model(model, dt.C3AConfig(target_modules=["lin0", "lin1"], block_size=32))
    assert isinstance(model.lin0, nn.Linear) and isinstance(model.lin1, nn.Linear)

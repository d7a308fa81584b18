"""HRA (``deltatune.methods.hra``): the reflections against explicitly built Householder matrices (orthogonal, equal
to the merged weight), Gram-Schmidt against a QR factorisation, the Conv2d kernel, the paired init, mixed-adapter
batches and the config's checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_convnet, tiny_mlp


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _householder_product(u: torch.Tensor) -> torch.Tensor:
    """``H₁ H₂ ⋯ H_r`` with ``H_i = I − 2 u_i u_iᵀ / (u_iᵀ u_i)``, each written out as a matrix (float64)."""
    u = u.double()
    product = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        col = u[:, i : i + 1]
        product = product @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * col @ col.T / (col.T @ col))
    return product


@pytest.mark.parametrize("r", [1, 3, 8])
def test_linear_output_and_merged_weight_equal_w_times_the_householder_product(r: int) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.HRAConfig(target_modules=["lin1"], r=r, init_weights=False))
    layer = _layer(model, "lin1")
    delta, base = layer.deltas["default"], layer.base_layer
    product = _householder_product(delta.hra_u.detach())
    torch.testing.assert_close(product @ product.T, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)
    expected_weight = base.weight.double() @ product
    x = torch.randn(5, 32)
    expected = (x.double() @ expected_weight.T + base.bias.double()).float()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight.double(), expected_weight, rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)


def test_gram_schmidt_variant_is_one_reflection_through_the_orthonormalised_span() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.HRAConfig(target_modules=["lin1"], r=4, apply_GS=True, init_weights=False))
    layer = _layer(model, "lin1")
    u = layer.deltas["default"].hra_u.detach().double()
    q, _ = torch.linalg.qr(u)  # same span and orthonormal: Q Qᵀ does not depend on the columns' signs
    reflection = torch.eye(32, dtype=torch.float64) - 2 * q @ q.T
    with torch.no_grad():
        layer.merge(["default"])
    torch.testing.assert_close(
        layer.base_layer.weight.double(), tiny_mlp().lin1.weight.double() @ reflection, rtol=1e-5, atol=1e-6
    )


def test_conv2d_uses_the_flattened_kernel_times_the_product() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.HRAConfig(target_modules=["conv2d"], r=4, init_weights=False))
    layer = _layer(model, "conv2d")
    base = layer.base_layer
    product = _householder_product(layer.deltas["default"].hra_u.detach()).float()
    kernel = (base.weight.flatten(1) @ product).view(base.weight.shape)  # (out, C·k·k) @ R
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, kernel, base.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_even_rank_init_pairs_reflections_that_cancel_and_odd_rank_warns() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.HRAConfig(target_modules=["lin1"], r=6))
    u = _layer(model, "lin1").deltas["default"].hra_u.detach()
    torch.testing.assert_close(u[:, 0::2], u[:, 1::2], rtol=0, atol=0)
    torch.testing.assert_close(_householder_product(u), torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="odd r=3"):
        dt.get_peft_model(tiny_mlp(), dt.HRAConfig(target_modules=["lin1"], r=3))


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.HRAConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False))
    model.add_adapter("other", dt.HRAConfig(target_modules=["lin1"], r=2, apply_GS=True, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(apply_GS="yes"), "apply_GS must be True or False"),
        (dict(bias="lora_only"), "bias must be"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.HRAConfig(**kwargs)


def test_unsupported_targets_are_refused_before_the_model_changes() -> None:
    grouped = tiny_mlp()
    grouped.lin0 = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(TargetError, match="grouped convolution"):
        dt.get_peft_model(grouped, dt.HRAConfig(target_modules=["lin0"]))
    wide = tiny_mlp()
    wide.lin0 = nn.Conv2d(4, 4, (1, 3))
    with pytest.raises(TargetError, match="square kernels"):
        dt.get_peft_model(wide, dt.HRAConfig(target_modules=["lin0"]))
    with pytest.raises(TargetError, match="apply_GS"):
        dt.get_peft_model(tiny_mlp(), dt.HRAConfig(target_modules=["lin1"], r=33, apply_GS=True))
    with pytest.raises(TargetError):
        dt.get_peft_model(tiny_convnet(), dt.HRAConfig(target_modules=["conv1d"]))

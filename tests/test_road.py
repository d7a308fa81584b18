"""RoAd (``deltatune.methods.road``): each variant's output, merged weight and bias against the dense rotation
matrix written out pair by pair, unmerging with scales (not orthogonal), mixed-adapter batches and the config's
checks."""

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


def _dense(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor, out: int) -> torch.Tensor:
    """``R`` ``(out, out)``: feature ``i`` of a group pairs with ``i + g/2``; the pair's matrix is
    ``[[c_i, −s_i], [s_j, c_j]]`` with ``c = α cos θ``, ``s = α sin θ`` read per variant (paper eq. 4, peft's
    layout)."""
    r = torch.zeros(out, out, dtype=torch.float64)

    def cs(k: int) -> tuple[float, float]:
        group, pos = divmod(k, g)
        if variant == "road_1":  # one value per pair, shared by both halves
            idx = group * (g // 2) + pos % (g // 2)
            return alpha[idx] * math.cos(theta[idx]), alpha[idx] * math.sin(theta[idx])
        if variant == "road_2":
            return alpha[k] * math.cos(theta[k]), alpha[k] * math.sin(theta[k])
        c_idx, s_idx = group * 2 * g + pos, group * 2 * g + g + pos  # road_4: g for c, then g for s
        return alpha[c_idx] * math.cos(theta[c_idx]), alpha[s_idx] * math.sin(theta[s_idx])

    for group in range(out // g):
        for p in range(g // 2):
            i, j = group * g + p, group * g + g // 2 + p
            (ci, si), (cj, sj) = cs(i), cs(j)
            r[i, i], r[i, j], r[j, i], r[j, j] = ci, -si, sj, cj
    return r


@pytest.mark.parametrize("variant, g, size", [("road_1", 8, 16), ("road_2", 4, 32), ("road_4", 16, 64)])
def test_output_merged_weight_and_bias_equal_the_dense_rotation(variant: str, g: int, size: int) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.RoadConfig(target_modules=["lin1"], variant=variant, group_size=g))
    layer = _layer(model)
    base, delta = layer.base_layer, layer.deltas["default"]
    assert delta.road_theta.shape == delta.road_alpha.shape == (size,)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # fresh: the identity
        delta.road_theta.normal_(0.0, 0.5)
        delta.road_alpha.normal_(1.0, 0.5)
        r = _dense(variant, g, delta.road_theta.double().tolist(), delta.road_alpha.double().tolist(), 32)
        w, b = base.weight.double(), base.bias.double()
        expected = ((x.double() @ w.T + b) @ r.T).float()  # R (W x + b)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        original_w, original_b = base.weight.clone(), base.bias.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, (r @ w).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base.bias, (r @ b).float(), rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(base.bias, original_b, rtol=1e-4, atol=1e-5)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.RoadConfig(target_modules=["lin0", "lin1"], group_size=8,
                                                        init_weights=False))
    model.add_adapter("four", dt.RoadConfig(target_modules=["lin1"], variant="road_4", group_size=4,
                                            init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "four"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="road_3"), "variant must be"),
        (dict(group_size=0), "group_size must be a positive integer"),
        (dict(group_size=7), "group_size must be even"),
        (dict(init_weights="x"), "init_weights must be"),
        (dict(exclude_modules=["q"]), "has no exclude_modules"),
        (dict(layers_to_transform=[0]), "has no layers_to_transform"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.RoadConfig(**kwargs)


def test_a_group_size_that_does_not_divide_the_output_is_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="group_size=12 must divide its out_features=32"):
        dt.get_peft_model(model, dt.RoadConfig(target_modules=["lin1"], group_size=12))
    assert isinstance(model.lin1, nn.Linear)

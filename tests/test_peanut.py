"""PEANuT (``deltatune.methods.peanut``): the update against the network written out (with and without encoder /
decoder layers), the forward reading the current weight, two merged adapters each reading the pre-merge weight
against peft's merge, mixed batches and the config's checks."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError
from tests.adapter_utils import assert_merges_from_original_as_peft, assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_mlp


def _network(delta, weight: torch.Tensor) -> torch.Tensor:
    """The update written out for depth 0, 1 or 2 with the activation of ``delta``."""
    act, s = delta.act, delta.scaling
    a, b = delta.peanut_A.weight.detach(), delta.peanut_B.weight.detach()
    enc = [e.weight.detach() for e in delta.peanut_encoders]
    dec = [d.weight.detach() for d in delta.peanut_decoders]
    h0 = act(weight.T @ a.T)  # (in, r)
    if not enc:
        return s * (h0 @ b.T).T
    if len(enc) == 1:
        g = act(act(h0 @ enc[0].T) @ dec[0].T) + h0
        return s * (g @ b.T).T
    h1 = act(h0 @ enc[0].T)
    h2 = act(h1 @ enc[1].T)
    g1 = act(h2 @ dec[0].T) + h1
    g2 = act(g1 @ dec[1].T) + h0
    return s * (g2 @ b.T).T


@pytest.mark.parametrize("kwargs", [dict(), dict(depth=1, act_fn="gelu"), dict(depth=2, act_fn="tanh", scaling=0.3)],
                         ids=["depth0", "depth1-gelu", "depth2-tanh"])
def test_output_equals_the_network_written_out(kwargs) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.PeanutConfig(target_modules=["lin1"], r=4, init_weights=False, **kwargs))
    layer = model.get_base_model().lin1
    base, delta = layer.base_layer, layer.deltas["default"]
    update = _network(delta, base.weight.detach())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ update.T, rtol=1e-5, atol=1e-6)
        assert update.abs().max() > 1e-3


def test_two_merged_adapters_each_read_the_pre_merge_weight_as_peft(tmp_path) -> None:
    ours = dt.get_peft_model(tiny_mlp(), dt.PeanutConfig(target_modules=["lin1"], r=4, init_weights=False))
    ours.add_adapter("other", dt.PeanutConfig(target_modules=["lin1"], r=2, depth=1, init_weights=False))
    assert_merges_from_original_as_peft(ours, tiny_mlp, {"x": make_mlp_inputs()["x"]}, tmp_path)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.PeanutConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    model.add_adapter("other", dt.PeanutConfig(target_modules=["lin1"], r=3, depth=2, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(depth=-1), "depth must be a non-negative integer"),
        (dict(act_fn="swish2"), "act_fn must be one of"),
        (dict(scaling=float("nan")), "scaling must be a finite number"),
        (dict(init_weights=1), "init_weights must be"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.PeanutConfig(**kwargs)

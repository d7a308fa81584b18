"""BEFT (``deltatune.methods.beft``): the added bias against ``W x + b + Δb`` written out, merging into the bias,
the refused merge of a layer without a bias (model unchanged), peft's default targets, several active adapters,
mixed-adapter batches and the config's checks."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterStateError, ConfigError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_llama, tiny_mlp


def _layer(model: dt.PeftModel, name: str = "lin1") -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def test_output_adds_the_bias_and_merging_folds_it_into_the_layer_bias() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.BeftConfig(target_modules=["lin1"], init_weights=False))
    layer = _layer(model)
    base, delta = layer.base_layer, layer.deltas["default"].beft_bias.detach()
    assert delta.shape == (1, 32)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ base.weight.T + base.bias + delta[0], rtol=1e-6, atol=1e-6)
        weight, bias = base.weight.clone(), base.bias.clone()
        layer.merge(["default"])
        assert torch.equal(base.weight, weight)
        torch.testing.assert_close(base.bias, bias + delta[0], rtol=0, atol=1e-7)
        layer.unmerge()
        torch.testing.assert_close(base.bias, bias, rtol=0, atol=1e-7)


def test_two_active_adapters_add_both_biases() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.BeftConfig(target_modules=["lin1"], init_weights=False))
    model.add_adapter("other", dt.BeftConfig(target_modules=["lin1"], init_weights=False))
    model.set_adapter(["default", "other"])
    layer = _layer(model)
    x = torch.randn(2, 32)
    total = layer.deltas["default"].beft_bias[0] + layer.deltas["other"].beft_bias[0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + total, rtol=1e-6, atol=1e-6)


def test_default_targets_are_the_value_projections_and_an_unbiased_layer_refuses_to_merge() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.BeftConfig(task_type="CAUSAL_LM", init_weights=False))
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdapterLayer)})
    assert adapted == ["v_proj"]
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(AdapterStateError, match="has no bias to fold BEFT's bias delta into"):
        model.merge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.BeftConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.add_adapter("other", dt.BeftConfig(target_modules=["lin1"], init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_weights="zeros"), "init_weights must be"),
        (dict(exclude_modules=["q"]), "has no exclude_modules"),
        (dict(layers_to_transform=[0]), "has no layers_to_transform"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.BeftConfig(**kwargs)

"""GLoRA (``deltatune.methods.glora``): output and merge against ``W0 + W0 ⊙ A + B`` / ``b0 + b0 ⊙ D + E + W0 C``
written out per entry, several adapters merged from the weight before any merge (``Delta.merges_from_original``,
also against peft's merge), peft's zero placeholders, mixed-adapter batches and the config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_merges_from_original_as_peft, assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_mlp


def _layer(model: dt.PeftModel, name: str = "lin1") -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _effective(delta, w0: torch.Tensor, b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W'`` and ``b'`` entry by entry, in float64, from the delta's raw parameters (lora A/B/C, vector D/E)."""
    w0, b0 = w0.double(), b0.double()
    a = delta.glora_A.Xd.double() @ delta.glora_A.Xu.double()
    b = delta.glora_B.Xd.double() @ delta.glora_B.Xu.double()
    c = (delta.glora_C.Xd.double() @ delta.glora_C.Xu.double())[:, 0]  # (in,)
    d, e = delta.glora_D.X.double(), delta.glora_E.X.double()
    weight = torch.empty_like(w0)
    bias = torch.empty_like(b0)
    for o in range(w0.shape[0]):
        for i in range(w0.shape[1]):
            weight[o, i] = w0[o, i] + w0[o, i] * a[o, i] + b[o, i]
        bias[o] = b0[o] + b0[o] * d[o] + e[o] + sum(w0[o, i] * c[i] for i in range(w0.shape[1]))
    return weight, bias


def _biased_mlp() -> nn.Module:
    base = tiny_mlp()
    with torch.no_grad():
        base.lin1.bias.uniform_(-1, 1)  # a non-zero bias, so that b0 ⊙ D shows (seeded: tiny_mlp seeds torch)
    return base


def _model(**kwargs) -> dt.PeftModel:
    config = dt.GloraConfig(target_modules=["lin1"], r=3, config_D_E="vector", init_weights=False, **kwargs)
    return dt.get_peft_model(_biased_mlp(), config)


def test_output_and_merged_weight_and_bias_equal_the_formula() -> None:
    model = _model()
    layer = _layer(model)
    base, delta = layer.base_layer, layer.deltas["default"]
    weight, bias = _effective(delta, base.weight.detach(), base.bias.detach())
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), (x.double() @ weight.T + bias).float(), rtol=1e-5, atol=1e-5)
        original = base.weight.clone(), base.bias.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, weight.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(base.bias, bias.float(), rtol=1e-5, atol=1e-6)
        layer.unmerge()
        assert torch.equal(base.weight, original[0]) and torch.equal(base.bias, original[1])


def test_fresh_adapter_is_the_base_layer_in_every_form() -> None:
    x = make_mlp_inputs(3)["x"]
    for forms in [dict(), dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
                  dict(config_A_B="constant", config_C="none", config_D_E="constant")]:
        model = dt.get_peft_model(tiny_mlp(), dt.GloraConfig(target_modules=["lin0", "lin1"], **forms))
        with torch.no_grad():
            assert torch.equal(model(x), tiny_mlp()(x)), forms


def test_several_merged_adapters_each_read_the_weight_before_any_merge(tmp_path: Path) -> None:
    model = _model()
    model.add_adapter("other", dt.GloraConfig(target_modules=["lin1"], config_A_B="vector", init_weights=False))
    layer = _layer(model)
    base = layer.base_layer
    original = base.weight.detach().clone(), base.bias.detach().clone()
    model.set_adapter(["default", "other"])
    x = torch.randn(4, 32)
    with torch.no_grad():
        both = layer(x)
        first = layer.deltas["default"].updates(*original)
        second = layer.deltas["other"].updates(*original)
        expected = x @ (original[0] + first[0] + second[0]).T + original[1] + first[1] + second[1]
        torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        assert layer.merged_adapters == ["default", "other"]
        torch.testing.assert_close(layer(x), both, rtol=1e-5, atol=1e-5)
        layer.unmerge(keep=1)  # back to W0, then "default" merged again
        torch.testing.assert_close(base.weight, original[0] + first[0], rtol=1e-6, atol=1e-6)
        model.unmerge_adapter()
        assert torch.equal(base.weight, original[0]) and torch.equal(base.bias, original[1])
    assert_merges_from_original_as_peft(model, _biased_mlp, {"x": make_mlp_inputs()["x"]}, tmp_path)


def test_absent_parts_are_peft_zero_placeholders_and_a_non_zero_one_is_refused(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.GloraConfig(target_modules=["lin1"], config_A_B="none", config_C="none",
                                                         init_weights=False))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.lin1.glora_A.zeros"].shape == (32, 32)
    assert saved["base_model.model.lin1.glora_C.zeros"].shape == (32, 1)
    assert not any(name.endswith("zeros") for name, _ in model.named_buffers())  # not kept in memory
    saved["base_model.model.lin1.glora_B.zeros"][0, 0] = 1.0
    save_file(saved, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="placeholder"):
        dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = _model()
    model.add_adapter("other", dt.GloraConfig(target_modules=["lin0", "lin1"], config_A_B="constant",
                                              init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(config_A_B="low-rank"), "config_A_B must be one of"),
        (dict(config_C="constant"), "config_C must be one of"),
        (dict(config_D_E="lora"), "config_D_E must be one of"),
        (dict(init_weights="kaiming"), "init_weights must be"),
        (dict(layers_to_transform=[0]), "GloraConfig has no layers_to_transform"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.GloraConfig(**kwargs)

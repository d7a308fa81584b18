"""Super-Tuning (``deltatune.methods.supertuning``): the selected entries against peft's (the oracle for the topk
order), the output and merged weight against the sparse update plus the Supra LoRA written out, a file without
indices loading on the base it came from, corrupt indices refused on load, mixed-adapter batches and the config's
checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_mlp


def _layer(model: nn.Module, name: str = "lin1") -> nn.Module:
    return model.get_base_model().get_submodule(name)


@pytest.mark.parametrize("select_top", [True, False])
def test_entries_are_peft_magnitude_selection(select_top: bool) -> None:
    config = dict(target_modules=["lin0", "lin1"], sparsity=0.9, select_top=select_top)
    ours = dt.get_peft_model(tiny_mlp(), dt.SupertuningConfig(**config))
    theirs = peft.get_peft_model(tiny_mlp(), peft.SupertuningConfig(**config))
    for name in ("lin0", "lin1"):
        expected = _layer(theirs, name).supertuning_indices["default"]
        indices = _layer(ours, name).deltas["default"].supertuning_indices
        assert indices.dtype == torch.int32 and torch.equal(indices, expected)
        weight = _layer(ours, name).base_layer.weight.abs().flatten()
        chosen, rest = weight[indices.long()], weight[~torch.isin(torch.arange(weight.numel()), indices.long())]
        assert (chosen.min() >= rest.max()) if select_top else (chosen.max() <= rest.min())


def test_output_and_merged_weight_equal_sparse_plus_low_rank() -> None:
    config = dt.SupertuningConfig(target_modules=["lin1"], sparsity=0.8, r=3, lora_alpha=5, init_weights=False)
    layer = _layer(dt.get_peft_model(tiny_mlp(), config))
    assert isinstance(layer, AdapterLayer)
    base, delta = layer.base_layer, layer.deltas["default"]
    expected = base.weight.detach().clone()
    in_features = expected.shape[1]
    for flat, value in zip(delta.supertuning_indices.tolist(), delta.supertuning_values.tolist()):
        expected[flat // in_features, flat % in_features] += value
    assert (expected != base.weight).sum() == int(expected.numel() * 0.2)
    expected += 5 / 3 * delta.supertuning_lora_B.weight.detach() @ delta.supertuning_lora_A.weight.detach()
    x = torch.randn(5, in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.T + base.bias, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, expected, rtol=0, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


def test_a_file_without_indices_recomputes_them_from_the_base(tmp_path: Path) -> None:
    config = dt.SupertuningConfig(target_modules=["lin1"], sparsity=0.9, init_weights=False,
                                  save_precomputed_indices=False)
    model = dt.get_peft_model(tiny_mlp(), config)
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"base_model.model.lin1.supertuning_values"}
    loaded = dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    x = make_mlp_inputs()["x"]
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [(32 * 64, "points outside"), (-1, "points outside"), (0.5, "non-integer")])
def test_corrupt_indices_are_refused_before_the_model_changes(tmp_path: Path, bad, match: str) -> None:
    dt.get_peft_model(tiny_mlp(), dt.SupertuningConfig(target_modules=["lin1"], sparsity=0.9)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lin1.supertuning_indices"
    tensors[key] = tensors[key].float() if isinstance(bad, float) else tensors[key]
    tensors[key][3] = bad
    save_file(tensors, path)
    model = tiny_mlp()
    with pytest.raises(AdapterLoadError, match=match):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.SupertuningConfig(target_modules=["lin0", "lin1"], sparsity=0.9,
                                                               init_weights=False))
    model.add_adapter("other", dt.SupertuningConfig(target_modules=["lin1"], sparsity=0.5, r=2, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


def test_lora_alpha_defaults_to_twice_r_as_peft_writes_it() -> None:
    assert dt.SupertuningConfig(r=4).lora_alpha == peft.SupertuningConfig(r=4).lora_alpha == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity must be a number in \\[0, 1\\)"),
        (dict(sparsity=-0.1), "sparsity must be"),
        (dict(sparsity="0.9"), "sparsity must be"),
        (dict(r=0), "r must be a positive integer"),
        (dict(lora_alpha=4), "lora_alpha is set but r is None"),
        (dict(r=2, lora_dropout=1.0), "lora_dropout must be in"),
        (dict(select_top=None), "select_top must be True or False"),
        (dict(layers_to_transform=[0]), "has no layers_to_transform"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.SupertuningConfig(**kwargs)


def test_a_sparsity_leaving_no_entry_is_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="lin1: sparsity=0.9999 leaves no trainable entry"):
        dt.get_peft_model(model, dt.SupertuningConfig(target_modules=["lin1"], sparsity=0.9999))
    assert isinstance(model.lin1, nn.Linear)

"""SHiRA (``deltatune.methods.shira``): the mask against peft's ``random_mask`` (the oracle for the draw), the output
and merged weight against the sparse update written out entry by entry, a file's own mask winning over the seed,
corrupt indices refused on load, mixed-adapter batches and the config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.shira.mask_functions import random_mask
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp


def _layer(model: dt.PeftModel, name: str = "lin1") -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


@pytest.mark.parametrize("seed", [None, 0, 1234])
def test_mask_is_peft_random_mask(seed) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.ShiraConfig(target_modules=["lin0"], r=3, random_seed=seed))
    layer = _layer(model, "lin0")  # 16 -> 32
    mask = random_mask(layer.base_layer, 3, random_seed=seed)
    expected = torch.stack(torch.where(mask)).to(torch.int32)
    assert expected.shape == (2, 3 * (16 + 32))
    assert torch.equal(layer.deltas["default"].shira_indices, expected)


def test_output_and_merged_weight_equal_the_sparse_update() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.ShiraConfig(target_modules=["lin1"], r=4, init_weights=False))
    layer = _layer(model)
    base, delta = layer.base_layer, layer.deltas["default"]
    expected_weight = base.weight.detach().clone()
    for (row, col), value in zip(delta.shira_indices.T.tolist(), delta.shira_weight.tolist()):
        expected_weight[row, col] += value
    changed = (expected_weight != base.weight).sum()
    assert changed == 4 * 64  # every trained entry is its own position
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.T + base.bias, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, expected_weight, rtol=0, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


def test_a_files_own_mask_wins_over_the_seed(tmp_path: Path) -> None:
    # peft with a hand-made mask (what a custom mask function gives): the file carries it
    theirs = peft.get_peft_model(tiny_llama(), peft.ShiraConfig(target_modules=["q_proj"], r=1, init_weights=False))
    for module in theirs.modules():
        if hasattr(module, "shira_indices") and "default" in module.shira_indices:
            k = module.shira_indices["default"].shape[1]
            module.shira_indices["default"] = torch.stack([torch.arange(k) % 32, torch.arange(k) // 2]).to(torch.int)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    inputs = make_causal_lm_inputs(ours)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [(32, "points outside"), (-1, "points outside"), (0.5, "non-integer")])
def test_corrupt_indices_are_refused_before_the_model_changes(tmp_path: Path, bad, match: str) -> None:
    dt.get_peft_model(tiny_llama(), dt.ShiraConfig(target_modules=["q_proj"], r=1)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("shira_indices"))
    tensors[key] = tensors[key].float() if isinstance(bad, float) else tensors[key]
    tensors[key][1, 0] = bad
    save_file(tensors, path)
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match=match):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.ShiraConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    model.add_adapter("other", dt.ShiraConfig(target_modules=["lin1"], r=8, random_seed=9, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(mask_type="magnitude"), "mask_type='magnitude' is not supported"),
        (dict(random_seed=1.5), "random_seed must be None or an integer"),
        (dict(init_weights=None), "init_weights must be"),
        (dict(exclude_modules=["q"]), "has no exclude_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.ShiraConfig(**kwargs)


def test_more_entries_than_the_weight_has_are_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="lin1: r=17 asks for r·\\(in\\+out\\) = 1088 trained entries"):
        dt.get_peft_model(model, dt.ShiraConfig(target_modules=["lin1"], r=17))
    assert isinstance(model.lin1, nn.Linear)

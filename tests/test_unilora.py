"""Uni-LoRA (``deltatune.methods.unilora``): the seeded balanced assignment bit-identical to peft's (its
``generate_index`` and every layer's indices and scales), the factors against ``θ_d[idx] / √count`` written out,
saved indices checked on load, mixed-adapter batches and the config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.unilora.model import UniLoraModel
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError
from deltatune.layers import AdapterLayer
from deltatune.methods.unilora import balanced_assignment
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_gpt2, tiny_mlp


def _layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}


@pytest.mark.parametrize("count, length, seed", [(1000, 64, 0), (100, 256, 42), (4096, 4096, 3), (7, 3, 2**70)])
def test_assignment_is_peft_s_and_balanced(count: int, length: int, seed: int) -> None:
    ours = balanced_assignment(count, length, seed)
    assert torch.equal(ours, UniLoraModel.generate_index(count, length, seed))
    uses = torch.bincount(ours, minlength=length)
    assert uses.max() - uses.min() <= 1 and uses.sum() == count


def test_every_layer_s_indices_and_scales_equal_peft_s() -> None:
    config = dict(target_modules=["c_attn", "c_fc", "c_proj"], r=3, theta_d_length=100, proj_seed=5)
    ours = dt.get_peft_model(tiny_gpt2(), dt.UniLoraConfig(**config))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.UniLoraConfig(**config))
    layers = _layers(ours)
    assert len(layers) == 8  # two blocks: c_attn, c_fc and both c_proj
    for name, layer in layers.items():
        mine, peer = layer.deltas["default"], theirs.get_submodule(name)
        for key in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"):
            assert torch.equal(getattr(mine, key), getattr(peer, key)["default"]), (name, key)


def test_factors_are_theta_entries_over_the_square_root_of_their_use_count() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.UniLoraConfig(target_modules=["lin0", "lin1"], r=2, theta_d_length=50,
                                                           init_weights=False))
    theta = model.base_model.shared_state["default"].unilora_theta_d.detach()
    deltas = [layer.deltas["default"] for layer in _layers(model).values()]
    counts = torch.zeros(50)
    for delta in deltas:
        for index in (delta.unilora_indices_A, delta.unilora_indices_B):
            for j in index.flatten().tolist():
                counts[j] += 1
    layer = _layers(model)["lin1"]
    delta = layer.deltas["default"]
    a = torch.tensor([[theta[j] / counts[j].sqrt() for j in row] for row in delta.unilora_indices_A.tolist()])
    b = torch.tensor([[theta[j] / counts[j].sqrt() for j in row] for row in delta.unilora_indices_B.tolist()])
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ (b @ a).T, rtol=1e-5, atol=1e-6)
        weight = layer.base_layer.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(layer.base_layer.weight, weight + b @ a, rtol=1e-5, atol=1e-6)


def test_saved_indices_outside_theta_are_refused(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_mlp(), dt.UniLoraConfig(target_modules=["lin0"], theta_d_length=16,
                                                   save_indices=True)).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    saved = load_file(file)
    assert saved["base_model.model.lin0.unilora_indices_A"].dtype == torch.int64
    saved["base_model.model.lin0.unilora_indices_A"][0, 0] = 16
    save_file(saved, file)
    with pytest.raises(AdapterLoadError, match="unilora_indices_A must hold integer entries"):
        dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.UniLoraConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.add_adapter("other", dt.UniLoraConfig(target_modules=["lin1"], r=6, proj_seed=1, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(theta_d_length=0), "theta_d_length must be a positive integer"),
        (dict(proj_seed=-1), "proj_seed must be a non-negative integer"),
        (dict(unilora_dropout=1.0), "unilora_dropout must be in"),
        (dict(init_theta_d_bound=0.0), "init_theta_d_bound must be positive"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(save_indices="yes"), "save_indices must be True or False"),
        (dict(exclude_modules=["q"]), "UniLoraConfig has no exclude_modules"),
        (dict(target_modules=".*q", layers_to_transform=[0]), "cannot be used when target_modules is a regex"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.UniLoraConfig(**kwargs)

"""VB-LoRA (``deltatune.methods.vblora``): the factors against the paper's top-k admixture written out entry by entry,
the shared trainable bank (one per adapter, saved once, frozen with its adapter), the ``save_only_topk_weights`` file
form, mixed-adapter batches and the config's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits, snapshot
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_gpt2, tiny_llama, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_SMALL = dict(r=3, num_vectors=6, vector_length=8, init_vector_bank_bound=0.5, init_logits_std=1.0)


def _factor_by_hand(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., tiles, N)`` logits -> ``(..., tiles · L)``: each tile is Σ softmax(top-k logits)ᵢ · bank[top-k index ᵢ]
    , computed one tile at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    tiles = []
    for row in flat:
        order = sorted(range(len(row)), key=lambda j: -row[j].item())[:k]
        weights = torch.exp(row[order] - row[order].max())
        weights = weights / weights.sum()
        tiles.append(sum(w * bank[j] for w, j in zip(weights, order, strict=True)))
    return torch.stack(tiles).reshape(*logits.shape[:-1], bank.shape[1])


def test_linear_output_is_base_plus_b_a_assembled_from_the_bank() -> None:
    base = tiny_mlp()
    model = dt.get_peft_model(tiny_mlp(), dt.VBLoRAConfig(topk=2, target_modules=["lin0", "lin1"], **_SMALL))
    bank = model.base_model.shared_state["default"].vblora_vector_bank.detach()
    x = make_mlp_inputs()["x"]
    with torch.no_grad():
        h = x
        for name in ("lin0", "lin1"):
            delta = model.get_base_model().get_submodule(name).deltas["default"]
            a = _factor_by_hand(delta.vblora_logits_A, bank, 2).reshape(3, -1)  # (r, in)
            b = _factor_by_hand(delta.vblora_logits_B, bank, 2)  # (out/L, r, L): column j of B, tile by tile
            b = b.permute(0, 2, 1).reshape(-1, 3)  # (out, r)
            h = torch.relu(getattr(base, name)(h) + h @ a.T @ b.T)
        expected = base.head(h)
    torch.testing.assert_close(logits(model, {"x": x}), expected, rtol=1e-5, atol=1e-6)


def test_conv1d_merges_the_transposed_update_and_matches_the_unmerged_output() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.VBLoRAConfig(target_modules=["c_attn"], **_SMALL))
    layer = model.get_base_model().get_submodule("transformer.h.0.attn.c_attn")
    a, b = layer.deltas["default"].factors()  # (3, 32), (96, 3)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (b @ a).T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        weight = layer.base_layer.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, weight + (b @ a).T, rtol=1e-5, atol=1e-6)


def test_each_adapter_has_one_bank_saved_once_and_trained_only_while_active(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.VBLoRAConfig(**_SMALL))
    model.add_adapter("other", dt.VBLoRAConfig(**_SMALL))
    banks = model.base_model.shared_state
    assert banks["default"] is not banks["other"]
    assert banks["default"].vblora_vector_bank.requires_grad and not banks["other"].vblora_vector_bank.requires_grad
    model.train()
    model(**make_causal_lm_inputs(model)).loss.backward()
    assert banks["default"].vblora_vector_bank.grad.abs().sum() > 0 and banks["other"].vblora_vector_bank.grad is None
    model.set_adapter("other")
    assert banks["other"].vblora_vector_bank.requires_grad and not banks["default"].vblora_vector_bank.requires_grad
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.vblora_vector_bank" in keys
    assert len(keys) == 1 + 2 * 4  # the bank, and A/B logits of q_proj and v_proj in two layers


@pytest.mark.parametrize("num_vectors, dtype", [(6, torch.uint8), (300, torch.int16)])
def test_topk_file_keeps_indices_and_k_minus_1_weights_and_reloads_to_the_same_outputs(
    num_vectors: int, dtype: torch.dtype, tmp_path: Path
) -> None:
    config = dt.VBLoRAConfig(**{**_SMALL, "num_vectors": num_vectors, "topk": 3, "save_only_topk_weights": True})
    model = dt.get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A"
    assert key not in tensors
    index, weights = tensors[f"{key}_topk_indices"], tensors[f"{key}_topk_weights"]
    logits_a = model.get_base_model().model.layers[0].self_attn.q_proj.deltas["default"].vblora_logits_A
    top, expected_index = logits_a.detach().topk(3, dim=-1)
    assert index.dtype == dtype and torch.equal(index.long(), expected_index)
    torch.testing.assert_close(weights, top.softmax(-1)[..., :2])
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    inputs = make_causal_lm_inputs(model)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1e-5, atol=1e-6)
    loaded.train()
    with pytest.raises(dt.AdapterStateError, match="save_only_topk_weights"):
        loaded(**inputs)


@pytest.mark.parametrize("suffix, value, message", [
    ("indices", 6, "outside the bank of 6 vectors"),
    ("weights", float("nan"), "must be finite, non-negative and sum to at most 1"),
    ("weights", 1.5, "must be finite, non-negative and sum to at most 1"),
])
def test_a_corrupt_topk_pair_is_refused_naming_the_file_and_the_model_is_unchanged(
    suffix: str, value: float, message: str, tmp_path: Path
) -> None:
    config = dt.VBLoRAConfig(**{**_SMALL, "save_only_topk_weights": True})
    dt.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_B_topk_{suffix}"
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = dt.get_peft_model(tiny_llama(), dt.VBLoRAConfig(**_SMALL), adapter_name="kept")
    before = snapshot(model)
    with pytest.raises(dt.AdapterLoadError, match=f"adapter_model.safetensors.*{message}"):
        model.load_adapter(tmp_path, adapter_name="new")
    assert list(model.peft_config) == ["kept"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.VBLoRAConfig(**_SMALL))
    model.add_adapter("other", dt.VBLoRAConfig(**{**_SMALL, "topk": 1}))
    inputs = make_causal_lm_inputs(model, batch=3)
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["other", "__base__", "default"])


def test_a_vector_length_that_does_not_divide_a_layer_is_refused_before_the_model_changes() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match="vector_length=12 must divide"):
        dt.get_peft_model(model, dt.VBLoRAConfig(vector_length=12, num_vectors=4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(num_vectors=4, topk=5), "topk=5 exceeds num_vectors=4"),
        (dict(vector_length=-8), "vector_length must be a positive integer"),
        (dict(vblora_dropout=1.0), "vblora_dropout must be in"),
        (dict(init_vector_bank_bound=-0.1), "init_vector_bank_bound must be non-negative"),
        (dict(init_logits_std=float("nan")), "init_logits_std must be a finite number"),
        (dict(bias="lora_only"), "bias must be 'none', 'all' or 'vblora_only'"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.VBLoRAConfig(**kwargs)


def test_default_targets_follow_peft_table_for_t5_style_models() -> None:
    from tests.models import tiny_t5

    model = dt.get_peft_model(tiny_t5(), dt.VBLoRAConfig(r=2, num_vectors=4, vector_length=8))
    assert sorted(json.loads(model.peft_config["default"].to_json_string())["target_modules"]) == \
        ["k", "o", "q", "v", "wi", "wo"]

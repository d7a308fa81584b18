"""RandLoRA (``deltatune.methods.randlora``): the random bases against the draw written out, the update against the
sum over bases written entry by entry (both orientations), the rules for several adapters, the per-layer copies of
the bases in a file, mixed-adapter batches and the config's checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, snapshot
from tests.models import make_causal_lm_inputs, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _dense_bases_by_hand(key: int, r: int, min_dim: int, max_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaiming-uniform with a = √5 is U(±1/√fan_in); drawn in bfloat16 from one CPU generator, A (fan_in = min) then
    B as ⌈min/r⌉ draws of (max, 1, r) (fan_in = r), each tensor divided by its standard deviation."""
    gen = torch.Generator().manual_seed(key)
    a = torch.empty(r, 1, min_dim, dtype=torch.bfloat16).uniform_(-1 / math.sqrt(min_dim), 1 / math.sqrt(min_dim),
                                                                  generator=gen)
    chunks = [torch.empty(max_dim, 1, r, dtype=torch.bfloat16).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r),
                                                                         generator=gen)
              for _ in range(-(-min_dim // r))]
    b = torch.cat(chunks, dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


def test_bases_are_drawn_from_the_key_and_sized_by_the_largest_target() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.RandLoraConfig(r=8, projection_prng_key=4,
                                                              target_modules=["q_proj", "up_proj"]))
    shared = model.base_model.shared_state["default"]
    a, b = _dense_bases_by_hand(4, 8, min_dim=32, max_dim=64)  # largest (out, in) is (64, 32)
    assert torch.equal(shared.randlora_A, a) and torch.equal(shared.randlora_B, b)


def _update_by_hand(delta, a: torch.Tensor, b: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    """(α/r) Σ_j B[:, j // r, j % r] ⊗ (λ[j // n, j % n] · A[j // n, 0, :] · γ[j % n, :]), the ``(max, min)`` update:
    basis ``j // r`` of B meets row ``j // n`` of A (peft's pairing)."""
    lam, gamma = delta.randlora_lambda.detach(), delta.randlora_gamma.detach()
    n, min_dim = gamma.shape
    max_dim = max(delta.in_features, delta.out_features)
    total = torch.zeros(max_dim, min_dim)
    for j in range(r * n):
        row = lam[j // n, j % n] * a[j // n, 0, :min_dim] * gamma[j % n]
        total += torch.outer(b[:max_dim, j // r, j % r], row)
    return total * alpha / r


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"])
def test_layer_output_is_base_plus_the_sum_over_bases(module: str) -> None:
    """q_proj is square, up_proj's input is the smaller side, down_proj's output is (its update is transposed)."""
    config = dt.RandLoraConfig(r=8, randlora_alpha=4, init_weights=False, target_modules=["q_proj", "up_proj",
                                                                                             "down_proj"])
    model = dt.get_peft_model(tiny_llama(), config)
    shared = model.base_model.shared_state["default"]
    layer = model.get_base_model().get_submodule(f"model.layers.0.{module}")
    delta = layer.deltas["default"]
    with torch.no_grad():
        delta.randlora_gamma.normal_()
    update = _update_by_hand(delta, shared.randlora_A, shared.randlora_B, alpha=4, r=8)
    weight = update if delta.out_features >= delta.in_features else update.T  # (out, in)
    x = torch.randn(2, 3, delta.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ weight.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta.delta_weight(layer.base_layer), weight, rtol=1e-5, atol=1e-5)


def test_default_init_is_zero_lambda_and_constant_gamma() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.RandLoraConfig(r=8, target_modules=["down_proj"]))
    delta = model.get_base_model().model.layers[0].mlp.down_proj.deltas["default"]  # 64 -> 32: n = 4, min = 32
    assert torch.equal(delta.randlora_lambda, torch.zeros(8, 4))
    assert torch.equal(delta.randlora_gamma, torch.full((4, 32), 1 / 32))


def test_each_adapter_draws_its_own_bases_and_they_must_agree_on_key_and_saving() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.RandLoraConfig(r=8, target_modules=["q_proj"]))
    model.add_adapter("mlp", dt.RandLoraConfig(r=8, target_modules=["up_proj"]))
    shared = model.base_model.shared_state
    assert shared["default"].randlora_B.shape == (32, 4, 8) and shared["mlp"].randlora_B.shape == (64, 4, 8)
    for kwargs, message in ((dict(projection_prng_key=1), "projection_prng_key=1 differs"),
                            (dict(save_projection=False), "save_projection=False differs")):
        with pytest.raises(dt.ConfigError, match=message):
            model.add_adapter("bad", dt.RandLoraConfig(r=8, **kwargs))
    assert list(model.peft_config) == ["default", "mlp"]


def test_a_per_layer_copy_of_the_bases_that_differs_from_the_model_level_one_is_refused(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_llama(), dt.RandLoraConfig(r=8, init_weights=False)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.randlora_B"
    assert torch.equal(tensors[key], tensors["base_model.randlora_B"])  # peft writes a copy under every layer
    tensors[key] = tensors[key] * 2
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.AdapterLoadError, match="adapter_model.safetensors.*v_proj: randlora_B: .* differs"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.RandLoraConfig(r=8, randlora_alpha=8, init_weights=False))
    model.add_adapter("other", dt.RandLoraConfig(r=16, randlora_alpha=8, init_weights=False,
                                                 target_modules=["k_proj", "down_proj"]))
    inputs = make_causal_lm_inputs(model, batch=3)
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "other", "__base__"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(projection_prng_key=-(2**64)), "projection_prng_key must be an integer"),
        (dict(randlora_dropout=-0.1), "randlora_dropout must be in"),
        (dict(randlora_alpha=float("inf")), "randlora_alpha must be a finite number"),
        (dict(bias="lora_only"), "bias must be 'none', 'all' or 'randlora_only'"),
        (dict(exclude_modules=["k_proj"]), "RandLoraConfig has no exclude_modules"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.RandLoraConfig(**kwargs)

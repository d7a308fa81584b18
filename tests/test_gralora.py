"""GraLoRA (``deltatune.methods.gralora``): the update against the k × k grid of blocks written out block by block,
the hybrid LoRA beside it, merging, mixed-adapter batches and the config's and targets' checks."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, snapshot
from tests.models import make_causal_lm_inputs, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _grid_by_hand(delta, k: int, r: int) -> torch.Tensor:
    """ΔW ``(out, in)`` without scaling: block (output j, input n) is ``(A_n[:, j·s:(j+1)·s] B_j[n·s:(n+1)·s])ᵀ``
    with ``s = r / k``, ``A_n = gralora_A[n]`` ``(in/k, r)`` and ``B_j = gralora_B[j]`` ``(r, out/k)``."""
    a, b = delta.gralora_A.detach(), delta.gralora_B.detach()
    s, block_in, block_out = r // k, a.shape[1], b.shape[2]
    weight = torch.zeros(block_out * k, block_in * k)
    for n in range(k):
        for j in range(k):
            block = a[n][:, j * s:(j + 1) * s] @ b[j][n * s:(n + 1) * s]  # (in/k, out/k)
            weight[j * block_out:(j + 1) * block_out, n * block_in:(n + 1) * block_in] = block.T
    return weight


@pytest.mark.parametrize("k, hybrid_r", [(2, 0), (4, 3)])
def test_layer_output_is_base_plus_the_grid_of_blocks(k: int, hybrid_r: int) -> None:
    config = dt.GraloraConfig(r=8, alpha=6, gralora_k=k, hybrid_r=hybrid_r, init_weights=False,
                              target_modules=["up_proj"])
    model = dt.get_peft_model(tiny_llama(), config)
    layer = model.get_base_model().model.layers[0].mlp.up_proj  # 32 -> 64
    delta = layer.deltas["default"]
    weight = _grid_by_hand(delta, k, 8)
    if hybrid_r:
        weight = weight + delta.gralora_B_general.weight.detach() @ delta.gralora_A_general.weight.detach()
    weight = weight * 6 / (8 + hybrid_r)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ weight.T, rtol=1e-5, atol=1e-5)
        base_weight = layer.base_layer.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, base_weight + weight, rtol=1e-5, atol=1e-6)


def test_a_block_only_sees_its_own_input_block() -> None:
    """Gradient isolation, the paper's point: output block j depends on input block n only through (A_n, B_j)."""
    model = dt.get_peft_model(tiny_llama(), dt.GraloraConfig(r=4, gralora_k=2, init_weights=False,
                                                             target_modules=["q_proj"]))
    delta = model.get_base_model().model.layers[0].self_attn.q_proj.deltas["default"]
    x = torch.zeros(1, 32)
    x[0, :16] = torch.randn(16)  # only input block 0 is non-zero
    delta.update(x).sum().backward()
    assert delta.gralora_A.grad[1].abs().sum() == 0 and delta.gralora_A.grad[0].abs().sum() > 0
    assert delta.gralora_B.grad[:, 2:].abs().sum() == 0  # rows n·s… of every B_j for n = 1 get no gradient


def test_conv1d_merges_the_transposed_update() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.GraloraConfig(r=4, alpha=4, init_weights=False,
                                                            target_modules=["c_attn"]))
    layer = model.get_base_model().transformer.h[0].attn.c_attn  # Conv1D 32 -> 96
    weight = _grid_by_hand(layer.deltas["default"], 2, 4)  # (96, 32)
    before = layer.base_layer.weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, before + weight.T, rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.GraloraConfig(r=8, init_weights=False))
    model.add_adapter("other", dt.GraloraConfig(r=4, gralora_k=4, hybrid_r=2, init_weights=False,
                                                target_modules=["k_proj", "down_proj"]))
    inputs = make_causal_lm_inputs(model, batch=3)
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["other", "__base__", "default"])


def test_a_k_that_does_not_divide_a_layer_is_refused_before_the_model_changes() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match="gralora_k=3 must divide"):
        dt.get_peft_model(model, dt.GraloraConfig(r=6, gralora_k=3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=6, gralora_k=4), "r=6 must be a multiple of gralora_k=4"),
        (dict(gralora_k=0), "gralora_k must be a positive integer"),
        (dict(hybrid_r=-1), "hybrid_r must be a non-negative integer"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(gralora_dropout=1.0), "gralora_dropout must be in"),
        (dict(bias="lora_only"), "bias must be 'none', 'all' or 'gralora_only'"),
        (dict(exclude_modules=["k_proj"]), "GraloraConfig has no exclude_modules"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.GraloraConfig(**kwargs)

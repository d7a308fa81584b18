"""DeLoRA (``deltatune.methods.delora``): the output and merged weight against ``(λ/r) B diag(1/(‖A_i‖‖B_i‖)) A
diag(‖W_:,j‖)`` written out rank by rank, the norm bound, the saved column norms (a file's own win), patterns,
mixed-adapter batches and the config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp


def _layer(model: dt.PeftModel, name: str = "lin1") -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _update(a: torch.Tensor, b: torch.Tensor, lam: float, w: torch.Tensor) -> torch.Tensor:
    """ΔW as a sum of rank-one terms: Σ_i (λ/r) b_i a_iᵀ / (‖a_i‖ ‖b_i‖), then each input column j times ‖W_:,j‖."""
    r = a.shape[0]
    total = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for i in range(r):
        total += (lam / r) * torch.outer(b[:, i], a[i]).double() / (a[i].norm() * b[:, i].norm()).double()
    return total * w.double().norm(dim=0)


def test_output_and_merged_weight_equal_the_normalised_rank_one_sum() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.DeloraConfig(target_modules=["lin1"], r=4, delora_lambda=2,
                                                          init_weights=False))
    layer = _layer(model)
    base, delta = layer.base_layer, layer.deltas["default"]
    assert delta.delora_lambda.item() == 2.0
    update = _update(delta.delora_A.detach(), delta.delora_B.detach(), 2.0, base.weight.detach())
    # the bound: ‖ΔW diag(1/‖W_:,j‖)‖_F ≤ λ
    assert (update / base.weight.detach().double().norm(dim=0)).norm() <= 2.0 + 1e-9
    expected_weight = (base.weight.double() + update).float().detach()
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.T + base.bias, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, expected_weight, rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)


def test_fresh_adapter_is_the_base_model_and_patterns_set_rank_and_lambda() -> None:
    config = dt.DeloraConfig(target_modules=["lin0", "lin1"], r=2, rank_pattern={"lin1": 5},
                             lambda_pattern={"lin0": 0.5})
    model = dt.get_peft_model(tiny_mlp(), config)
    lin0, lin1 = _layer(model, "lin0").deltas["default"], _layer(model, "lin1").deltas["default"]
    assert lin0.delora_A.shape == (2, 16) and lin1.delora_B.shape == (32, 5)
    assert lin0.delora_lambda.item() == 0.5 and lin1.delora_lambda.item() == 15.0
    torch.testing.assert_close(lin0.delora_w_norm, tiny_mlp().lin0.weight.detach().norm(dim=0))
    x = make_mlp_inputs(3)["x"]
    with torch.no_grad():
        assert torch.equal(model(x), tiny_mlp()(x))


def test_a_files_saved_column_norms_are_used(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny_llama(), peft.DeloraConfig(target_modules=["q_proj"], r=2, init_weights=False))
    with torch.no_grad():
        for name, buffer in theirs.named_buffers():
            if "delora_w_norm" in name:
                buffer.mul_(torch.linspace(0.5, 2.0, buffer.numel()))  # not the base model's norms any more
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    inputs = make_causal_lm_inputs(ours)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.DeloraConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    model.add_adapter("other", dt.DeloraConfig(target_modules=["lin1"], r=6, delora_lambda=3, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(delora_lambda=float("nan")), "delora_lambda must be a finite number"),
        (dict(module_dropout=1.0), "module_dropout must be in"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(init_weights="kaiming"), "init_weights must be"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer"),
        (dict(lambda_pattern={"q": "big"}), r"lambda_pattern\['q'\] must be a finite number"),
        (dict(lambda_pattern={"[": 1.0}), "lambda_pattern key"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.DeloraConfig(**kwargs)


def test_conv1d_targets_are_refused_before_the_model_changes() -> None:
    from transformers.pytorch_utils import Conv1D

    model = tiny_mlp()
    model.lin1 = Conv1D(32, 32)
    with pytest.raises(TargetError, match="Conv1D"):
        dt.get_peft_model(model, dt.DeloraConfig(target_modules=["lin1"]))
    assert type(model.lin1) is Conv1D

"""AdaLoRA specifics: the SVD-form forward, the budget schedule, the orthogonality regulariser, training against peft
(same losses, same per-layer ranks), and adapters pruned by training moving between the libraries both ways."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterStateError, ConfigError
from deltatune.layers import adapter_layers
from deltatune.methods.adalora import AdaLoraConfig, budget_schedule
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits
from tests.cases.adalora import without_labels
from tests.cases import perturb_adapter
from tests.models import (
    make_causal_lm_inputs,
    make_convnet_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # peft's LoRA-style check of rank_pattern keys, which AdaLoRA's "<path>.lora_E" keys never match
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys:RuntimeWarning"),
]

# total_step=6: warm-up through step 1, pruning at steps 2-4 (the final allocation at 4), then fixed ranks.
SCHEDULE = dict(total_step=6, tinit=1, tfinal=2, init_r=4, target_r=2)
FAMILIES = {
    "llama": (tiny_llama, make_causal_lm_inputs, dict(task_type="CAUSAL_LM")),
    "bert": (lambda: tiny_bert("seq_cls"), make_seq_cls_inputs, dict(task_type="SEQ_CLS")),
    "t5": (tiny_t5, make_seq2seq_inputs, dict(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"])),
}


def _deltas(model: nn.Module) -> dict[str, nn.Module]:
    return {path.removeprefix("base_model.model."): layer.deltas["default"] for path, layer in adapter_layers(model)}


def train(
    model: nn.Module, batch: dict[str, torch.Tensor], steps: int, hook: str = "update_and_allocate"
) -> list[float]:
    """peft's documented loop (works for both libraries): step, then ``update_and_allocate`` (or another ``hook`` of
    ``base_model``), then ``zero_grad``."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for step in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        getattr(model.base_model, hook)(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _pattern(config: Any) -> dict[str, list[bool]]:
    return {k.removesuffix(".default"): v for k, v in (config.rank_pattern or {}).items()}


# --- the math ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, name", [(tiny_llama, "model.layers.0.self_attn.q_proj"),
                                           (tiny_gpt2, "transformer.h.0.attn.c_attn")], ids=["linear", "conv1d"])
def test_linear_forward_is_base_plus_alpha_over_init_r_times_p_lambda_q(factory, name: str) -> None:
    model = dt.get_peft_model(factory(), AdaLoraConfig(total_step=5, init_r=5, lora_alpha=6, init_lora_weights=False))
    layer = model.get_base_model().get_submodule(name)
    delta, base = layer.deltas["default"], layer.base_layer
    weight = base.weight.T if name.endswith("c_attn") else base.weight  # (out, in)
    x = torch.randn(2, 3, weight.shape[1])
    bias = base.bias if base.bias is not None else 0.0
    expected = x @ weight.T + bias + 6 / (5 + 1e-5) * (x @ (delta.lora_A * delta.lora_E).T @ delta.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert delta.delta_weight(base).shape == base.weight.shape


def test_conv2d_forward_is_a_convolution_with_the_reshaped_update() -> None:
    model = dt.get_peft_model(tiny_convnet(), AdaLoraConfig(total_step=5, target_modules=["conv2d"], init_r=3,
                                                            init_lora_weights=False))
    layer = model.get_base_model().conv2d
    delta, base = layer.deltas["default"], layer.base_layer
    x = make_convnet_inputs()["pixel_values"]
    kernel = (delta.lora_B @ (delta.lora_A * delta.lora_E)).view(base.weight.shape) * 8 / (3 + 1e-5)
    expected = nn.functional.conv2d(x, base.weight + kernel, base.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_budget_schedule_follows_the_papers_cubic() -> None:
    config = AdaLoraConfig(total_step=100, tinit=10, tfinal=20, deltaT=5)
    init, target = 96, 32
    for step in range(101):
        budget, prune = budget_schedule(step, config, init, target)
        if step <= 10:  # warm-up: the full budget, no pruning
            assert (budget, prune) == (init, False)
        elif step > 80:  # final fine-tuning: the target, allocation fixed
            assert (budget, prune) == (target, True)
        else:  # b(t) = b(T) + (b(0) - b(T)) (1 - (t - t_i) / (T - t_i - t_f))^3, §3.3
            assert budget == int(target + (init - target) * (1 - (step - 10) / 70) ** 3)
            assert prune == (step % 5 == 0)
    assert budget_schedule(80, config, init, target)[0] == target


def test_orthogonality_regulariser_is_added_in_train_mode_only(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, orth_reg_weight=0.3))
    perturb_adapter(model)
    batch = make_causal_lm_inputs(model)
    model.eval()
    plain = model(**batch).loss
    model.train()
    regularised = model(**batch).loss
    norms = []
    for delta in _deltas(model).values():
        a, b = delta.lora_A.detach(), delta.lora_B.detach()
        for gram in (a @ a.T, b.T @ b):
            norms.append(((gram - torch.eye(len(gram))) ** 2).sum().sqrt())
    expected = 0.3 * sum(norms) / len(norms)
    torch.testing.assert_close(regularised - plain, expected, rtol=1e-4, atol=1e-6)
    assert expected > 1e-3


# --- training against peft -----------------------------------------------------------------------------------------

def test_training_gives_peft_losses_and_per_layer_ranks(tmp_path: Path) -> None:
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], total_step=10, tinit=2,
                  tfinal=3, init_r=6, target_r=2)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path)  # one starting point for both: peft's random init
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    batch = make_causal_lm_inputs(ours)
    torch.testing.assert_close(train(ours, batch, 10), train(theirs, batch, 10), rtol=1e-5, atol=1e-6)
    pattern = _pattern(ours.peft_config["default"])
    assert pattern == _pattern(theirs.peft_config["default"])
    ranks = [sum(kept) for kept in pattern.values()]
    assert sum(ranks) == 2 * len(ranks) and len(set(ranks)) > 1  # the target budget, unevenly allocated


def test_each_pruning_step_keeps_exactly_the_scheduled_budget() -> None:
    config = AdaLoraConfig(task_type="CAUSAL_LM", total_step=12, tinit=2, tfinal=2, init_r=6, target_r=2)
    model = dt.get_peft_model(tiny_llama(), config)
    batch = make_causal_lm_inputs(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    layers = len(_deltas(model))
    for step in range(12):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        budget, prune = budget_schedule(step, model.peft_config["default"], 6 * layers, 2 * layers)
        kept = sum(int((d.lora_E != 0).sum()) for d in _deltas(model).values())
        if prune:
            assert kept == budget, step
            assert sum(map(sum, model.peft_config["default"].rank_pattern.values())) == budget
        optimizer.zero_grad()


def test_the_generic_per_step_hook_runs_the_allocation() -> None:
    """``base_model.after_optimizer_step`` (what ``deltatune train`` calls for any method) is AdaLoRA's
    ``update_and_allocate``: the same losses and the same allocation."""
    models = []
    for hook in ("update_and_allocate", "after_optimizer_step"):
        torch.manual_seed(0)
        model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE))
        models.append((train(model, make_causal_lm_inputs(model), 6, hook), model))
    (losses, peft_named), (generic_losses, generic) = models
    assert generic_losses == losses
    assert generic.peft_config["default"].rank_pattern == peft_named.peft_config["default"].rank_pattern
    assert generic.peft_config["default"].rank_pattern  # the final allocation was made


def test_update_and_allocate_needs_the_gradients_and_a_reachable_target() -> None:
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", total_step=5))
    with pytest.raises(AdapterStateError, match="before optimizer.zero_grad"):
        model.base_model.update_and_allocate(0)
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, init_r=4))
    model(**make_causal_lm_inputs(model)).loss.backward()
    with pytest.raises(ConfigError, match="target_r=8 exceeds"):
        model.base_model.update_and_allocate(0)


# --- adapters pruned by training, both ways ------------------------------------------------------------------------

def _pruned(library: Any, family: str, tmp_path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    factory, make_inputs, kwargs = FAMILIES[family]
    model = library.get_peft_model(factory(), library.AdaLoraConfig(**kwargs, **SCHEDULE))
    train(model, make_inputs(model), 6)
    model.save_pretrained(tmp_path)
    return model, without_labels(make_inputs)(model)


def _assert_pruned_file(directory: Path, model: nn.Module) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    pattern = json.loads((directory / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(pattern) == sorted(f"{path}.lora_E" for path in _deltas(model))
    for key, kept in pattern.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(kept), 1)
    assert any(sum(kept) < 4 for kept in pattern.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_deltatune_adapter_loads_in_peft_with_the_same_outputs(family: str, tmp_path: Path) -> None:
    ours, inputs = _pruned(dt, family, tmp_path)
    _assert_pruned_file(tmp_path, ours)
    theirs = peft.PeftModel.from_pretrained(FAMILIES[family][0](), tmp_path)
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)
    again = dt.PeftModel.from_pretrained(FAMILIES[family][0](), tmp_path)
    torch.testing.assert_close(logits(again, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_peft_adapter_loads_in_deltatune_with_the_same_outputs(family: str, tmp_path: Path) -> None:
    theirs, inputs = _pruned(peft, family, tmp_path)
    ours = dt.PeftModel.from_pretrained(FAMILIES[family][0](), tmp_path)
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    assert (expected - logits(FAMILIES[family][0](), inputs)).abs().max() > 1e-4
    ranks = {path: delta.r for path, delta in _deltas(ours).items()}
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in _pattern(theirs.peft_config["default"]).items()}


def test_training_a_loaded_pruned_adapter_further_records_masks_over_the_initial_triplets(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE))
    batch = make_causal_lm_inputs(model)
    train(model, batch, 3)  # pruned once, at step 2
    model.save_pretrained(tmp_path / "first")
    model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "first", is_trainable=True)
    first = {path: delta.r for path, delta in _deltas(model).items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in (3, 4):  # the final allocation at step 4
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    assert all(len(kept) == 4 for kept in pattern.values())
    assert sum(map(sum, pattern.values())) == 2 * len(pattern) < sum(first.values())
    model.save_pretrained(tmp_path / "second")
    inputs = without_labels(make_causal_lm_inputs)(model)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second")
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_a_layer_pruned_to_rank_zero_computes_as_the_base_layer(tmp_path: Path) -> None:
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [False] * 4}
    config = AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, init_r=4, rank_pattern=pattern)
    model = dt.get_peft_model(tiny_llama(), config)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.deltas["default"].lora_A.shape == (0, 32)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    perturb_adapter(model)
    model.save_pretrained(tmp_path)
    inputs = without_labels(make_causal_lm_inputs)(model)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_parameter_counts_equal_peft_and_ranknum_is_neither_trained_nor_saved(tmp_path: Path) -> None:
    kwargs = dict(task_type="CAUSAL_LM", total_step=5)
    ours = dt.get_peft_model(tiny_llama(), AdaLoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()  # peft counts ranknum too
    assert ours.get_nb_trainable_parameters()[0] > 0
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n.endswith("ranknum"))
    ours.save_pretrained(tmp_path)
    assert not any(k.endswith("ranknum") for k in load_file(tmp_path / "adapter_model.safetensors"))


# --- mixed batches and configs ---------------------------------------------------------------------------------------

def test_mixed_adapter_batch_equals_each_row_with_its_adapter_alone() -> None:
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, init_r=3))
    model.add_adapter("other", AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, target_modules=["v_proj", "o_proj"]))
    perturb_adapter(model, "default", seed=1)
    perturb_adapter(model, "other", seed=2)
    inputs = without_labels(make_causal_lm_inputs)(model, batch=3)
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "needs total_step"),
        (dict(total_step=10, tinit=5, tfinal=5), "leave no budgeting phase"),
        (dict(total_step=10, use_dora=True), "DoRA"),
        (dict(total_step=10, init_lora_weights="pissa"), "init schemes"),
        (dict(total_step=10, beta1=1.0), "beta1"),
        (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(total_step=10, init_r=0), "init_r > 0"),
        (dict(total_step=10, init_r=2, rank_pattern={"q_proj.lora_E": [True]}), "init_r=2 booleans"),
        (dict(total_step=10, rank_pattern={"q_proj": [True] * 12}), "lora_E"),
    ],
)
def test_invalid_configs_raise_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**kwargs)


def test_fields_peft_ignores_for_adalora_warn() -> None:
    with pytest.warns(UserWarning, match="AdaLoRA ignores \\['r'"):
        AdaLoraConfig(total_step=10, r=4)


def test_config_round_trips_through_json_with_peft_fields(tmp_path: Path) -> None:
    config = AdaLoraConfig(total_step=10, tinit=1, deltaT=2, beta2=0.5, target_r=3,
                           rank_pattern={"x.lora_E": [True] * 11 + [False]})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["deltaT"] == 2
    assert dt.PeftConfig.from_pretrained(tmp_path) == config
    assert peft.PeftConfig.from_pretrained(tmp_path).rank_pattern == config.rank_pattern

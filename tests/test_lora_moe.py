"""LoRA on nn.Parameters (``target_parameters``): MoE experts stored as fused 3-D tensors.

Interop with peft (keys, outputs, both ways) for Mixtral, Qwen3-MoE and GPT-OSS runs in tests/test_interop_peft.py
(``tests/cases/lora.py``); here: the per-expert math against a formula written out, training, merging, generation,
several adapters and the refusals.
"""

from __future__ import annotations

import logging

import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterStateError, ConfigError, TargetError
from tests.cases.lora import EXPERTS, MOE_FACTORIES, tiny_gpt_oss, tiny_mixtral
from tests.models import make_causal_lm_inputs


def _experts(model: torch.nn.Module, layer: int = 0) -> torch.nn.Module:
    return model.get_base_model().model.layers[layer].mlp.experts


def _adapter(factory=tiny_mixtral, **kwargs) -> dt.PeftModel:
    config = dict(target_modules=[], target_parameters=EXPERTS, r=2, init_lora_weights=False)
    return dt.get_peft_model(factory(), dt.LoraConfig(**{**config, **kwargs}))


def _expected_update(a: torch.Tensor, b: torch.Tensor, experts: int, scaling: float) -> list[torch.Tensor]:
    """peft's layout written out: expert e owns rows e·r.. of A and columns e, e+E, ... of B."""
    r = a.shape[0] // experts
    return [scaling * b[:, [k * experts + e for k in range(r)]] @ a[e * r:(e + 1) * r] for e in range(experts)]


@pytest.mark.parametrize("factory", [tiny_mixtral, tiny_gpt_oss], ids=["out-in", "in-out-transposed"])
def test_merge_adds_each_experts_own_low_rank_update(factory) -> None:
    model = _adapter(factory, lora_alpha=4)
    base = {n: p.detach().clone() for n, p in _experts(model).named_parameters() if "lora" not in n}
    outer = _experts(model)  # the layer of down_proj, around the layer of gate_up_proj (registration order)
    inner = outer.base_layer
    expected = {}
    for layer, name in ((inner, "gate_up_proj"), (outer, "down_proj")):
        delta = layer.deltas["default"]
        assert delta.parameter_name == name
        updates = _expected_update(delta.lora_A.weight, delta.lora_B.weight, 4, 4 / 2)
        transposed = factory is tiny_gpt_oss
        expected[name] = torch.stack([u.T if transposed else u for u in updates])
    model.merge_adapter()
    owner = dt.layers.unwrap(_experts(model))
    for name, update in expected.items():
        key = next(k for k in base if k.endswith(name))
        torch.testing.assert_close(getattr(owner, name), base[key] + update)
    model.unmerge_adapter()
    torch.testing.assert_close(owner.down_proj, base[next(k for k in base if k.endswith("down_proj"))])


@pytest.mark.parametrize("kind", sorted(MOE_FACTORIES))
def test_experts_train_and_generate(kind: str) -> None:
    factory = MOE_FACTORIES[kind]
    model = dt.get_peft_model(factory(), dt.LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS, r=2))
    inputs = make_causal_lm_inputs(model)
    base_logits = factory()(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, base_logits)  # B = 0: the base model
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("experts.base_layer.deltas.default.lora_B" in n for n in trained)
    assert all("deltas" in n for n in trained)  # expert tensors and everything else stay frozen
    optimizer.step()
    model.eval()
    assert (model(**inputs).logits - base_logits).abs().max() > 1e-4
    ids = inputs["input_ids"][:1]
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(merged.generate(input_ids=ids, max_new_tokens=4, do_sample=False), cached)


def test_get_peft_model_reports_how_many_expert_parameters_were_adapted(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="deltatune"):
        _adapter()
    assert "adapted 4 parameters (16 expert matrices)" in caplog.text  # 2 layers x 2 projections x 4 experts


def test_a_config_matching_no_parameter_is_refused_listing_the_candidates() -> None:
    model = tiny_mixtral()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"matched no parameter.*'experts\.gate_up_proj'"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=[], target_parameters=["experts.up_proj"]))
    assert all(isinstance(m, torch.nn.Module) and not isinstance(m, dt.layers.AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [(dict(lora_dropout=0.1), "lora_dropout"), (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
     (dict(init_lora_weights="pissa"), "init_lora_weights")],
)
def test_options_peft_refuses_for_parameters_are_refused_by_name(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=f"target_parameters.*{field}|{field}.*target_parameters"):
        dt.LoraConfig(target_parameters=EXPERTS, **kwargs)


def test_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match="target_parameters"):
        dt.LoraConfig(target_parameters="experts.gate_up_proj")


def test_a_module_cannot_be_both_a_module_target_and_hold_a_parameter_target() -> None:
    with pytest.raises(TargetError, match="target_modules"):
        dt.get_peft_model(tiny_mixtral(), dt.LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))


def test_two_adapters_share_the_nesting_and_switch() -> None:
    model = _adapter()
    model.add_adapter("other", dt.LoraConfig(target_modules=[], target_parameters=EXPERTS, r=4,
                                             init_lora_weights=False))
    inputs = make_causal_lm_inputs(model)
    first = model(**inputs).logits
    model.set_adapter("other")
    second = model(**inputs).logits
    assert (first - second).abs().max() > 1e-4
    assert set(_experts(model).deltas) == set(_experts(model).base_layer.deltas) == {"default", "other"}
    with pytest.raises(TargetError, match="same parameters"):
        model.add_adapter("third", dt.LoraConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    model.delete_adapter("default")
    torch.testing.assert_close(model(**inputs).logits, second)
    with pytest.raises(ConfigError, match="target_parameters"):
        model.add_weighted_adapter(["other"], [1.0], "combined")


def test_mixed_adapter_batches_are_refused() -> None:
    model = _adapter()
    inputs = make_causal_lm_inputs(model)
    with pytest.raises(AdapterStateError, match="target_parameters"):
        model(**inputs, adapter_names=["default", "__base__"])


def test_unload_gives_back_the_expert_module_and_its_tensors() -> None:
    model = _adapter()
    experts = dt.layers.unwrap(_experts(model))
    unloaded = model.unload()
    assert unloaded.model.layers[0].mlp.experts is experts
    reference = tiny_mixtral()
    assert all(torch.equal(p, reference.state_dict()[n]) for n, p in unloaded.state_dict().items())

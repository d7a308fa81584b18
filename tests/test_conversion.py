"""``convert_to_lora`` / ``save_as_lora``: any adapter that merges into Linear / Conv1D weights becomes a LoRA whose
``B @ A`` is the best rank-k approximation of its update (checked against the singular values of the merged model's
weight change, Eckart–Young), exact at full rank (the converted LoRA's outputs equal the original adapter's), the
same config and keys as peft's conversion of the same adapter, and one clear error for what cannot convert."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.adapter_utils import snapshot
from tests.models import make_causal_lm_inputs, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapted(config: dt.PeftConfig, factory=tiny_llama) -> dt.PeftModel:
    torch.manual_seed(0)
    return dt.get_peft_model(factory(), config).eval()


def _updates(model: dt.PeftModel) -> dict[str, torch.Tensor]:
    """Each adapted module's weight change, (out, in), from merge_and_unload of a copy minus the base weights."""
    import copy

    base = dict(copy.deepcopy(model).get_base_model().named_modules())
    merged = dict(copy.deepcopy(model).merge_and_unload().named_modules())
    out = {}
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, dt.AdapterLayer):
            before = base[name].base_layer.weight.float()
            change = merged[name].weight.float() - before
            out[name] = change.T if change.shape != (layer.out_features, layer.in_features) else change
    return out


@pytest.mark.parametrize("config", [
    dt.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
    dt.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
    dt.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False),
], ids=["loha", "lokr", "ia3"])
def test_full_rank_conversion_reproduces_the_adapter(config, tmp_path):
    model = _adapted(config)
    inputs = make_causal_lm_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    dt.save_as_lora(tmp_path, model, rank=1.0)  # all the energy: every singular value the update has
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["rank_pattern"] == saved["alpha_pattern"]  # scaling 1 everywhere
    converted = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_a_truncated_rank_is_the_best_approximation_and_a_threshold_keeps_that_share_of_energy():
    model = _adapted(dt.LoHaConfig(r=8, target_modules=TARGETS, init_weights=False))
    updates = _updates(model)
    config, tensors = dt.convert_to_lora(model, rank=3)
    assert config.rank_pattern == {} and set(config.target_modules) == {*TARGETS, *updates}
    for name, update in updates.items():
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (3, update.shape[1]) and b.shape == (update.shape[0], 3)
        s = torch.linalg.svdvals(update.double())
        residual = torch.linalg.matrix_norm((update - b @ a).double())
        torch.testing.assert_close(residual, s[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)

    config, tensors = dt.convert_to_lora(model, rank=0.9)
    for name, update in updates.items():
        energy = torch.linalg.svdvals(update.double()).square()
        share = energy.cumsum(0) / energy.sum()
        k = int((share < 0.9).sum()) + 1  # the fewest singular values reaching 90% of the energy
        assert config.rank_pattern[name] == config.alpha_pattern[name] == k
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == k


def test_conv1d_updates_are_transposed_into_linear_lora_factors(tmp_path):
    model = _adapted(dt.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], init_weights=False), tiny_gpt2)
    inputs = make_causal_lm_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    dt.save_as_lora(tmp_path, model, rank=16)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (16, 32)  # (r, in)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 16)  # (out, r)
    converted = dt.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_modules_to_save_are_carried_over():
    model = _adapted(dt.LoHaConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_weights=False))
    config, tensors = dt.convert_to_lora(model, rank=2)
    assert config.modules_to_save == ["lm_head"]
    saved = dt.get_peft_model_state_dict(model)
    assert torch.equal(tensors["base_model.model.lm_head.weight"], saved["base_model.model.lm_head.weight"])


def test_the_result_equals_peft_conversion_of_the_same_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = _adapted(dt.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False))
    model.save_pretrained(tmp_path / "lokr")
    ours_config, ours = dt.convert_to_lora(model, rank=0.8)
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lokr")
    theirs_config, theirs = peft.convert_to_lora(theirs_model, rank=0.8)
    assert sorted(ours) == sorted(theirs)
    assert ours_config.rank_pattern == theirs_config.rank_pattern
    assert set(ours_config.target_modules) == set(theirs_config.target_modules)
    for key in ours:
        if key.endswith("lora_A.weight"):  # singular vectors are unique up to sign: compare the products B @ A
            b_key = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(ours[b_key] @ ours[key], theirs[b_key] @ theirs[key], rtol=1e-4, atol=1e-5)


def test_what_cannot_convert_is_refused_by_name_and_the_model_is_unchanged():
    model = _adapted(dt.LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False))
    before = snapshot(model)
    for rank, message in [(0, "positive integer"), (1.5, r"in \(0, 1\]"), ("8", "int or a float"),
                          (33, "exceeds layer")]:
        with pytest.raises(dt.ConfigError, match=message):
            dt.convert_to_lora(model, rank=rank)
    with pytest.raises(dt.AdapterStateError, match="no layer adapter named 'other'"):
        dt.convert_to_lora(model, rank=2, adapter_name="other")
    with pytest.raises(dt.ConfigError, match="compile_kwargs"):
        dt.convert_to_lora(model, rank=2, compile_kwargs={})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.merge_adapter()
    with pytest.raises(dt.AdapterStateError, match="unmerge first"):
        dt.convert_to_lora(model, rank=2)

    pissa = _adapted(dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(dt.ConfigError, match="init_lora_weights='pissa', which rewrote the base weights"):
        dt.convert_to_lora(pissa, rank=2)
    biased = _adapted(dt.LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(dt.ConfigError, match="bias='all'"):
        dt.convert_to_lora(biased, rank=2)
    prompt = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(dt.AdapterStateError, match="prompt adapters"):
        dt.convert_to_lora(prompt, rank=2)

"""No silent arguments: every keyword of peft's public API that deltatune accepts is implemented with peft's meaning
or refused naming it, and unknown keywords raise ``TypeError`` in every public entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from tests.adapter_utils import logits, perturb_lora, snapshot
from tests.models import make_causal_lm_inputs, tiny_llama


def _lora(**kwargs) -> dt.LoraConfig:
    return dt.LoraConfig(target_modules=["q_proj", "v_proj"], **kwargs)


def _saved(tmp_path: Path, **kwargs) -> tuple[Path, torch.Tensor]:
    model = dt.get_peft_model(tiny_llama(), _lora(**kwargs))
    perturb_lora(model)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a", logits(model.eval(), make_causal_lm_inputs(model))


# --- unknown keywords ----------------------------------------------------------------------------------------------

def test_unknown_keywords_are_type_errors_everywhere(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    with pytest.raises(TypeError, match="bogus_arg"):
        dt.get_peft_model(tiny_llama(), _lora(), bogus_arg=1)
    for cls in (dt.PeftModel, dt.PeftModelForCausalLM, dt.PeftModelForSequenceClassification):
        with pytest.raises(TypeError, match="bogus_arg"):
            cls(tiny_llama(), _lora(), bogus_arg=1)
    with pytest.raises(TypeError, match="bogus_arg"):
        dt.PeftModel.from_pretrained(tiny_llama(), path, bogus_arg=1)
    model = dt.PeftModel.from_pretrained(tiny_llama(), path)
    with pytest.raises(TypeError, match="bogus_arg"):
        model.load_adapter(path, "other", bogus_arg=1)
    assert "other" not in model.peft_config
    with pytest.raises(TypeError, match="bogus_arg"):
        model.save_pretrained(tmp_path / "b", bogus_arg=1)
    assert not (tmp_path / "b").exists()


def test_peft_only_options_are_refused_by_name() -> None:
    assert isinstance(dt.get_peft_model(tiny_llama(), _lora(), mixed=True), dt.PeftMixedModel)  # tests/test_mixed.py
    with pytest.raises(dt.ConfigError, match="PROMPT_TUNING adapters cannot be mixed"):
        dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), mixed=True)
    with pytest.raises(dt.ConfigError, match="low_cpu_mem_usage"):
        dt.get_peft_model(tiny_llama(), _lora(), low_cpu_mem_usage=True)
    model = dt.get_peft_model(tiny_llama(), _lora())
    before = snapshot(model)
    with pytest.raises(dt.ConfigError, match="low_cpu_mem_usage"):
        model.add_adapter("b", _lora(), low_cpu_mem_usage=True)
    assert "b" not in model.peft_config and snapshot(model).keys() == before.keys()


def test_revision_is_recorded_as_peft_does() -> None:
    model = dt.get_peft_model(tiny_llama(), _lora(), revision="v1")
    assert model.peft_config["default"].revision == "v1"


# --- autocast_adapter_dtype ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("autocast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype(autocast: bool, expected: torch.dtype, tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama().to(torch.bfloat16), _lora(), autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert dtypes == {expected}
    model(**make_causal_lm_inputs(model))  # runs in that dtype
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(
        tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast
    )
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {expected}
    loaded.load_adapter(tmp_path, "b", autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in loaded.named_parameters() if ".b." in n} == {expected}


def test_autocast_adapter_dtype_false_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    ours = dt.get_peft_model(tiny_llama().to(torch.bfloat16), _lora(), autocast_adapter_dtype=False)
    theirs = peft.get_peft_model(
        tiny_llama().to(torch.bfloat16), peft.LoraConfig(target_modules=["q_proj", "v_proj"]),
        autocast_adapter_dtype=False,
    )
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {
        p.dtype for p in theirs.parameters() if p.requires_grad
    }


# --- loading options -----------------------------------------------------------------------------------------------

def test_key_mapping_renames_saved_keys_as_peft(tmp_path: Path) -> None:
    path, expected = _saved(tmp_path)
    # Pretend the adapter was saved for a model whose 'self_attn' was called 'attention'.
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    save_file({k.replace("self_attn", "attention"): v for k, v in load_file(file).items()}, file)
    with pytest.raises(dt.AdapterLoadError):
        dt.PeftModel.from_pretrained(tiny_llama(), path)
    mapping = {r"\.attention\.": ".self_attn."}
    model = dt.PeftModel.from_pretrained(tiny_llama(), path, key_mapping=mapping)
    assert torch.equal(logits(model, make_causal_lm_inputs(model)), expected)
    model.load_adapter(path, "b", key_mapping=mapping)
    model.set_adapter("b")
    assert torch.equal(logits(model, make_causal_lm_inputs(model)), expected)


def test_load_options_that_change_nothing_are_checked(tmp_path: Path) -> None:
    path, expected = _saved(tmp_path)
    model = dt.PeftModel.from_pretrained(
        tiny_llama(), path, low_cpu_mem_usage=True, ephemeral_gpu_offload=not torch.cuda.is_available(),
        torch_device="cpu",
    )
    assert torch.equal(logits(model, make_causal_lm_inputs(model)), expected)
    model.load_adapter(path, "b", torch_device="cpu", low_cpu_mem_usage=True)
    with pytest.raises(TypeError, match="torch_device"):
        model.load_adapter(path, "c", torch_device="not-a-device")
    assert "c" not in model.peft_config


def test_load_adapter_into_an_existing_adapter_replaces_its_weights_in_place(tmp_path: Path) -> None:
    path, expected = _saved(tmp_path)
    model = dt.get_peft_model(tiny_llama(), _lora())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.load_adapter(path, "default")
    assert torch.equal(logits(model.eval(), make_causal_lm_inputs(model)), expected)
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == params  # same objects, still trainable
    other = tmp_path / "other"
    dt.get_peft_model(tiny_llama(), _lora(r=4)).save_pretrained(other)
    with pytest.raises(dt.ConfigError, match=r"differs in \['r'\]"):
        model.load_adapter(other, "default")


# --- PiSSA / OLoRA -> plain LoRA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", False), ("pissa_niter_4", True)])
def test_mutated_init_converts_to_a_lora_for_the_original_base(init: str, rslora: bool, tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=init, use_rslora=rslora, r=4, lora_alpha=8))
    model.save_pretrained(tmp_path / "init")
    perturb_lora(model)  # "training"
    inputs = make_causal_lm_inputs(model)
    expected = logits(model.eval(), inputs)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    converted = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
    assert torch.allclose(logits(converted, inputs), expected, atol=1e-5)
    # Saved as-is, the adapter differs on the original base: the conversion is what makes it right.
    model.save_pretrained(tmp_path / "raw")
    raw = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "raw", config=dt.LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=rslora))
    assert not torch.allclose(logits(raw, inputs), expected, atol=1e-3)


def test_converted_adapter_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights="pissa", r=4))
    model.save_pretrained(tmp_path / "init")
    perturb_lora(model)
    inputs = make_causal_lm_inputs(model)
    expected = logits(model.eval(), inputs)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
    assert torch.allclose(logits(theirs, inputs), expected, atol=1e-5)


def test_conversion_of_a_non_lora_adapter_is_refused(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(dt.ConfigError, match="LoRA"):
        model.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "x").exists()


def test_inject_low_cpu_mem_usage_needs_the_state_dict(tmp_path: Path) -> None:
    path, expected = _saved(tmp_path)
    from safetensors.torch import load_file

    with pytest.raises(dt.ConfigError, match="low_cpu_mem_usage"):
        dt.inject_adapter_in_model(_lora(), tiny_llama(), low_cpu_mem_usage=True)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(path / "adapter_model.safetensors").items()}
    model = dt.inject_adapter_in_model(_lora(), tiny_llama(), low_cpu_mem_usage=True, state_dict=state)
    assert torch.equal(logits(model, make_causal_lm_inputs(model)), expected)

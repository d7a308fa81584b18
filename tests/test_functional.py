"""peft's module-level API: adapters injected into a plain module, state dicts in the saved format, and status
reports. peft is the oracle for keys and numbers."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.adapter_utils import logits, snapshot
from tests.models import TinyMLP, make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp

_MLP_CONFIG = dict(target_modules=["lin0", "lin1"], modules_to_save=["head"], r=4)


def _mlp_out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(make_mlp_inputs()["x"])


def _nonzero_injected(seed: int = 0) -> TinyMLP:
    model = dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), tiny_mlp())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def test_injected_model_keeps_its_class_and_starts_as_the_base() -> None:
    model = dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), tiny_mlp())
    assert type(model) is TinyMLP
    assert torch.equal(_mlp_out(model), _mlp_out(tiny_mlp()))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".deltas.default." in n or ".modules_to_save.default." in n for n in trainable)


def test_injected_adapter_state_dict_moves_to_peft_and_back() -> None:
    ours = _nonzero_injected()
    saved = dt.get_peft_model_state_dict(ours)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**_MLP_CONFIG), tiny_mlp())
    assert set(saved) == set(peft.get_peft_model_state_dict(theirs))
    peft.set_peft_model_state_dict(theirs, saved)
    torch.testing.assert_close(_mlp_out(theirs), _mlp_out(ours))

    back = dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), tiny_mlp())
    result = dt.set_peft_model_state_dict(back, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_mlp_out(back), _mlp_out(ours))


def test_inject_with_state_dict_loads_it() -> None:
    ours = _nonzero_injected()
    again = dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), tiny_mlp(),
                                       state_dict=dt.get_peft_model_state_dict(ours))
    torch.testing.assert_close(_mlp_out(again), _mlp_out(ours))


def test_peft_model_state_dict_is_what_save_pretrained_writes(tmp_path) -> None:
    from safetensors.torch import load_file

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    written = load_file(tmp_path / "adapter_model.safetensors")
    state = dt.get_peft_model_state_dict(model)
    assert state.keys() == written.keys()
    assert all(torch.equal(state[k], written[k]) for k in state)


def test_state_dict_argument_supplies_the_values() -> None:
    # e.g. a full state dict gathered from sharded training: its values, the adapter's saved keys
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    full = {k: v * 2 for k, v in model.state_dict().items()}
    doubled = dt.get_peft_model_state_dict(model, state_dict=full)
    plain = dt.get_peft_model_state_dict(model)
    assert doubled.keys() == plain.keys()
    assert all(torch.equal(doubled[k], plain[k] * 2) for k in plain)
    with pytest.raises(dt.AdapterStateError, match="state_dict lacks"):
        dt.get_peft_model_state_dict(model, state_dict={})


@pytest.mark.parametrize("config", [
    dt.VeraConfig(task_type="CAUSAL_LM", r=4, save_projection=True),  # shared tensors: base_model.vera_A
    dt.ShadowConfig(task_type="CAUSAL_LM", r=4),  # a network of its own: base_model.shadow_backbone...
], ids=["vera", "shadow"])
def test_save_pretrained_takes_a_gathered_state_dict_in_either_key_form(tmp_path, config) -> None:
    model = dt.get_peft_model(tiny_llama(), config)
    live = model.adapter_state_dict()
    # keys as the model (wrapped by FSDP) names them, and keys as the file names them (what peft also accepts)
    by_model = {"_fsdp_wrapped_module." + k: v * 3 for k, v in model.state_dict().items()}
    by_file = {k: v * 3 for k, v in live.items()}
    for name, gathered in (("model", by_model), ("file", by_file)):
        model.save_pretrained(tmp_path / name, state_dict=gathered)
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        assert saved.keys() == live.keys()
        assert all(torch.equal(saved[k], live[k] * 3) for k in live), name
    with pytest.raises(dt.ConfigError, match="prompt adapter"):
        prompt = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
        prompt.save_pretrained(tmp_path / "p", state_dict=prompt.state_dict())


def test_set_state_dict_refuses_bad_input_and_changes_nothing() -> None:
    model = _nonzero_injected()
    before = snapshot(model)
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in dt.get_peft_model_state_dict(model).items()}
    with pytest.raises(dt.AdapterLoadError, match="shape"):
        dt.set_peft_model_state_dict(model, bad)
    with pytest.raises(dt.ConfigError, match="ignore_mismatched_sizes"):
        dt.set_peft_model_state_dict(model, dt.get_peft_model_state_dict(model), ignore_mismatched_sizes=True)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key]), key


def test_inject_refuses_prompt_methods_and_duplicate_names() -> None:
    with pytest.raises(dt.ConfigError, match="prompt method"):
        dt.inject_adapter_in_model(dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tiny_llama())
    model = dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), tiny_mlp())
    with pytest.raises(dt.AdapterStateError, match="already has an adapter named 'default'"):
        dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), model)


def test_disable_adapter_layers_lasts_until_enabled_and_survives_the_context_manager() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    inputs = make_causal_lm_inputs(model)
    base, adapted = logits(tiny_llama(), inputs), logits(model, inputs)
    model.disable_adapter_layers()
    assert torch.equal(logits(model, inputs), base)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), base)
    assert torch.equal(logits(model, inputs), base)  # still disabled after the block
    model.enable_adapter_layers()
    assert torch.equal(logits(model, inputs), adapted)


def test_layer_and_model_status_report_each_adapters_state() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.add_adapter("mlp", dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["down_proj"]))
    layers = model.get_layer_status()
    assert [s.name for s in layers] == [
        "base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj",
        "base_model.model.model.layers.1.self_attn.q_proj", "base_model.model.model.layers.1.mlp.down_proj",
    ]
    q, down = layers[0], layers[1]
    assert (q.module_type, q.available_adapters, q.active_adapters) == ("Linear", ["default"], ["default"])
    assert (down.available_adapters, down.active_adapters, down.requires_grad) == (["mlp"], [], {"mlp": False})
    assert q.requires_grad == {"default": True} and q.devices == {"default": ["cpu"]}

    status = model.get_model_status()
    assert status.peft_types == {"default": "LORA", "mlp": "LORA"}
    assert status.num_adapter_layers == 4 and status.base_model_type == "LlamaForCausalLM"
    assert (status.active_adapters, status.merged_adapters, status.enabled) == (["default"], [], True)
    assert status.available_adapters == ["default", "mlp"]
    assert status.requires_grad == {"default": True, "mlp": False}
    assert (status.trainable_params, status.total_params) == model.get_nb_trainable_parameters()

    model.base_model.model.model.layers[0].self_attn.q_proj.merge(["default"])  # one layer merged on its own
    assert model.get_model_status().merged_adapters == "irregular"
    model.merge_adapter()
    assert model.get_model_status().merged_adapters == ["default"]


def test_status_of_an_injected_model_and_of_a_model_without_adapters() -> None:
    model = dt.inject_adapter_in_model(dt.LoraConfig(**_MLP_CONFIG), tiny_mlp())
    status = dt.get_model_status(model)
    assert status.adapter_model_type == "injected" and status.num_adapter_layers == 3  # lin0, lin1, head copy
    with pytest.raises(dt.AdapterStateError, match="no adapter layers"):
        dt.get_layer_status(tiny_mlp())


def test_base_model_shares_the_peft_config_dict() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))
    model.add_adapter("other", dt.LoraConfig(task_type="CAUSAL_LM"))
    assert model.base_model.peft_config is model.peft_config
    assert set(model.base_model.peft_config) == {"default", "other"}

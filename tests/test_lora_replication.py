"""LoRA's ``layer_replication`` (peft's meaning): decoder layers stacked deeper, copies sharing the base weights, one
adapter per copy. Interop with peft runs in tests/test_interop_peft.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.errors import AdapterLoadError, AdapterStateError, ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import logits
from tests.models import make_causal_lm_inputs, tiny_llama

MAP = [[0, 2], [1, 2]]  # layers 0 1 1


def _adapter(**kwargs) -> dt.PeftModel:
    config = dict(target_modules=["q_proj"], layer_replication=MAP, init_lora_weights=False)
    return dt.get_peft_model(tiny_llama(), dt.LoraConfig(**{**config, **kwargs}))


def test_copies_share_the_base_weights_and_get_their_own_adapter() -> None:
    model = _adapter()
    layers = model.get_base_model().model.layers
    assert len(layers) == 3 and model.get_base_model().config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    first, second = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert first.base_layer.weight is second.base_layer.weight
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert first.deltas["default"].lora_A.weight is not second.deltas["default"].lora_A.weight
    # the copy computes layer 1 again on layer 1's output: the base model with layer 1 applied twice
    base = tiny_llama()
    with torch.no_grad():
        model.disable_adapter_layers()
        inputs = make_causal_lm_inputs(model)
        base.model.layers = torch.nn.ModuleList([base.model.layers[0], base.model.layers[1], base.model.layers[1]])
        for index, layer in enumerate(base.model.layers):
            layer.self_attn.layer_idx = index  # the same module twice: the cache needs its index per call
        base.config.num_hidden_layers = 3
        expected = base(**inputs, use_cache=False).logits
        torch.testing.assert_close(model(**inputs, use_cache=False).logits, expected)


def test_cached_generation_equals_uncached_and_merging_is_refused() -> None:
    model = _adapter()
    ids = make_causal_lm_inputs(model)["input_ids"][:1]
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(cached, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                                      use_cache=False))
    with pytest.raises(AdapterStateError, match="layer_replication"):
        model.merge_adapter()


def test_a_refused_adapter_leaves_the_layers_as_they_were() -> None:
    model = tiny_llama()
    layers = model.model.layers
    with pytest.raises(TargetError):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["nope"], layer_replication=MAP))
    assert model.model.layers is layers and model.config.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="beyond the model's 2 layers"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 3]]))
    assert model.model.layers is layers
    with pytest.raises(TargetError, match="modules_to_save"):  # refused after the layers were replicated
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj"], layer_replication=MAP,
                                               modules_to_save=["nope"]))
    assert model.model.layers is layers and model.config.num_hidden_layers == 2


def test_a_second_adapter_shares_the_replication_or_is_refused() -> None:
    model = _adapter()
    model.add_adapter("other", dt.LoraConfig(target_modules=["v_proj"], layer_replication=MAP))
    assert len(model.get_base_model().model.layers) == 3
    with pytest.raises(ConfigError, match="differs"):
        model.add_adapter("third", dt.LoraConfig(target_modules=["v_proj"], layer_replication=[[0, 2]]))


@pytest.mark.parametrize("bad", [[], [[1, 1]], [[0]], [[-1, 2]], [[0, "2"]]])
def test_bad_ranges_are_refused_by_name(bad) -> None:
    with pytest.raises(ConfigError, match="layer_replication"):
        dt.LoraConfig(layer_replication=bad)


WEIGHTS = "adapter_model.safetensors"


def _state(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor], int]:
    """What a failed load must leave as it was: module names, every tensor, the configured depth."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return [n for n, _ in model.named_modules()], state, model.config.num_hidden_layers


def _assert_unchanged(model: torch.nn.Module, before: tuple[list[str], dict[str, torch.Tensor], int]) -> None:
    names, state, depth = _state(model)
    assert names == before[0] and depth == before[2] and len(model.model.layers) == 2
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not hasattr(model, "_deltatune_layer_replication")


def _corrupt(directory: Path, how: str) -> None:
    """Break a saved adapter: a tensor of the wrong shape, one missing, or a truncated file."""
    path = directory / WEIGHTS
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
        return
    tensors = load_file(path)
    key = sorted(tensors)[-1]  # a q_proj factor of the last (replicated) layer
    if how == "shape":
        tensors[key] = torch.zeros(3, 3)
    else:
        del tensors[key]
    save_file(tensors, path)


@pytest.mark.parametrize("how", ["shape", "missing", "truncated"])
def test_a_failed_load_leaves_the_model_unreplicated(how: str, tmp_path: Path) -> None:
    saved = _adapter()
    saved.save_pretrained(tmp_path)
    good = (tmp_path / WEIGHTS).read_bytes()
    _corrupt(tmp_path, how)
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        dt.PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, before)
    # load_adapter onto a model with an adapter that has no layers of its own (a prompt), which may replicate
    wrapped = dt.get_peft_model(model, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        wrapped.load_adapter(tmp_path, "replicated")
    assert list(wrapped.peft_config) == ["default"]
    _assert_unchanged(model, before)
    # the model is as good as new: the intact file loads (and replicates) as on a fresh model
    (tmp_path / WEIGHTS).write_bytes(good)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert len(loaded.get_base_model().model.layers) == 3
    inputs = make_causal_lm_inputs(saved)
    torch.testing.assert_close(logits(loaded, inputs, use_cache=False), logits(saved, inputs, use_cache=False))


def test_inject_with_a_bad_state_dict_leaves_the_model_as_it_was() -> None:
    model = tiny_llama()
    before = _state(model)
    config = dt.LoraConfig(target_modules=["q_proj"], layer_replication=MAP)
    bad = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 3)}
    with pytest.raises(AdapterLoadError, match="shape"):
        dt.inject_adapter_in_model(config, model, state_dict=bad)
    _assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())  # not frozen by the refused adapter either


def test_a_load_refused_by_strict_base_leaves_the_model_unreplicated(tmp_path: Path) -> None:
    _adapter().save_pretrained(tmp_path)
    model = tiny_llama(seed=1)  # another base: the saved fingerprint does not match, checked after the load
    before = _state(model)
    with pytest.raises(AdapterLoadError):
        dt.PeftModel.from_pretrained(model, tmp_path, strict_base=True)
    _assert_unchanged(model, before)


def _replicated(model: torch.nn.Module, layer_map: list[list[int]] = MAP) -> dt.PeftModel:
    return dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj"], layer_replication=layer_map,
                                                  init_lora_weights=False))


@pytest.mark.parametrize("layer_map", [MAP, [[1, 2], [1, 2]]])  # the second leaves layer 0 out
def test_unload_gives_back_the_original_layers(layer_map: list[list[int]]) -> None:
    model = tiny_llama()
    layers, originals, before = model.model.layers, list(model.model.layers), _state(model)
    peft_model = _replicated(model, layer_map)
    peft_model.add_adapter("other", dt.LoraConfig(target_modules=["v_proj"], layer_replication=layer_map))
    peft_model.train()  # a mode set while replicated reaches the original layers too
    base = peft_model.unload()
    assert base is model and base.model.layers is layers and list(layers) == originals
    _assert_unchanged(base, before)
    assert all(module.training for module in base.modules())
    inputs = make_causal_lm_inputs(base)
    torch.testing.assert_close(logits(base, inputs), logits(tiny_llama(), inputs), rtol=0, atol=0)
    again = _replicated(base, [[0, 2], [0, 2]])  # replicates afresh, with other ranges too
    assert len(again.get_base_model().model.layers) == 4


def test_unload_carries_over_what_a_cast_changed_in_layer_buffers() -> None:
    model = tiny_llama()
    model.model.layers[1].register_buffer("scale", torch.ones(2))  # a per-layer buffer: copied, not shared
    peft_model = _replicated(model)
    peft_model.double()
    base = peft_model.unload()
    assert len(base.model.layers) == 2 and base.model.layers[1].scale.dtype == torch.float64
    assert {t.dtype for t in base.state_dict().values()} == {torch.float64}


def test_deleting_the_adapter_that_replicated_puts_the_layers_back() -> None:
    model = tiny_llama()
    layers = model.model.layers
    inputs = make_causal_lm_inputs(model)
    expected = logits(model, inputs)
    peft_model = _replicated(model)
    peft_model.add_adapter("head", dt.LoraConfig(target_modules=["lm_head"]))  # outside the layers; B = 0
    peft_model.set_adapter("head")
    peft_model.delete_adapter("default")
    assert model.model.layers is layers and model.config.num_hidden_layers == 2
    assert not hasattr(model, "_deltatune_layer_replication") and list(peft_model.peft_config) == ["head"]
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=0, atol=0)  # two layers again
    before = _state(tiny_llama())
    _assert_unchanged(peft_model.unload(), before)


def test_a_shared_replication_stays_until_its_last_adapter_is_deleted() -> None:
    model = tiny_llama()
    layers = model.model.layers
    peft_model = _replicated(model)
    peft_model.add_adapter("other", dt.LoraConfig(target_modules=["v_proj"], layer_replication=MAP,
                                                  init_lora_weights=False))
    peft_model.set_adapter("other")
    inputs = make_causal_lm_inputs(model)
    expected = logits(peft_model, inputs)
    replicated = model.model.layers
    peft_model.delete_adapter("default")
    assert model.model.layers is replicated and model.config.num_hidden_layers == 3  # "other" still needs them
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=0, atol=0)
    peft_model.add_adapter("head", dt.LoraConfig(target_modules=["lm_head"]))
    peft_model.set_adapter("head")
    peft_model.delete_adapter("other")
    assert model.model.layers is layers and model.config.num_hidden_layers == 2


def test_deleting_it_is_refused_while_another_adapter_lives_in_the_copies() -> None:
    peft_model = _adapter()
    peft_model.add_adapter("plain", dt.LoraConfig(target_modules=["v_proj"], init_lora_weights=False))  # 3 layers
    peft_model.set_adapter("plain")
    model = peft_model.get_base_model()
    inputs = make_causal_lm_inputs(model)
    expected, names, state = logits(peft_model, inputs), _state(model)[0], _state(model)[1]
    with pytest.raises(AdapterStateError, match=r"\['plain'\] adapt the layers that layer_replication"):
        peft_model.delete_adapter("default")
    assert list(peft_model.peft_config) == ["default", "plain"] and _state(model)[0] == names
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=0, atol=0)
    with pytest.raises(AdapterStateError, match="layer_replication"):  # nor merged (the copies share weights)
        peft_model.merge_and_unload(adapter_names=["default"])
    assert len(model.model.layers) == 3 and list(peft_model.peft_config) == ["default", "plain"]

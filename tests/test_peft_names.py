"""The rest of peft 0.21.2's top-level names (``peft.__all__``): a peft user switches by changing one import. peft is
the oracle for each name's behaviour: same outputs, keys, error and warning classes."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import save_file

import deltatune as dt
from deltatune.registry import PromptMethod, get_method
from tests.cases import fuzz_seeds, perturb_adapter
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp

_MLP = dict(target_modules=["lin0", "lin1"], modules_to_save=["head"], r=4)


def _x() -> torch.Tensor:
    return make_mlp_inputs()["x"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)


def test_every_peft_name_exists() -> None:
    missing = sorted(set(peft.__all__) - set(dir(dt)))
    assert missing == []
    assert set(peft.__all__) <= set(dt.__all__)


def test_error_and_warning_classes_sit_where_peft_puts_them() -> None:
    assert issubclass(dt.NoMatchingPeftModuleError, dt.PeftError)
    assert issubclass(dt.NoMatchingPeftModuleError, ValueError)
    assert issubclass(dt.PeftWarning, UserWarning) and not issubclass(dt.PeftError, Warning)
    assert issubclass(dt.DeltatuneError, dt.PeftError)  # catching peft's base catches every deltatune error
    assert issubclass(dt.BaseModelMismatchWarning, dt.PeftWarning)
    assert issubclass(dt.QuantizedMergeWarning, dt.PeftWarning)
    config = dict(target_modules=["nope"])
    with pytest.raises(peft.NoMatchingPeftModuleError):
        peft.get_peft_model(tiny_mlp(), peft.LoraConfig(**config))
    with pytest.raises(dt.NoMatchingPeftModuleError):
        dt.get_peft_model(tiny_mlp(), dt.LoraConfig(**config))
    with pytest.raises(dt.NoMatchingPeftModuleError):
        dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=[], target_parameters=["lin0.nope"]))


def test_get_peft_config_reads_peft_config_dicts() -> None:
    data = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["lin0"]).to_dict()
    ours, theirs = dt.get_peft_config(data), peft.get_peft_config(data)
    assert type(ours) is dt.LoraConfig and (ours.r, ours.lora_alpha, ours.target_modules) == (4, 16, ["lin0"])
    assert type(ours).__name__ == type(theirs).__name__
    assert isinstance(dt.get_peft_config(peft.IA3Config(target_modules=["lin0"]).to_dict()), dt.IA3Config)
    with pytest.raises(TypeError):
        peft.get_peft_config({**data, "no_such_field": 1})
    with pytest.raises(TypeError, match="no_such_field"):
        dt.get_peft_config({**data, "no_such_field": 1})
    with pytest.raises(dt.ConfigError, match="NOT_A_METHOD"):
        dt.get_peft_config({"peft_type": "NOT_A_METHOD"})


def test_registry_tables_match_peft() -> None:
    for peft_type, config_class in peft.PEFT_TYPE_TO_CONFIG_MAPPING.items():
        assert dt.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type.value].__name__ == config_class.__name__
        assert dt.PEFT_TYPE_TO_TUNER_MAPPING[peft_type].__name__ == peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type].__name__
    assert dt.PEFT_TYPE_TO_CONFIG_MAPPING[dt.PeftType.LORA] is dt.LoraConfig
    assert dt.PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is dt.LoraModel
    assert dt.PEFT_TYPE_TO_TUNER_MAPPING["P_TUNING"] is dt.PromptEncoder
    assert set(dt.PEFT_TYPE_TO_CONFIG_MAPPING) == set(dt.PeftType) and "NOPE" not in dt.PEFT_TYPE_TO_CONFIG_MAPPING
    assert {k: v.__name__ for k, v in dt.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()} == {
        k: v.__name__ for k, v in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()}


def test_lora_model_matches_peft_both_ways() -> None:
    theirs = peft.LoraModel(tiny_mlp(), peft.LoraConfig(**_MLP), "default")
    _randomize(theirs)
    saved = peft.get_peft_model_state_dict(theirs.model)
    ours = dt.LoraModel(tiny_mlp(), dt.LoraConfig(**_MLP), "default", state_dict=saved)
    assert isinstance(ours, dt.LoraModel) and isinstance(ours.model, type(tiny_mlp()))
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), theirs(_x()))
    assert set(dt.get_peft_model_state_dict(ours.model)) == set(saved)
    # in-memory keys: the base's and modules_to_save's are peft's; adapter tensors live under deltas.<name>
    base_keys = {k for k in ours.state_dict() if ".deltas." not in k}
    assert base_keys == {k for k in theirs.state_dict() if ".lora_" not in k}
    assert ours.peft_config["default"].r == 4 and ours.active_adapter == theirs.active_adapter == ["default"]
    assert ours.targeted_module_names == theirs.targeted_module_names

    # and back: our weights load into peft with equal outputs
    _randomize(ours, seed=1)
    back = peft.LoraModel(tiny_mlp(), peft.LoraConfig(**_MLP), "default")
    peft.set_peft_model_state_dict(back.model, dt.get_peft_model_state_dict(ours.model))
    with torch.no_grad():
        torch.testing.assert_close(back(_x()), ours(_x()))
        merged_ours, merged_theirs = ours.merge_and_unload(), back.merge_and_unload()
        torch.testing.assert_close(merged_ours(_x()), merged_theirs(_x()))
    assert type(merged_ours) is type(tiny_mlp()) and set(merged_ours.state_dict()) == set(tiny_mlp().state_dict())


def test_a_tuner_that_cannot_be_built_leaves_the_model_as_it_was() -> None:
    model = tiny_mlp()
    keys = set(model.state_dict())
    bad = {"lin0.lora_A.weight": torch.zeros(1), "lin0.lora_B.weight": torch.zeros(1)}
    with pytest.raises(dt.AdapterLoadError, match="lora_A"):
        dt.LoraModel(model, dt.LoraConfig(target_modules=["lin0"]), "default", state_dict=bad)
    with pytest.raises(dt.NoMatchingPeftModuleError):
        dt.LoraModel(model, dt.LoraConfig(target_modules=["nope"]), "default")
    with pytest.raises(dt.ConfigError, match="'default'"):
        dt.LoraModel(model, {"other": dt.LoraConfig(target_modules=["lin0"])}, "default")
    assert set(model.state_dict()) == keys and isinstance(model.lin0, torch.nn.Linear)
    torch.testing.assert_close(model(_x()), tiny_mlp()(_x()))


def test_tuner_adapter_operations_follow_peft() -> None:
    config = dt.LoraConfig(**_MLP)
    ours = dt.LoraModel(tiny_mlp(), config, "a")
    ours.peft_config["b"] = config
    ours.inject_adapter(ours.model, "b")
    _randomize(ours)  # only "a" is trainable
    base = tiny_mlp()(_x())
    with torch.no_grad():
        out_a = ours(_x())
        ours.disable_adapter_layers()
        torch.testing.assert_close(ours(_x()), base)
        ours.enable_adapter_layers()
        ours.set_adapter("b", inference_mode=True)
        assert ours.active_adapters == ["b"] and not any(p.requires_grad for p in ours.parameters())
        ours.set_adapter("a")
        torch.testing.assert_close(ours(_x()), out_a)
        ours.merge_adapter()
        torch.testing.assert_close(ours(_x()), out_a)
        ours.unmerge_adapter()
    theirs = peft.LoraModel(tiny_mlp(), peft.LoraConfig(**_MLP), "a")
    theirs.peft_config["b"] = peft.LoraConfig(**_MLP)
    theirs.inject_adapter(theirs.model, "b")
    for model in (ours, theirs):
        model.set_adapter("a")
        with pytest.warns(UserWarning, match="active"):
            model.delete_adapter("a")  # the active one: peft moves to the remaining adapter
    assert ours.active_adapter == theirs.active_adapter == ["b"] and list(ours.peft_config) == ["b"]
    for model in (ours, theirs):
        model.delete_adapter("b")
    assert ours.active_adapters == theirs.active_adapters == [] and ours.peft_config == {}
    with pytest.raises(dt.ConfigError, match="IA3Model"):
        dt.LoraModel(tiny_mlp(), dt.IA3Config(target_modules=["lin0"], feedforward_modules=[]), "default")
    restored = ours.unload()
    torch.testing.assert_close(restored(_x()), base)


def _tuner_seeds() -> dict[str, dt.PeftType]:
    """One loading-fuzzer seed config (tests/cases) per method that has a tuner class."""
    seeds = {}
    for name, seed in fuzz_seeds().items():
        peft_type = seed.config(dt).peft_type
        if not isinstance(get_method(peft_type), PromptMethod) and peft_type not in seeds.values():
            seeds[name] = peft_type
    return seeds


# shared tensors (VeRA), a router loading experts (X-LoRA), a network of its own (Shadow), task routing (Poly),
# model functions (AdaLoRA); the others with -m slow
_TUNERS_BY_DEFAULT = {"VERA", "XLORA", "SHADOW", "POLY", "ADALORA"}


@pytest.mark.parametrize("seed_name", [
    pytest.param(name, marks=() if peft_type.value in _TUNERS_BY_DEFAULT else pytest.mark.slow)
    for name, peft_type in _tuner_seeds().items()])
def test_every_tuner_is_the_peft_model_s_base_model(seed_name: str) -> None:
    """``<X>Model(model, config)`` builds, computes and saves exactly what ``get_peft_model`` does."""
    seed = fuzz_seeds()[seed_name]
    torch.manual_seed(0)
    tuner = dt.PEFT_TYPE_TO_TUNER_MAPPING[seed.config(dt).peft_type](tiny_llama(), seed.config(dt), "default")
    torch.manual_seed(0)
    wrapped = dt.get_peft_model(tiny_llama(), seed.config(dt))
    perturb_adapter(tuner.model)
    perturb_adapter(wrapped.get_base_model())
    inputs = make_causal_lm_inputs(tiny_llama())
    if seed.config(dt).peft_type == dt.PeftType.POLY:
        inputs["task_ids"] = torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(tuner(**inputs).logits, wrapped(**inputs).logits)
        base = tiny_llama()(**{k: v for k, v in inputs.items() if k != "task_ids"}).logits
        assert not torch.allclose(tuner(**inputs).logits, base)
    saved = dt.get_peft_model_state_dict(wrapped)
    assert set(dt.get_peft_model_state_dict(tuner._wrapper)) == set(saved)
    if seed.config(dt).peft_type == dt.PeftType.ADALORA:
        assert callable(tuner.update_and_allocate)  # the method's own functions, as on peft's AdaLoraModel
    unloaded = tuner.unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**{k: v for k, v in inputs.items() if k != "task_ids"}).logits, base)


@pytest.mark.parametrize("name", ["IA3", "LOHA"])
def test_other_tuners_match_peft(name: str) -> None:
    kwargs = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]) if name == "IA3" else \
        dict(target_modules=["lin0", "lin1"], r=2, init_weights=False)
    theirs = peft.PEFT_TYPE_TO_TUNER_MAPPING[name](tiny_mlp(), peft.PEFT_TYPE_TO_CONFIG_MAPPING[name](**kwargs), "x")
    _randomize(theirs)
    ours = dt.PEFT_TYPE_TO_TUNER_MAPPING[name](tiny_mlp(), dt.PEFT_TYPE_TO_CONFIG_MAPPING[name](**kwargs), "x")
    assert type(ours).__name__ == type(theirs).__name__
    dt.set_peft_model_state_dict(ours.model, peft.get_peft_model_state_dict(theirs.model, adapter_name="x"), "x")
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), theirs(_x()))


def test_base_model_state_dict_matches_peft() -> None:
    ours = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(**_MLP))
    theirs = peft.get_peft_model(tiny_mlp(), peft.LoraConfig(**_MLP))
    state = dt.get_base_model_state_dict(ours)
    expected = peft.get_base_model_state_dict(theirs)
    assert set(state) == set(expected) == set(tiny_mlp().state_dict())
    for key in state:
        torch.testing.assert_close(state[key], expected[key])

    fresh = tiny_mlp(seed=7).state_dict()
    before = dt.get_peft_model_state_dict(ours)
    result = dt.set_base_model_state_dict(ours, fresh)
    assert result.missing_keys == result.unexpected_keys == []
    assert all(torch.equal(v, fresh[k]) for k, v in dt.get_base_model_state_dict(ours).items())
    assert all(torch.equal(v, before[k]) for k, v in dt.get_peft_model_state_dict(ours).items())  # adapter untouched

    partial = {k: v for k, v in fresh.items() if k != "lin1.bias"}
    with pytest.raises(RuntimeError, match="Missing"):
        peft.set_base_model_state_dict(theirs, partial)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \['lin1.bias'\]"):
        dt.set_base_model_state_dict(ours, partial)
    assert dt.set_base_model_state_dict(ours, {**partial, "extra": fresh["lin1.bias"]}, strict=False) == \
        peft.set_base_model_state_dict(theirs, {**partial, "extra": fresh["lin1.bias"]}, strict=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        dt.set_base_model_state_dict(ours, {**fresh, "lin0.weight": torch.zeros(1)})
    assert torch.equal(dt.get_base_model_state_dict(ours)["lin1.bias"], fresh["lin1.bias"])  # nothing loaded


def test_base_model_state_dict_of_a_prompt_adapter_is_the_model_s() -> None:
    ours = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert set(dt.get_base_model_state_dict(ours)) == set(peft.get_base_model_state_dict(theirs))


def test_a_registered_prefix_postprocess_is_refused_not_ignored(monkeypatch) -> None:
    monkeypatch.setitem(dt.TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING, "llama", lambda kv: kv)
    with pytest.raises(dt.ConfigError, match="TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING"):
        dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_load_peft_weights_reads_safetensors_and_weights_only_pickles(tmp_path) -> None:
    tensors = {"base_model.model.lin0.lora_A.weight": torch.randn(4, 16)}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    ours = dt.load_peft_weights(str(tmp_path), device="cpu")
    assert ours.keys() == peft.load_peft_weights(str(tmp_path), device="cpu").keys() == tensors.keys()
    mapping = {r"lin0\.": "renamed."}
    assert set(dt.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping)) == set(
        peft.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping)) == {
        "base_model.model.renamed.lora_A.weight"}
    with pytest.raises(TypeError, match="force_download"):
        dt.load_peft_weights(str(tmp_path), force_download=True)

    pickled = tmp_path / "bin"
    pickled.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"k": torch.ones(1), "evil": Evil()}, str(pickled / "adapter_model.bin"))
    with pytest.raises(dt.AdapterLoadError, match="weights-only"):
        dt.load_peft_weights(str(pickled), device="cpu")


def test_cast_mixed_precision_params_matches_peft() -> None:
    ours = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(**_MLP))
    theirs = peft.get_peft_model(tiny_mlp(), peft.LoraConfig(**_MLP))
    dt.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    ours_dtypes = {k: (v.dtype, v.requires_grad) for k, v in dt.get_base_model_state_dict(ours).items()}
    theirs_dtypes = {k: (v.dtype, v.requires_grad) for k, v in peft.get_base_model_state_dict(theirs).items()}
    assert ours_dtypes == theirs_dtypes
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in ours.parameters() if not p.requires_grad} == {torch.bfloat16}
    with pytest.raises(dt.ConfigError, match="dtype"):
        dt.cast_mixed_precision_params(ours, torch.int8)


def test_sequence_helpers_match_peft() -> None:
    labels = torch.tensor([[5, 6, -100, 7], [8, -100, -100, -100]])
    assert torch.equal(dt.shift_tokens_right(labels, 0, 2), peft.shift_tokens_right(labels, 0, 2))
    with pytest.raises(ValueError):
        dt.shift_tokens_right(labels, None, 2)
    past = tuple(torch.randn(2, 3, 4, 5, 6) for _ in range(2))  # 2 layers: [k|v, batch, heads, T, head_dim]
    for ours, theirs in zip(dt.bloom_model_postprocess_past_key_value(past),
                            peft.utils.constants.bloom_model_postprocess_past_key_value(past)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    postprocess = dt.TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING
    assert postprocess == peft.TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING == {}


def test_find_kappa_target_modules_matches_peft() -> None:
    model = tiny_mlp()
    with torch.no_grad():  # make lin1 ill-conditioned, so that the ranking is not a tie
        model.lin1.weight[0] *= 100
    ours = dt.find_kappa_target_modules(model, top_p=0.7, show_progress=False)
    theirs = peft.find_kappa_target_modules(model, top_p=0.7, show_progress=False)
    assert ours == theirs and ours["target_parameters"] is None and "lin1" not in ours["target_modules"]
    ranked = dt.find_kappa_target_modules(model, top_p=None, show_progress=False)["target_modules"]
    assert ranked[-1] == "lin1" and len(ranked) == 3


def test_lora_runtime_config_is_peft_s_and_never_saved() -> None:
    config = dt.LoraConfig(runtime_config=dt.LoraRuntimeConfig())
    assert config.runtime_config == dt.LoraRuntimeConfig(ephemeral_gpu_offload=False)
    assert "runtime_config" not in config.to_dict() and "runtime_config" not in peft.LoraConfig().to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dt.LoraConfig.from_dict(config.to_dict()) == config


def test_set_adapter_trains_the_adapter_unless_inference_mode_as_peft(tmp_path) -> None:
    # peft's PeftModel.set_adapter: the activated adapter trains unless inference_mode, whatever it was loaded as
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # loaded for inference: frozen
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for model in (theirs, loaded):
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
        model.set_adapter("default")
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
        model.set_adapter("default", inference_mode=True)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

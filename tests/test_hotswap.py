"""``hotswap_adapter`` / ``prepare_model_for_compiled_hotswap`` (peft's ``peft.utils.hotswap``): a loaded LoRA's
weights replaced in place, equal to a fresh load, without new storage and, when compiled, without recompiling."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError
from tests.adapter_utils import assert_same_state, snapshot
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp

TARGETS = ["q_proj", "v_proj"]


def _save(path, seed: int, factory=tiny_llama, **kwargs) -> str:
    torch.manual_seed(seed)
    config = dict(target_modules=TARGETS, init_lora_weights=False, r=4, lora_alpha=8)
    dt.get_peft_model(factory(), dt.LoraConfig(**{**config, **kwargs})).save_pretrained(path / str(seed))
    return str(path / str(seed))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _fresh(path: str) -> torch.Tensor:
    model = dt.PeftModel.from_pretrained(tiny_llama(), path)
    return _logits(model, make_causal_lm_inputs(model))


def _pointers(model) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}


def test_a_swap_equals_a_fresh_load_in_the_same_storage(tmp_path) -> None:
    first, second = _save(tmp_path, 0), _save(tmp_path, 1, lora_alpha=32)
    model = dt.PeftModel.from_pretrained(tiny_llama(), first)
    inputs = make_causal_lm_inputs(model)
    before, pointers = _logits(model, inputs), _pointers(model)
    dt.hotswap_adapter(model, second, adapter_name="default")
    after = _logits(model, inputs)
    torch.testing.assert_close(after, _fresh(second), rtol=1e-6, atol=1e-6)
    assert (after - before).abs().max() > 1e-3
    assert _pointers(model) == pointers
    assert model.peft_config["default"].lora_alpha == 32


def test_prepared_ranks_are_padded_and_swaps_match_fresh_loads_and_peft(tmp_path) -> None:
    paths = [_save(tmp_path, 0), _save(tmp_path, 1, r=8, lora_alpha=4), _save(tmp_path, 2, r=2, use_rslora=False,
                                                                          rank_pattern={"v_proj": 1})]
    model = dt.PeftModel.from_pretrained(tiny_llama(), paths[0])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), paths[0]).eval()
    inputs = make_causal_lm_inputs(model)
    before = _logits(model, inputs)
    dt.prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    peft_prepare(theirs, target_rank=8, config=theirs.peft_config)
    torch.testing.assert_close(_logits(model, inputs), before, rtol=1e-6, atol=1e-6)  # padding changes nothing
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.deltas["default"]
    assert layer.lora_A.weight.shape == (8, 32) and isinstance(layer.scaling, torch.Tensor)
    assert model.peft_config["default"].r == 8
    pointers = _pointers(model)
    for path in (*paths[1:], paths[0]):
        dt.hotswap_adapter(model, path, adapter_name="default")
        peft_hotswap_adapter(theirs, path, adapter_name="default", torch_device="cpu")
        expected = _fresh(path)
        torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-6, atol=1e-6)
        if not model.peft_config["default"].rank_pattern:  # peft 0.21.2's swap ignores rank / alpha patterns (it
            # matches them against parameter keys, which never end in a module name); the fresh load is the truth
            torch.testing.assert_close(_logits(theirs, inputs), expected, rtol=1e-5, atol=1e-5)
    assert _pointers(model) == pointers


def test_layers_the_new_adapter_leaves_out_get_no_update(tmp_path) -> None:
    both, only_q = _save(tmp_path, 0), _save(tmp_path, 1, target_modules=["q_proj"])
    model = dt.PeftModel.from_pretrained(tiny_llama(), both)
    dt.hotswap_adapter(model, only_q, adapter_name="default")
    torch.testing.assert_close(_logits(model, make_causal_lm_inputs(model)), _fresh(only_q), rtol=1e-6, atol=1e-6)


def test_an_unprepared_eager_model_takes_a_larger_rank(tmp_path) -> None:
    small, large = _save(tmp_path, 0, r=2), _save(tmp_path, 1, r=8)
    model = dt.PeftModel.from_pretrained(tiny_llama(), small)
    dt.hotswap_adapter(model, large, adapter_name="default")
    torch.testing.assert_close(_logits(model, make_causal_lm_inputs(model)), _fresh(large), rtol=1e-6, atol=1e-6)


def test_bad_swaps_are_refused_and_change_nothing(tmp_path) -> None:
    first = _save(tmp_path, 0)
    model = dt.PeftModel.from_pretrained(tiny_llama(), first)
    dt.prepare_model_for_compiled_hotswap(model, target_rank=4)
    state = snapshot(model)
    refusals = [
        (_save(tmp_path, 1, target_modules=["q_proj", "k_proj"]), AdapterLoadError, "does not have, first .*k_proj"),
        (_save(tmp_path, 2, r=16), AdapterLoadError, "above the 4 the model was prepared for"),
        (_save(tmp_path, 3, use_rslora=True), ConfigError, r"differ in \['use_rslora'\]"),
    ]
    for path, error, message in refusals:
        with pytest.raises(error, match=message):
            dt.hotswap_adapter(model, path, adapter_name="default")
        assert_same_state(state, model)
    with pytest.raises(TypeError, match="unexpected keyword"):
        dt.hotswap_adapter(model, first, adapter_name="default", low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="above target_rank=2"):
        dt.prepare_model_for_compiled_hotswap(model, target_rank=2)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        dt.hotswap_adapter(model, first, adapter_name="default")


@pytest.mark.slow  # ~10 s: torch.compile
def test_no_recompilation_after_a_swap_when_prepared(tmp_path) -> None:
    from torch._dynamo.utils import counters

    targets = dict(target_modules=["lin0", "lin1"], factory=tiny_mlp)
    paths = [_save(tmp_path, 0, **targets), _save(tmp_path, 1, r=8, lora_alpha=3, **targets)]
    model = dt.PeftModel.from_pretrained(tiny_mlp(), paths[0])
    dt.prepare_model_for_compiled_hotswap(model, target_rank=8)
    x = make_mlp_inputs()["x"]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x)
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 1
        dt.hotswap_adapter(compiled, paths[1], adapter_name="default")
        swapped = compiled(x)
        assert counters["stats"]["unique_graphs"] == frames  # no new graph: no recompilation
        assert not counters["recompiles"]
        torch.testing.assert_close(swapped, dt.PeftModel.from_pretrained(tiny_mlp(), paths[1])(x), rtol=1e-6,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="before the model is compiled"):
        dt.prepare_model_for_compiled_hotswap(compiled)
    torch._dynamo.reset()

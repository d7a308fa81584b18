"""LayerNorm tuning (``deltatune.methods.ln_tuning``): the copy's output against the norm formulas, merging into the
base norm (and back, exactly), any norm class (a remote-code model's, one with oddly named parameters), the config's
checks, several adapters at once and mixed-adapter batches. Files and logits against peft: tests/cases/ln_tuning.py."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.layers import AdapterLayer, adapter_layers
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, assert_same_state, logits, snapshot
from tests.cases import perturb_adapter
from tests.models import (
    make_causal_lm_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

CAUSAL = dict(task_type="CAUSAL_LM")


def _ln_model(factory=tiny_llama, adapter: str = "default", seed: int = 0, **kwargs) -> dt.PeftModel:
    model = dt.get_peft_model(factory(), dt.LNTuningConfig(**CAUSAL, **kwargs), adapter_name=adapter)
    perturb_adapter(model, adapter, seed=seed)
    return model


def _copy(model: dt.PeftModel, name: str, adapter: str = "default") -> nn.Module:
    return model.get_base_model().get_submodule(name).deltas[adapter].ln_tuning_layers


# --- the copy's output, against the norm formulas ---------------------------------------------------------------

def test_rmsnorm_output_is_the_formula_with_the_trained_gain() -> None:
    model = _ln_model()
    layer = model.get_base_model().model.layers[0].input_layernorm
    x = torch.randn(2, 5, 32)
    gain = _copy(model, "model.layers.0.input_layernorm").weight
    eps = layer.base_layer.variance_epsilon
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain  # RMSNorm, Zhang & Sennrich 2019
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(gain, layer.base_layer.weight)  # the base gain is untouched


def test_layernorm_output_is_the_formula_with_the_trained_gain_and_bias() -> None:
    model = _ln_model(tiny_gpt2)
    layer = model.get_base_model().transformer.h[1].ln_2
    copy = _copy(model, "transformer.h.1.ln_2")
    x = torch.randn(2, 5, 32)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + layer.base_layer.eps) * copy.weight + copy.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_only_the_copies_train_and_the_default_targets_are_the_norms() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LNTuningConfig(**CAUSAL))
    base_norms = [n for n, m in tiny_llama().named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert [n for n, _ in adapter_layers(model.get_base_model())] == base_norms
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"base_model.model.{n}.deltas.default.ln_tuning_layers.weight" for n in base_norms]
    assert model.get_nb_trainable_parameters()[0] == 32 * len(base_norms)


# --- merging ------------------------------------------------------------------------------------------------------

def test_merge_gives_the_base_norm_the_copy_and_unmerge_restores_it_exactly() -> None:
    model = _ln_model(tiny_gpt2)
    inputs = make_causal_lm_inputs(model)
    before, unmerged = snapshot(model), logits(model, inputs)
    ln = model.get_base_model().transformer.ln_f
    model.merge_adapter()
    assert torch.equal(ln.base_layer.weight, ln.deltas["default"].ln_tuning_layers.weight)
    assert torch.equal(ln.base_layer.bias, ln.deltas["default"].ln_tuning_layers.bias)
    assert torch.equal(logits(model, inputs), unmerged)  # the same norm computation, now in the base layer
    model.unmerge_adapter()
    assert_same_state(before, model)  # bit for bit, not up to rounding


def test_merge_and_unload_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    ours = _ln_model(tiny_gpt2)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).merge_and_unload().state_dict()
    merged = ours.merge_and_unload().state_dict()
    assert merged.keys() == theirs.keys()
    for key, value in merged.items():
        assert torch.equal(value, theirs[key]), key


# --- any norm class -------------------------------------------------------------------------------------------------

def test_remote_code_models_own_norm(remote_code_dir: Path, tmp_path: Path) -> None:
    def base() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(remote_code_dir, trust_remote_code=True).eval()

    config = dt.LNTuningConfig(**CAUSAL, target_modules=["attention_norm", "ffn_norm", "norm"])
    model = dt.get_peft_model(base(), config)
    assert {type(layer.base_layer).__name__ for _, layer in adapter_layers(model)} == {"TinyCustomRMSNorm"}
    perturb_adapter(model)
    inputs = make_causal_lm_inputs(model)
    adapted = logits(model, inputs)
    assert (adapted - logits(base(), inputs)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(dt.PeftModel.from_pretrained(base(), tmp_path), inputs), adapted, rtol=0, atol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-5, atol=1e-6)


class _ScaleNorm(nn.Module):
    """A norm whose gain is called ``scale``: trains and saves like any other, but has no ``weight`` to merge into."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale


def _scale_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), _ScaleNorm(8), nn.Linear(8, 3)).eval()


def test_a_norm_with_other_parameter_names_trains_saves_and_refuses_only_merging(tmp_path: Path) -> None:
    model = dt.get_peft_model(_scale_norm_mlp(), dt.LNTuningConfig(target_modules=["1"]))
    perturb_adapter(model)
    x = torch.randn(4, 6)
    copy = _copy(model, "1")
    hidden = model.get_base_model()[0](x)
    expected = model.get_base_model()[2](F.normalize(hidden, dim=-1) * copy.scale)
    torch.testing.assert_close(model(x), expected)
    model.save_pretrained(tmp_path)
    assert torch.equal(dt.PeftModel.from_pretrained(_scale_norm_mlp(), tmp_path)(x), model(x))
    before = snapshot(model)
    with pytest.raises(dt.AdapterStateError, match=r"into 1: .*'weight'.*\['scale'\]"):
        model.merge_and_unload()
    assert_same_state(before, model)
    assert not any(layer.merged for _, layer in adapter_layers(model))


# --- config and targets -------------------------------------------------------------------------------------------

def test_layer_selection_fields_peft_lacks_are_refused_and_never_written() -> None:
    with pytest.raises(dt.ConfigError, match="layers_to_transform.*target_modules"):
        dt.LNTuningConfig(layers_to_transform=[0])
    assert {"layers_to_transform", "layers_pattern"}.isdisjoint(dt.LNTuningConfig().to_dict())
    assert dt.LNTuningConfig().to_dict()["peft_type"] == "LN_TUNING"


def test_targets_without_parameters_or_holding_adapters_are_refused_before_any_change() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(dt.TargetError, match="1: LayerNorm has no parameters"):
        dt.get_peft_model(plain, dt.LNTuningConfig(target_modules=["0", "1"]))
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**CAUSAL))
    with pytest.raises(dt.TargetError, match=r"contains the adapter wrapper 'model\.layers\.0\.self_attn\.q_proj'"):
        model.add_adapter("ln", dt.LNTuningConfig(**CAUSAL, target_modules=["self_attn"]))
    with pytest.raises(dt.TargetError, match="no default target_modules for model type None"):
        dt.get_peft_model(_scale_norm_mlp(), dt.LNTuningConfig())


# --- several adapters -----------------------------------------------------------------------------------------------

def _two_adapters() -> dt.PeftModel:
    model = _ln_model(adapter="a", seed=1)
    model.add_adapter("b", dt.LNTuningConfig(**CAUSAL))
    perturb_adapter(model, "b", seed=2)
    return model


def test_mixed_adapter_batch_rows_equal_each_adapter_alone() -> None:
    model = _two_adapters()
    inputs = make_causal_lm_inputs(model, batch=3)
    mixed = assert_mixed_batch_equals_each_row_alone(model, inputs, ["a", "__base__", "b"], atol=1e-6)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 and (mixed[2] - mixed[1]).abs().max() > 1e-3


def test_mixed_batch_with_a_trained_head() -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
                              adapter_name="a")
    model.add_adapter("b", dt.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]))
    for seed, name in enumerate("ab"):
        perturb_adapter(model, name, seed=seed)
        with torch.no_grad():
            model.get_base_model().classifier.modules_to_save[name].weight.add_(seed)
    inputs = make_seq_cls_inputs(model, batch=2)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["b", "a"], atol=1e-6)


def test_with_several_active_the_last_copy_computes_the_output_merged_or_not() -> None:
    model = _two_adapters()
    inputs = make_causal_lm_inputs(model)
    model.set_adapter("b")
    only_b = logits(model, inputs)
    before = snapshot(model)
    model.set_adapter(["a", "b"])
    assert torch.equal(logits(model, inputs), only_b)
    model.merge_adapter()
    assert torch.equal(logits(model, inputs), only_b)
    model.unmerge_adapter()
    assert_same_state(before, model)

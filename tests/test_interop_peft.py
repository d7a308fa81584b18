"""On-disk compatibility with peft, both ways (peft is only the oracle here; ``deltatune`` never imports it).

For each case: an adapter saved by deltatune loads in peft with the same outputs, an adapter saved by peft loads in
deltatune with the same outputs, and both libraries write the same tensor keys and the same config fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.targeting import name_matches
from tests.adapter_utils import logits, trainable_by_peft_name
from tests.cases import interop_cases
from tests.models import (
    make_causal_lm_inputs,
    tiny_gpt2,
    tiny_llama,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes (fan_in_fan_out, embedding saving)


CASES = {case.name: case for case in interop_cases()}
PARAMS = [pytest.param(name, id=name) for name in CASES]


def _nonzero(model: nn.Module, seed: int) -> None:
    """Give every trainable tensor (LoRA factors, heads, biases) a deterministic non-zero offset, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PARAMS)
def test_deltatune_adapter_loads_in_peft_with_the_same_outputs(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    factory, make_inputs = case.factory, case.make_inputs
    ours = dt.get_peft_model(factory(), case.config(dt))
    _nonzero(ours, seed=0)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path)
    inputs = make_inputs(ours)
    expected = logits(ours, inputs)
    _close(logits(theirs, inputs), expected)
    assert (expected - logits(factory(), inputs)).abs().max() > 1e-4  # the adapter does something


@pytest.mark.parametrize("name", PARAMS)
def test_peft_adapter_loads_in_deltatune_with_the_same_outputs(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    factory, make_inputs = case.factory, case.make_inputs
    theirs = peft.get_peft_model(factory(), case.config(peft))
    _nonzero(theirs, seed=1)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(factory(), tmp_path)
    inputs = make_inputs(ours)
    expected = logits(theirs, inputs)
    _close(logits(ours, inputs), expected)
    assert (expected - logits(factory(), inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("name", PARAMS)
def test_both_libraries_write_the_same_keys_shapes_and_config_fields(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    factory = case.factory
    dt.get_peft_model(factory(), case.config(dt)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(factory(), case.config(peft)).save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert set(ours) - set(theirs) == case.extra_ours
    assert set(theirs) - set(ours) == case.extra_theirs
    shared = ours.keys() & theirs.keys()
    assert {k: ours[k].shape for k in shared} == {k: theirs[k].shape for k in shared}

    our_config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs/adapter_config.json").read_text())
    assert set(our_config) <= set(their_config), set(our_config) - set(their_config)
    # peft writes target_modules from a set (any order; "all-linear" as full names where deltatune writes leaf
    # names): equal when they select the same modules. modules_to_save may repeat entries in peft's file.
    names = [n for n, _ in factory().named_modules() if n]
    for config in (our_config, their_config):
        config["target_modules"] = sorted(n for n in names if name_matches(n, config["target_modules"]))
        if config.get("target_parameters"):  # a set in peft's config: its file lists them in any order
            config["target_parameters"] = sorted(config["target_parameters"])
        if "modules_to_save" in config:  # peft's TrainableTokensConfig has no such field
            config["modules_to_save"] = sorted(set(config["modules_to_save"] or []))
    # peft records the model class in auto_mapping
    ignored = {"auto_mapping"}
    differing = {
        k: (our_config[k], their_config[k]) for k in our_config if k not in ignored and our_config[k] != their_config[k]
    }
    assert differing == {}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_training_forward_and_gradients_equal_peft_under_dropout(factory, use_dora: bool, tmp_path: Path) -> None:
    # Same dropout masks (same seed, same draw order), so loss and every adapter gradient must agree; for DoRA this
    # pins the base term that must see the dropped input too.
    kwargs = dict(task_type="CAUSAL_LM", lora_dropout=0.3, use_dora=use_dora)
    ours = dt.get_peft_model(factory(), dt.LoraConfig(init_lora_weights=False, **kwargs))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path, is_trainable=True)
    batch = make_causal_lm_inputs(ours)
    ours.train()
    theirs.train()
    torch.manual_seed(7)
    our_loss = ours(**batch).loss
    torch.manual_seed(7)
    their_loss = theirs(**batch).loss
    _close(our_loss, their_loss)
    our_loss.backward()
    their_loss.backward()

    def grads(model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
            for n, p in trainable_by_peft_name(model).items()
        }

    our_grads, their_grads = grads(ours), grads(theirs)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        _close(our_grads[name], their_grads[name])


def test_peft_reads_a_multi_adapter_directory_written_by_deltatune(tmp_path: Path) -> None:
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    ours.add_adapter("mlp", dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["down_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "mlp", adapter_name="mlp")
    inputs = make_causal_lm_inputs(ours)
    for name in ("default", "mlp"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        _close(logits(theirs, inputs), logits(ours, inputs))


def test_peft_merged_model_equals_deltatune_merged_model(tmp_path: Path) -> None:
    ours = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(task_type="CAUSAL_LM", use_dora=True, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).merge_and_unload()
    mine = ours.merge_and_unload()
    expected = theirs.state_dict()
    for key, value in mine.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)

"""Adapter files on quantized bases interchange with peft both ways (same keys, same outputs to the kernel's
precision), and move between a quantized base and the full-precision model of its dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from tests.quant_models import dequantized_reference, load  # noqa: E402

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _keys(path) -> set[str]:
    return set(load_file(f"{path}/adapter_model.safetensors"))


@pytest.mark.parametrize("dora", [False, True])
def test_deltatune_and_peft_exchange_files_on_nf4(tmp_path, dora):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                  use_dora=dora)
    ours = dt.get_peft_model(load("nf4"), dt.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load("nf4"), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=1e-5, atol=1e-5)

    torch.manual_seed(3)
    trained = peft.get_peft_model(load("nf4"), peft.LoraConfig(**config))
    trained.save_pretrained(tmp_path / "peft")
    loaded = dt.PeftModel.from_pretrained(load("nf4"), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded), _logits(trained), rtol=1e-5, atol=1e-5)
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")


def test_adapter_moves_between_quantized_and_full_precision_base(tmp_path):
    quantized = dt.get_peft_model(load("nf4"), dt.LoraConfig(r=4, target_modules="all-linear",
                                                             init_lora_weights=False))
    quantized.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # onto the full-precision model of the same weights: the same function
    dense = dt.PeftModel.from_pretrained(dequantized_reference(load("nf4")), tmp_path / "q")
    torch.testing.assert_close(_logits(dense), _logits(quantized), rtol=1e-5, atol=1e-5)
    # onto the original full-precision model, and back onto a quantized base
    original = dt.PeftModel.from_pretrained(load(None), tmp_path / "q")
    original.save_pretrained(tmp_path / "fp")
    assert _keys(tmp_path / "fp") == _keys(tmp_path / "q")
    back = dt.PeftModel.from_pretrained(load("nf4"), tmp_path / "fp")
    torch.testing.assert_close(_logits(back), _logits(quantized), rtol=0, atol=0)

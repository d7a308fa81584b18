"""Cartridges: files and the KV-prefix helpers against peft 0.21.2 (the oracle), a cartridge made from a text's
first tokens continuing that text exactly as the base model does, frozen sink tokens, composition, cached generation
against full forwards, and bad input named."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import ConfigError
from tests.models import make_causal_lm_inputs, tiny_llama
from tests.test_prompt_methods import GEN_FAMILIES, _check_cached_equals_loop

KW = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, num_frozen_tokens=1)
TEXT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def _cache(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


def test_files_counts_and_kv_init_equal_peft(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.CartridgeConfig(**KW))
        ours = dt.get_peft_model(tiny_llama(), dt.CartridgeConfig(**KW))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        cache = _cache(tiny_llama(), TEXT_IDS)
        table = dt.initialize_kv_prefix_from_past_key_values(ours, past_key_values=cache)
        assert torch.equal(table, peft.initialize_kv_prefix_from_past_key_values(theirs, past_key_values=cache))
        with torch.no_grad():
            ours.prompt_encoder["default"].trainable_embedding.add_(0.3)  # as training would
        theirs.save_pretrained(tmp_path / "theirs")
        ours.save_pretrained(tmp_path / "ours")
        inputs = make_causal_lm_inputs(ours)
        with torch.no_grad():
            from_peft = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
            from_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
            torch.testing.assert_close(from_peft(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(from_ours(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=1e-5)
    saved = {k: v.shape for k, v in load_file(tmp_path / "ours/adapter_model.safetensors").items()}
    assert saved == {k: v.shape for k, v in load_file(tmp_path / "theirs/adapter_model.safetensors").items()}
    assert saved == {"prompt_embeddings": (4, 2 * 2 * 16)}  # GQA: 2 kv heads of 8 per layer
    our_config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs/adapter_config.json").read_text())
    assert {k: v for k, v in our_config.items() if their_config[k] != v} == {}


def test_a_cartridge_of_a_texts_first_tokens_continues_it_like_the_base_model(tmp_path):
    """Initialised from the text's first 4 positions, the cartridge followed by the rest of the text gives the base
    model's logits for those positions (the input continues at position 4)."""
    from tests.train_utils import write_tokenizer

    tokenizer = write_tokenizer(tmp_path / "tok", chat=False)
    text = "the film was a very moving story and the acting"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    model = dt.get_peft_model(tiny_llama(), dt.CartridgeConfig(**KW))
    table = dt.initialize_kv_prefix_from_text(model, tokenizer, text=text)
    assert table.shape == (4, 64)
    with torch.no_grad():
        full = tiny_llama()(input_ids=ids).logits[:, 4:]
        continued = model(input_ids=ids[:, 4:]).logits
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-5)


def test_frozen_tokens_never_train_and_a_trainable_load_keeps_them_apart(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.CartridgeConfig(**KW))
    encoder = model.prompt_encoder["default"]
    frozen = encoder.frozen_embedding.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    inputs = make_causal_lm_inputs(model)
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    assert torch.equal(encoder.frozen_embedding, frozen) and not encoder.frozen_embedding.requires_grad
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    again = loaded.prompt_encoder["default"]
    assert isinstance(again, dt.CartridgeEncoder) and torch.equal(again.frozen_embedding, frozen)
    assert again.trainable_embedding.requires_grad and not again.frozen_embedding.requires_grad
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_composition_concatenates_tables(tmp_path):
    for i, n in enumerate((2, 3)):
        torch.manual_seed(i)
        dt.get_peft_model(tiny_llama(), dt.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)) \
            .save_pretrained(tmp_path / str(i))
    dt.compose_cartridge_adapters([tmp_path / "0", tmp_path / "1"], output_path=tmp_path / "both")
    tables = [load_file(tmp_path / p / "adapter_model.safetensors")["prompt_embeddings"] for p in ("0", "1", "both")]
    assert torch.equal(tables[2], torch.cat(tables[:2]))
    composed = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "both")
    assert composed.peft_config["default"].num_virtual_tokens == 5
    composed(**make_causal_lm_inputs(composed))
    with pytest.raises(ConfigError, match="at least 2"):
        dt.compose_cartridge_adapters([tmp_path / "0"], output_path=tmp_path / "x")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_cached_generate_equals_full_forward_loop(padded):
    factory, _ = GEN_FAMILIES["llama"]
    torch.manual_seed(0)
    model = dt.get_peft_model(factory(), dt.CartridgeConfig(**KW))
    _check_cached_equals_loop(model, False, padded)


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="num_frozen_tokens=5 exceeds"):
        dt.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_frozen_tokens=5)
    model = dt.get_peft_model(tiny_llama(), dt.CartridgeConfig(**KW))
    with pytest.raises(ConfigError, match="fewer than num_virtual_tokens=4"):
        dt.initialize_kv_prefix_from_past_key_values(model, past_key_values=_cache(tiny_llama(), TEXT_IDS[:, :2]))
    with pytest.raises(ConfigError, match="single-sequence"):
        dt.initialize_kv_prefix_from_past_key_values(model, past_key_values=_cache(tiny_llama(), TEXT_IDS.repeat(2, 1)))
    prompt = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="cartridge or a prefix-tuning adapter"):
        dt.initialize_kv_prefix_from_past_key_values(prompt, past_key_values=_cache(tiny_llama(), TEXT_IDS))


@pytest.mark.slow
def test_deltatune_train_trains_a_cartridge_and_refuses_what_it_cannot_train(tmp_path):
    from deltatune.train import TrainError, TrainOptions, train
    from tests.train_utils import sentiment_records, write_jsonl, write_llama

    common = dict(model=write_llama(tmp_path / "llama"), data=write_jsonl(tmp_path / "d.jsonl", sentiment_records(16)),
                  lr=5e-2, epochs=2, batch_size=8, eval_split=8, eval_generate=0, save_steps=0, progress=False)
    result = train(TrainOptions(**common, method="cartridge", method_options={"num_virtual_tokens": 4},
                                out=str(tmp_path / "run")))
    assert result.after["eval_loss"] < result.before["eval_loss"]
    saved = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "CARTRIDGE" and saved["num_frozen_tokens"] == 1
    for method, options in (("multitask_prompt_tuning", {"num_virtual_tokens": 4}), ("cpt", {})):
        with pytest.raises(TrainError, match=f"cannot train --method {method}"):
            train(TrainOptions(**common, method=method, method_options=options, out=str(tmp_path / method)))

"""LoRA's ``ensure_weight_tying`` on a Llama whose LM head is tied to the input embedding: the head's LoRA is the
embedding's (``target_modules``), or the head's copy is the embedding's (``modules_to_save``), through training,
saving (peft's keys, both ways) and merging; peft's warnings where there is nothing to tie. On T5 / mT5, whose
``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` are one table, all four share one
LoRA pair (rooted at the input embedding, as peft roots it), merged once into the table."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from tests.models import (
    VOCAB_SIZE, make_causal_lm_inputs, make_seq2seq_inputs, tiny_gpt2, tiny_llama, tiny_mt5, tiny_t5,
)

TARGETS = dict(target_modules=["embed_tokens", "lm_head", "q_proj"])
SAVED = dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])


def tied_llama() -> LlamaForCausalLM:
    """``tests.models.tiny_llama`` with ``tie_word_embeddings=True`` (``lm_head.weight is embed_tokens.weight``)."""
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _randomize(model: torch.nn.Module) -> None:
    """Non-zero adapter values (a fresh LoRA is the base model), written into the shared tensors in place."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _train_step(model, inputs) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).loss.backward()
    opt.step()
    model.eval()


def _train_one_pair(model, emb, other: str, inputs) -> None:
    """Besides the parameters named with ``other``, the tied modules train one tensor per factor: the embedding's
    ``A`` and ``B``; a step (after making the adapter non-zero) changes them."""
    trained = {id(p) for name, p in model.named_parameters() if p.requires_grad and other not in name}
    assert trained == {id(emb.lora_embedding_A), id(emb.lora_embedding_B)}
    _randomize(model)
    before = emb.lora_embedding_A.detach().clone()
    _train_step(model, inputs)
    assert not torch.equal(before, emb.lora_embedding_A)


def test_target_modules_share_one_pair_of_factors_through_training_and_merge() -> None:
    model = dt.get_peft_model(tied_llama(), dt.LoraConfig(ensure_weight_tying=True, **TARGETS))
    base = model.get_base_model()
    emb, head = base.model.embed_tokens.deltas["default"], base.lm_head.deltas["default"]
    assert head.lora_A.tied is emb.lora_embedding_B and head.lora_B.tied is emb.lora_embedding_A
    inputs = make_causal_lm_inputs(model)
    _train_one_pair(model, emb, "q_proj", inputs)
    assert head.lora_A.tied is emb.lora_embedding_B and head.lora_B.tied is emb.lora_embedding_A
    # the logits are the final hidden state times the updated table E + s (B_e A_e)ᵀ, written out
    table = base.model.embed_tokens.base_layer.weight + emb.scaling * (emb.lora_embedding_B @ emb.lora_embedding_A).T
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        torch.testing.assert_close(out.logits, out.hidden_states[-1] @ table.T, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, table.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(merged, inputs), out.logits, rtol=1e-5, atol=1e-5)


def test_modules_to_save_copies_share_one_weight_through_training_and_merge() -> None:
    model = dt.get_peft_model(tied_llama(), dt.LoraConfig(ensure_weight_tying=True, **SAVED))
    base = model.get_base_model()
    table = base.model.embed_tokens.modules_to_save["default"].weight
    assert base.lm_head.modules_to_save["default"].weight is table
    assert table is not base.model.embed_tokens.original_module.weight
    _randomize(model)
    inputs = make_causal_lm_inputs(model)
    before = table.detach().clone()
    _train_step(model, inputs)
    assert not torch.equal(before, table)
    assert base.lm_head.modules_to_save["default"].weight is table
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        torch.testing.assert_close(out.logits, out.hidden_states[-1] @ table.T, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged, inputs), out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [TARGETS, SAVED, dict(TARGETS, use_dora=True)],
                         ids=["target_modules", "modules_to_save", "dora"])
def test_interop_with_peft_both_ways(tmp_path, kwargs) -> None:
    from safetensors.torch import load_file

    inputs = make_causal_lm_inputs(tied_llama())
    ours = dt.get_peft_model(tied_llama(), dt.LoraConfig(ensure_weight_tying=True, **kwargs))
    _randomize(ours)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(ensure_weight_tying=True, **kwargs))
        _randomize(theirs)
        theirs.save_pretrained(tmp_path / "theirs")
        read_by_peft = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    torch.testing.assert_close(_logits(read_by_peft, inputs), _logits(ours, inputs), rtol=1e-5, atol=1e-5)
    read_by_us = dt.PeftModel.from_pretrained(tied_llama(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(read_by_us, inputs), _logits(theirs.eval(), inputs), rtol=1e-5, atol=1e-5)
    head = read_by_us.get_base_model().lm_head
    embed = read_by_us.get_base_model().model.embed_tokens
    shared = {id(p) for p in head.parameters()} & {id(p) for p in embed.parameters()}
    assert shared  # loaded tied, not as two copies


def _warnings(build) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if "ensure_weight_tying" in str(w.message)]


@pytest.mark.parametrize("make_model, kwargs", [
    (tiny_llama, dict(target_modules=["q_proj", "embed_tokens"])),  # no tied modules in the model
    (tied_llama, dict(target_modules=["q_proj"])),  # tied modules, none in the adapter
    (tiny_gpt2, dict(target_modules=["c_attn", "wte"])),  # tied, but not under a name peft ties (wte)
    (tiny_t5, dict(target_modules=["q", "shared"])),  # T5's input embedding, not under a name peft ties
], ids=["untied-model", "tied-not-targeted", "gpt2-wte", "t5-shared"])
def test_nothing_to_tie_warns_as_peft(make_model, kwargs) -> None:
    theirs = _warnings(lambda: peft.get_peft_model(make_model(), peft.LoraConfig(ensure_weight_tying=True, **kwargs)))
    ours = _warnings(lambda: dt.get_peft_model(make_model(), dt.LoraConfig(ensure_weight_tying=True, **kwargs)))
    assert len(theirs) == 1 and len(ours) == 1 and ours[0].startswith(theirs[0])
    untied = dt.get_peft_model(make_model(), dt.LoraConfig(ensure_weight_tying=True, **kwargs)).get_base_model()
    assert not any(isinstance(getattr(m, "lora_A", None), torch.nn.Module) and hasattr(m.lora_A, "tied")
                   for m in untied.modules())


def test_without_the_flag_each_tied_module_trains_apart() -> None:
    model = dt.get_peft_model(tied_llama(), dt.LoraConfig(**TARGETS))
    base = model.get_base_model()
    assert base.lm_head.deltas["default"].lora_A.weight.shape == (8, 32)
    assert not hasattr(base.lm_head.deltas["default"].lora_A, "tied")


def test_refusals_leave_the_model_unchanged() -> None:
    base = tied_llama()
    with pytest.raises(dt.ConfigError, match="ensure_weight_tying.*target_modules.*modules_to_save"):
        dt.get_peft_model(base, dt.LoraConfig(ensure_weight_tying=True, target_modules=["embed_tokens"],
                                              modules_to_save=["lm_head"]))
    with pytest.raises(dt.ConfigError, match="ensure_weight_tying.*'model.embed_tokens'.*exclude_modules"):
        dt.get_peft_model(base, dt.LoraConfig(ensure_weight_tying=True, target_modules=["lm_head", "q_proj"],
                                              exclude_modules=["model.embed_tokens"]))
    assert not any(isinstance(m, (dt.layers.AdapterLayer, dt.layers.ModulesToSaveWrapper)) for m in base.modules())
    assert base.lm_head.weight is base.model.embed_tokens.weight


# --- T5-style: several embeddings and the head share one table ----------------------------------------------------

T5_TABLE = ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head")


def _saved(model, **kwargs) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v
            for k, v in model.adapter_state_dict(save_embedding_layers=False, **kwargs).items()}


@pytest.mark.parametrize("make_model", [tiny_t5, tiny_mt5], ids=["t5", "mt5"])
def test_t5_tied_embeddings_share_one_lora_through_training_merge_and_unmerge(make_model) -> None:
    config = dt.LoraConfig(ensure_weight_tying=True, target_modules=["embed_tokens", "q"])
    model = dt.get_peft_model(make_model(), config)
    base = model.get_base_model()
    src = base.shared.deltas["default"]  # rooted at the input embedding, as in peft
    for name in ("encoder.embed_tokens", "decoder.embed_tokens"):
        twin = base.get_submodule(name).deltas["default"]
        assert twin.lora_embedding_A is src.lora_embedding_A and twin.lora_embedding_B is src.lora_embedding_B
    head = base.lm_head.deltas["default"]
    assert head.lora_A.tied is src.lora_embedding_B and head.lora_B.tied is src.lora_embedding_A
    inputs = make_seq2seq_inputs(base)
    _train_one_pair(model, src, ".q.", inputs)
    saved = _saved(model)  # peft's keys under every tied path, one value each
    for path in T5_TABLE[1:3]:
        for factor in ("lora_embedding_A", "lora_embedding_B"):
            assert torch.equal(saved[f"{path}.{factor}"], saved[f"shared.{factor}"])
    assert torch.equal(saved["lm_head.lora_A.weight"], saved["shared.lora_embedding_B"].T)
    # the tied table as the model sees it: E + s (B A)ᵀ, written out; the encoder looks its rows up there
    table0 = base.shared.base_layer.weight.detach().clone()
    table = (table0 + src.scaling * (src.lora_embedding_B @ src.lora_embedding_A).T).detach()
    ids = inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(base.encoder.embed_tokens(ids), table[ids], rtol=1e-6, atol=1e-6)
        unmerged = model(**inputs).logits
    model.merge_adapter()  # once into the one table, not once per tied module
    weights = [base.get_submodule(n).base_layer.weight for n in T5_TABLE]
    assert all(w is weights[0] for w in weights)
    torch.testing.assert_close(weights[0], table, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(model, inputs), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(base.shared.base_layer.weight, table0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(model, inputs), unmerged, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert all(merged.get_submodule(n).weight is merged.shared.weight for n in T5_TABLE)
    torch.testing.assert_close(_logits(merged, inputs), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, make_inputs, targets", [
    (tiny_t5, make_seq2seq_inputs, ["embed_tokens", "q"]),
    (tiny_t5, make_seq2seq_inputs, ["lm_head", "q"]),  # peft adds the input embedding and ties from it
    (tiny_gpt2, make_causal_lm_inputs, ["lm_head", "c_attn"]),
    (tied_llama, make_causal_lm_inputs, ["lm_head", "q_proj"]),
], ids=["t5-embed_tokens", "t5-lm_head", "gpt2-lm_head", "llama-lm_head"])
def test_tied_tables_exchange_files_with_peft(tmp_path, make_model, make_inputs, targets) -> None:
    from safetensors.torch import load_file

    inputs = make_inputs(make_model())
    ours = dt.get_peft_model(make_model(), dt.LoraConfig(ensure_weight_tying=True, target_modules=targets))
    _randomize(ours)
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), peft.LoraConfig(ensure_weight_tying=True, target_modules=targets))
        _randomize(theirs)
        theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
        read_by_peft = peft.PeftModel.from_pretrained(make_model(), tmp_path / "ours").eval()
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    torch.testing.assert_close(_logits(read_by_peft, inputs), _logits(ours.eval(), inputs), rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "again", save_embedding_layers=False)  # and our own round trip
    read_by_us = dt.PeftModel.from_pretrained(make_model(), tmp_path / "again")
    torch.testing.assert_close(_logits(read_by_us, inputs), _logits(ours, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, make_inputs, targets, untied", [
    (tiny_t5, make_seq2seq_inputs, ["embed_tokens", "q"], ["q", *T5_TABLE]),
    (tiny_gpt2, make_causal_lm_inputs, ["lm_head", "c_attn"], ["c_attn", "wte", "lm_head"]),
], ids=["t5", "gpt2"])
def test_peft_files_of_tables_it_trains_apart_are_refused_and_read_untied(tmp_path, make_model, make_inputs,
                                                                           targets, untied) -> None:
    """peft 0.21.2 saves such an adapter with ``target_modules`` naming only the input embedding (``shared``,
    ``transformer.wte``), which it does not tie by that name on reload, and trains T5's encoder / decoder
    ``embed_tokens`` apart: a file no tied adapter can hold. It is refused with nothing changed; with those modules
    as plain targets (no tying) it reads as the model peft saved it from."""
    inputs = make_inputs(make_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), peft.LoraConfig(ensure_weight_tying=True, target_modules=targets))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path, save_embedding_layers=False)
    base = make_model()
    with pytest.raises(dt.errors.AdapterLoadError, match=r"do not fit.*share their weight.*ensure_weight_tying=False"):
        dt.PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, dt.layers.AdapterLayer) for m in base.modules())
    read = dt.PeftModel.from_pretrained(base, tmp_path, config=dt.LoraConfig(target_modules=untied))
    torch.testing.assert_close(_logits(read, inputs), _logits(theirs.eval(), inputs), rtol=1e-5, atol=1e-5)


def test_t5_modules_to_save_copies_share_one_table() -> None:
    """peft's keys (one copy per tied module); peft 0.21.2 itself builds the encoder / decoder copies as
    ``nn.Linear`` and cannot run the model, so the reference is the merged model: a plain T5 whose one table is the
    trained copy."""
    model = dt.get_peft_model(tiny_t5(), dt.LoraConfig(ensure_weight_tying=True, target_modules=["q"],
                                                       modules_to_save=["embed_tokens"]))
    base = model.get_base_model()
    table = base.shared.modules_to_save["default"].weight
    assert all(base.get_submodule(n).modules_to_save["default"].weight is table for n in T5_TABLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_t5(), peft.LoraConfig(ensure_weight_tying=True, target_modules=["q"],
                                                                modules_to_save=["embed_tokens"]))
    assert set(_saved(model)) == {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(theirs)}
    _randomize(model)
    inputs = make_seq2seq_inputs(base)
    _train_step(model, inputs)
    assert all(base.get_submodule(n).modules_to_save["default"].weight is table for n in T5_TABLE)
    unmerged = _logits(model, inputs)
    merged = model.merge_and_unload()  # a plain T5 whose one table is the trained copy
    torch.testing.assert_close(merged.shared.weight, table.detach(), rtol=0, atol=0)
    assert all(merged.get_submodule(n).weight is merged.shared.weight for n in T5_TABLE)
    torch.testing.assert_close(_logits(merged, inputs), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, make_inputs, targets", [
    (tied_llama, make_causal_lm_inputs, ["embed_tokens", "lm_head"]),
    (tiny_t5, make_seq2seq_inputs, ["embed_tokens"]),
], ids=["llama", "t5"])
def test_dora_twins_keep_their_own_magnitude_and_do_not_merge(tmp_path, make_model, make_inputs, targets) -> None:
    """As peft: the factors are the source's, each tied module has its own DoRA magnitude (a head's per vocabulary
    row, an embedding's per dimension) under its own key. peft reads our file to the same outputs; a merge, which
    one table cannot hold, is refused with the model unchanged."""
    from safetensors.torch import load_file

    config = dict(ensure_weight_tying=True, target_modules=targets, use_dora=True)
    ours = dt.get_peft_model(make_model(), dt.LoraConfig(**config))
    base = ours.get_base_model()
    head = base.lm_head.deltas["default"]
    assert head.lora_magnitude_vector.shape == (VOCAB_SIZE,)
    _randomize(ours)
    inputs = make_inputs(base)
    ours.save_pretrained(tmp_path, save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), peft.LoraConfig(**config))
        read_by_peft = peft.PeftModel.from_pretrained(make_model(), tmp_path).eval()
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(theirs, save_embedding_layers=False))
    expected = _logits(ours.eval(), inputs)
    torch.testing.assert_close(_logits(read_by_peft, inputs), expected, rtol=1e-5, atol=1e-5)
    table = base.lm_head.base_layer.weight.detach().clone()
    with pytest.raises(dt.errors.AdapterStateError, match="use_dora.*ensure_weight_tying.*unmerged"):
        ours.merge_adapter()
    assert torch.equal(base.lm_head.base_layer.weight, table) and not base.lm_head.merged_adapters
    torch.testing.assert_close(_logits(ours, inputs), expected, rtol=0, atol=0)


def test_t5_token_rows_of_one_table_train_together(tmp_path) -> None:
    """``trainable_token_indices`` on two modules of T5's one table: with the same rows they are one set of rows
    (peft ties them to the input embedding's, and reads our file to the same outputs); with different rows, which
    peft refuses under ``ensure_weight_tying`` and one merged table cannot hold, they are refused by name."""
    from safetensors.torch import load_file

    base = tiny_t5()
    for ensure in (True, False):
        with pytest.raises(dt.ConfigError, match=r"shared: \[5, 6\] and encoder.embed_tokens: \[7, 8\]"):
            dt.get_peft_model(base, dt.LoraConfig(target_modules=["q"], ensure_weight_tying=ensure,
                                                  trainable_token_indices={"shared": [5, 6],
                                                                           "encoder.embed_tokens": [7, 8]}))
    assert not any(isinstance(m, dt.layers.AdapterLayer) for m in base.modules())
    config = dict(target_modules=["q"], ensure_weight_tying=True,
                  trainable_token_indices={"shared": [5, 6], "encoder.embed_tokens": [5, 6]})
    ours = dt.get_peft_model(base, dt.LoraConfig(**config))
    rows = {id(ours.get_base_model().get_submodule(n).deltas["default"].token_adapter.trainable_tokens_delta)
            for n in T5_TABLE}
    assert len(rows) == 1
    _randomize(ours)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_t5(), peft.LoraConfig(**config))
        read_by_peft = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path / "ours").eval()
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(peft.get_peft_model_state_dict(theirs))
    inputs = make_seq2seq_inputs(base)
    torch.testing.assert_close(_logits(read_by_peft, inputs), _logits(ours.eval(), inputs), rtol=1e-5, atol=1e-5)

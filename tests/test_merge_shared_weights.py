"""Merging refuses to fold an update into a parameter tensor that another module holds without taking that update
(``inject.merge``), before any weight changes: the copies that LoRA's ``layer_replication`` makes, adapted by an
adapter without the ranges (each copy's update would go into the one weight) or only in some copies; an embedding and
an LM head tied to it, with a LoRA on one or each of them. Merged, every module holding the tensor would compute all
of its updates (peft 0.21.2 merges these silently). Tied twins under ``ensure_weight_tying`` take one update and still
merge it once, exactly."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterStateError
from tests.adapter_utils import assert_clearly_different, assert_same_state, logits, perturb_lora, snapshot
from tests.models import make_causal_lm_inputs, tiny_llama
from tests.test_weight_tying import tied_llama

MAP = [[0, 2], [1, 2]]  # layers 0 1 1: the last two hold the very same parameters


def _assert_refused_unchanged(model: dt.PeftModel, match: str, **merge_kwargs) -> None:
    """Merging (``merge_adapter`` and ``merge_and_unload``) is refused with ``match`` in the message, and the model's
    tensors and outputs are exactly as before."""
    inputs = make_causal_lm_inputs(model)
    before, out = snapshot(model), logits(model, inputs)
    with pytest.raises(AdapterStateError, match=match):
        model.merge_adapter(**merge_kwargs)
    with pytest.raises(AdapterStateError, match=match):
        model.merge_and_unload(**merge_kwargs)
    assert_same_state(before, model)
    assert not any(layer.merged_adapters for _, layer in dt.layers.adapter_layers(model))
    torch.testing.assert_close(logits(model, inputs), out, rtol=0, atol=0)


def _replicated(target_modules: str | list[str]) -> dt.PeftModel:
    """A model replicated by a first adapter (its own ranges, not mergeable) plus adapter ``plain`` without them."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], layer_replication=MAP))
    model.add_adapter("plain", dt.LoraConfig(target_modules=target_modules, init_lora_weights=False))
    model.set_adapter("plain")
    return model


def test_an_adapter_without_the_ranges_on_replicated_layers_is_not_merged() -> None:
    model = _replicated(["v_proj"])
    layers = model.get_base_model().model.layers
    assert layers[1].self_attn.v_proj.base_layer.weight is layers[2].self_attn.v_proj.base_layer.weight
    _assert_refused_unchanged(
        model, r"model\.layers\.1\.self_attn\.v_proj \(adapter\(s\) \['plain'\]\) and model\.layers\.2\.self_attn\."
               r"v_proj .*'weight'.*unchanged.*unmerged", adapter_names=["plain"])


def test_an_adapter_without_the_ranges_merges_where_no_layer_shares_its_weight() -> None:
    """Layer 0 was not copied: its adapter merges, and the merged model computes what the unmerged one did."""
    model = _replicated(r".*layers\.0\.self_attn\.v_proj")
    inputs = make_causal_lm_inputs(model)
    unmerged = logits(model, inputs)
    merged = model.merge_and_unload(adapter_names=["plain"])
    torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_tied_embedding_and_head_with_a_lora_each_are_not_merged() -> None:
    """Without ``ensure_weight_tying`` the embedding and the head each train an update of the one table ``E``
    ``(vocab, dim)``: unmerged, the embedding reads ``E + ΔE_emb`` and the head ``E + ΔE_head``; merged, both would
    read ``E + ΔE_emb + ΔE_head``, which equals neither unless an update is zero. So the merge is refused; the sum it
    would have written (computed here on a plain copy of the base model) indeed changes the outputs."""
    model = dt.get_peft_model(tied_llama(), dt.LoraConfig(target_modules=["embed_tokens", "lm_head"],
                                                          init_lora_weights=False))
    _assert_refused_unchanged(model, r"model\.embed_tokens .* lm_head .*ensure_weight_tying=True")
    base = model.get_base_model()
    emb, head = base.model.embed_tokens, base.lm_head
    summed = tied_llama()
    with torch.no_grad():
        summed.lm_head.weight.add_(emb.deltas["default"].delta_weight(emb.base_layer)
                                   + head.deltas["default"].delta_weight(head.base_layer))
    inputs = make_causal_lm_inputs(model)
    assert_clearly_different(logits(summed, inputs), logits(model, inputs))


@pytest.mark.parametrize("build, match", [
    (lambda: dt.get_peft_model(tied_llama(), dt.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False)),
     r"model\.embed_tokens would merge adapter\(s\) \['default'\] into its 'weight', which is also lm_head's "
     r"'weight'.*adapter\(s\) \[\] apply"),
    (lambda: _replicated(r".*layers\.1\.self_attn\.v_proj"),
     r"model\.layers\.1\.self_attn\.v_proj would merge .*model\.layers\.2\.self_attn\.v_proj's 'weight'"),
], ids=["embedding-with-untargeted-tied-head", "replicated-layer-with-unadapted-copy"])
def test_an_update_that_another_holder_of_the_weight_does_not_take_is_not_merged(build, match) -> None:
    """One layer writes, but another module holds the same tensor without taking the update (the tied head of an
    embedding that alone has a LoRA; the copy of a replicated layer the adapter left out): merged, that module would
    compute the update too (measured before this check: logits off by 125 where they are at most 0.4)."""
    _assert_refused_unchanged(build(), match)


@pytest.mark.parametrize("names", [["default"], ["b"], ["default", "b"]])
def test_tied_updates_of_two_adapters_are_not_merged(names) -> None:
    """A LoRA on the embedding (adapter ``default``) and one on the tied head (``b``): merging either alone would
    put its update under the other module too, merging both the sum under each."""
    model = dt.get_peft_model(tied_llama(), dt.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    _assert_refused_unchanged(model, r"cannot merge: .*(lm_head|embed_tokens).*unchanged", adapter_names=names)


def test_ensure_weight_tying_merges_the_one_update_once() -> None:
    """The tied head follows the embedding's LoRA (``Delta.follows_source``): one update, merged once into the
    table, exactly the unmerged outputs; and ``E + ΔE`` is what the table holds."""
    model = dt.get_peft_model(tied_llama(), dt.LoraConfig(target_modules=["embed_tokens", "lm_head", "q_proj"],
                                                          ensure_weight_tying=True))
    perturb_lora(model)
    base = model.get_base_model()
    emb = base.model.embed_tokens
    assert base.lm_head.deltas["default"].follows_source and not emb.deltas["default"].follows_source
    table = (emb.base_layer.weight + emb.deltas["default"].delta_weight(emb.base_layer)).detach()
    inputs = make_causal_lm_inputs(model)
    unmerged = logits(model, inputs)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.lm_head.weight, table, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=1e-5, atol=1e-5)

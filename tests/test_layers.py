"""The adapter-layer core (``deltatune.layers``) as seen through a model: merge / unmerge / safe merge, disabling,
several active adapters, and mixed-adapter batches (forward and generate)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer, ModulesToSaveWrapper, adapter_layers, save_wrappers
from tests.adapter_utils import (
    assert_close_scaled,
    assert_mixed_batch_equals_each_row_alone,
    assert_mixed_generate_equals_each_row_alone,
    assert_same_state,
    logits,
    lora_deltas,
    perturb_lora,
    snapshot,
)
from tests.models import (
    make_causal_lm_inputs,
    make_convnet_inputs,
    make_mlp_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_t5,
)


def _two_adapters(factory: Callable[[], nn.Module], task_type: str | None = None) -> dt.PeftModel:
    """``default`` on q/v-like targets and ``other`` with another rank on the same targets, both non-zero."""
    torch.manual_seed(0)
    model = dt.get_peft_model(factory(), dt.LoraConfig(task_type=task_type, init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(task_type=task_type, init_lora_weights=False, r=4, lora_alpha=16))
    for _, wrapper in save_wrappers(model):  # make every trained head copy differ from the original and each other
        for i, copy in enumerate(wrapper.modules_to_save.values()):
            with torch.no_grad():
                for p in copy.parameters():
                    p.add_(0.5 * (i + 1))
    return model


# --- merge / unmerge ---------------------------------------------------------------------------------------------

def test_merge_folds_the_delta_into_the_weight_and_unmerge_takes_it_out() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = {"x": make_mlp_inputs()["x"]}
    unmerged = logits(model, x)
    layer = model.base_model.model.lin0
    original = layer.base_layer.weight.detach().clone()
    delta = layer.deltas["default"]
    model.merge_adapter()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.base_layer.weight, original + delta.delta_weight(layer.base_layer))
    assert_close_scaled(logits(model, x), unmerged)
    model.merge_adapter()  # merging what is merged changes nothing
    assert layer.merged_adapters == ["default"]
    assert_close_scaled(logits(model, x), unmerged)
    model.unmerge_adapter()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
    assert_close_scaled(logits(model, x), unmerged)


def test_merging_two_adapters_equals_running_both_active() -> None:
    model = _two_adapters(tiny_llama)
    inputs = make_causal_lm_inputs(model)
    model.set_adapter(["default", "other"])
    both = logits(model, inputs)
    model.merge_adapter()
    assert_close_scaled(logits(model, inputs), both)
    model.unmerge_adapter()
    assert all(not layer.merged for _, layer in adapter_layers(model))
    assert_close_scaled(logits(model, inputs), both)


def test_several_active_adapters_add_their_deltas_in_each_layer() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False, r=2))
    model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin0
    x = make_mlp_inputs()["x"]
    base = layer.base_layer
    deltas = layer.deltas
    expected = base(x) + x @ deltas["default"].delta_weight(base).T + x @ deltas["other"].delta_weight(base).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    assert model.active_adapters == ["default", "other"]


def test_safe_merge_refuses_nan_and_leaves_every_weight_bit_for_bit_unchanged() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False))
    with torch.no_grad():  # only the last layer is poisoned: earlier layers would merge fine
        lora_deltas(model)[-1].lora_B.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(dt.AdapterStateError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert all(not layer.merged for _, layer in adapter_layers(model))
    assert_same_state(before, model)
    with pytest.raises(dt.AdapterStateError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, AdapterLayer)
    assert_same_state(before, model)


def test_safe_merge_merges_a_finite_adapter_like_a_plain_merge() -> None:
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False, use_dora=True))
    safe = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False, use_dora=True))
    safe.load_state_dict(plain.state_dict())
    plain.merge_adapter()
    safe.merge_adapter(safe_merge=True)
    assert_same_state(plain.state_dict(), safe)


def test_train_and_eval_never_merge_or_unmerge() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    x = {"x": make_mlp_inputs()["x"]}
    layer = model.base_model.model.lin0
    model.merge_adapter()
    merged_weight = layer.base_layer.weight.detach().clone()
    merged = logits(model, x)
    model.train()
    assert layer.merged_adapters == ["default"]
    assert torch.equal(layer.base_layer.weight, merged_weight)  # not unmerged (and merged again) by train()
    model.eval()
    assert layer.merged_adapters == ["default"]
    assert torch.equal(layer.base_layer.weight, merged_weight)
    assert torch.equal(logits(model, x), merged)


# --- disabling ---------------------------------------------------------------------------------------------------

def test_disable_adapter_computes_the_base_model_and_restores_the_adapter_after() -> None:
    model = _two_adapters(lambda: tiny_bert("seq_cls"), "SEQ_CLS")
    inputs = make_seq_cls_inputs(model)
    expected = logits(tiny_bert("seq_cls"), inputs)
    adapted = logits(model, inputs)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), expected)  # modules_to_save heads fall back to the original too
    assert torch.equal(logits(model, inputs), adapted)


def test_disable_adapter_is_restored_when_the_block_raises() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    x = {"x": make_mlp_inputs()["x"]}
    adapted = logits(model, x)
    with pytest.raises(RuntimeError), model.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(logits(model, x), adapted)


def test_disabling_a_merged_adapter_unmerges_it_first() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    x = {"x": make_mlp_inputs()["x"]}
    layer = model.base_model.model.lin0
    original = layer.base_layer.weight.detach().clone()
    adapted = logits(model, x)
    model.merge_adapter()
    with model.disable_adapter():
        assert_close_scaled(logits(model, x), logits(tiny_mlp(), x))
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)  # the delta is out of W
    assert_close_scaled(logits(model, x), adapted)  # and runs unmerged again after the block


# --- mixed batches -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "factory, task_type, make_inputs",
    [
        (tiny_llama, "CAUSAL_LM", make_causal_lm_inputs),
        (tiny_gpt2, "CAUSAL_LM", make_causal_lm_inputs),
        (lambda: tiny_bert("seq_cls"), "SEQ_CLS", make_seq_cls_inputs),
        (tiny_t5, "SEQ_2_SEQ_LM", make_seq2seq_inputs),
    ],
    ids=["llama", "gpt2", "bert-with-heads", "t5"],
)
def test_mixed_batch_forward_equals_each_row_with_its_own_adapter(factory, task_type, make_inputs) -> None:
    model = _two_adapters(factory, task_type)
    names = ["other", "__base__", "default", "other"]
    mixed = assert_mixed_batch_equals_each_row_alone(model, make_inputs(model, batch=len(names)), names, rel=1e-5)
    # and the rows really differ by adapter (otherwise the check above proves nothing)
    assert not torch.allclose(mixed[0], mixed[1]) and not torch.allclose(mixed[0], mixed[2])


def test_mixed_batch_leaves_the_active_adapter_in_charge_afterwards() -> None:
    model = _two_adapters(tiny_llama)
    model.set_adapter("default")
    batch = make_causal_lm_inputs(model, batch=2)
    before = logits(model, batch)
    logits(model, batch, adapter_names=["other", "__base__"])
    assert torch.equal(logits(model, batch), before)


def test_mixed_batch_rows_for_an_adapter_a_layer_lacks_get_that_layers_base_output() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("mlp_only", dt.LoraConfig(target_modules=["down_proj"], init_lora_weights=False))
    batch = make_causal_lm_inputs(model, batch=2)
    assert_mixed_batch_equals_each_row_alone(model, batch, ["mlp_only", "default"], rel=1e-5)


def test_mixed_batch_covers_conv_embedding_and_dora_layers() -> None:
    config = dt.LoraConfig(target_modules=["conv2d", "conv1d", "embed", "fc1"], init_lora_weights=False, r=2)
    model = dt.get_peft_model(tiny_convnet(), config)
    model.add_adapter("dora", dt.LoraConfig(target_modules=["conv2d", "conv1d", "fc1"], init_lora_weights=False,
                                            use_dora=True, r=2))
    names = ["dora", "__base__", "default"]
    batch = make_convnet_inputs(batch=len(names))
    batch.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, batch, names, rel=1e-5)


@pytest.mark.parametrize(
    "factory, make_inputs", [(tiny_llama, make_causal_lm_inputs), (tiny_t5, make_seq2seq_inputs)], ids=["llama", "t5"]
)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_adapter_names_equals_generating_each_row_alone(factory, make_inputs, num_beams: int) -> None:
    model = _two_adapters(factory)
    names = ["default", "__base__", "other"]
    batch = make_inputs(model, batch=len(names))
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams)
    ids, mask = batch["input_ids"][:, :4], batch["attention_mask"][:, :4]
    assert_mixed_generate_equals_each_row_alone(model, ids, mask, names, **kwargs)


def test_adapter_names_must_give_one_name_per_row() -> None:
    model = _two_adapters(tiny_llama)
    batch = make_causal_lm_inputs(model, batch=2)
    with pytest.raises(dt.AdapterStateError, match="3 entries but the batch has 2 rows"):
        logits(model, batch, adapter_names=["default", "other", "default"])


def test_adapter_names_must_name_existing_adapters() -> None:
    model = _two_adapters(tiny_llama)
    batch = make_causal_lm_inputs(model, batch=2)
    with pytest.raises(dt.AdapterStateError, match=r"unknown adapters \['typo'\]"):
        logits(model, batch, adapter_names=["default", "typo"])


def test_adapter_names_are_refused_while_merged() -> None:
    model = _two_adapters(tiny_llama)
    model.merge_adapter()
    batch = make_causal_lm_inputs(model, batch=2)
    with pytest.raises(dt.AdapterStateError, match="merged"):
        logits(model, batch, adapter_names=["default", "other"])
    with pytest.raises(dt.AdapterStateError, match="merged"):
        model.generate(input_ids=batch["input_ids"], adapter_names=["default", "other"], max_new_tokens=2)


# --- wrapper plumbing --------------------------------------------------------------------------------------------

def test_wrappers_expose_the_wrapped_modules_attributes() -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, AdapterLayer)
    assert (query.in_features, query.out_features) == (32, 32)
    assert query.weight is query.base_layer.weight
    head = model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    assert head.out_features == 3 and head.weight is head.original_module.weight


def test_perturbed_adapter_changes_only_its_own_rows_in_a_mixed_batch() -> None:
    model = _two_adapters(tiny_llama)
    batch = make_causal_lm_inputs(model, batch=2)
    before = logits(model, batch, adapter_names=["default", "other"])
    perturb_lora(model, "other", std=1.0)
    after = logits(model, batch, adapter_names=["default", "other"])
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])

"""``PeftModel`` and its task wrappers (``deltatune.model``): the adapter API and its errors, parameter accounting
(peft as the oracle), ``modules_to_save`` through save/load/resume, and training (gradient flow, checkpointing)."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch

import deltatune as dt
from deltatune.layers import AdapterLayer, ModulesToSaveWrapper
from tests.adapter_utils import adapter_layer_count, assert_same_state, logits, snapshot, train_steps
from tests.models import (
    FAMILIES,
    make_causal_lm_inputs,
    make_qa_inputs,
    make_seq_cls_inputs,
    make_token_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_t5,
)


def _llama(**kwargs) -> dt.PeftModel:
    return dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", **kwargs))


# --- wrapper classes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "factory, task_type, cls",
    [
        (tiny_llama, None, dt.PeftModel),
        (tiny_llama, "CAUSAL_LM", dt.PeftModelForCausalLM),
        (tiny_t5, "SEQ_2_SEQ_LM", dt.PeftModelForSeq2SeqLM),
        (lambda: tiny_bert("seq_cls"), "SEQ_CLS", dt.PeftModelForSequenceClassification),
        (lambda: tiny_bert("token_cls"), "TOKEN_CLS", dt.PeftModelForTokenClassification),
        (lambda: tiny_bert("qa"), "QUESTION_ANS", dt.PeftModelForQuestionAnswering),
        (lambda: tiny_bert("base"), "FEATURE_EXTRACTION", dt.PeftModelForFeatureExtraction),
    ],
)
def test_task_type_selects_the_wrapper_class(factory, task_type, cls) -> None:
    model = dt.get_peft_model(factory(), dt.LoraConfig(task_type=task_type))
    assert type(model) is cls


def test_a_classification_task_on_a_model_without_its_head_is_refused() -> None:
    # Unlike peft, which then silently trains and saves no head, deltatune says which head names it looked for.
    model = tiny_bert("base")
    with pytest.raises(dt.TargetError, match=r"modules_to_save \['classifier', 'score'\] matched no module"):
        dt.get_peft_model(model, dt.LoraConfig(task_type="SEQ_CLS"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize(
    "head, task_type, module",
    [
        ("seq_cls", "SEQ_CLS", "classifier"),
        ("token_cls", "TOKEN_CLS", "classifier"),
        ("qa", "QUESTION_ANS", "qa_outputs"),
    ],
)
def test_task_heads_are_trained_in_full_by_default(head: str, task_type: str, module: str) -> None:
    model = dt.get_peft_model(tiny_bert(head), dt.LoraConfig(task_type=task_type))
    wrapper = model.get_base_model().get_submodule(module)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert module in model.peft_config["default"].modules_to_save


def test_wrapper_forwards_unknown_attributes_to_the_base_model() -> None:
    model = _llama()
    assert model.config is model.get_base_model().config
    assert model.get_base_model() is model.base_model.model


def test_wrapping_a_peft_model_again_is_refused() -> None:
    model = _llama()
    with pytest.raises(dt.AdapterStateError, match="already a PeftModel.*add_adapter"):
        dt.get_peft_model(model, dt.LoraConfig())


def test_get_peft_model_does_not_keep_the_callers_config_object() -> None:
    config = dt.LoraConfig(target_modules="all-linear")
    model = dt.get_peft_model(tiny_llama(), config)
    assert config.target_modules == "all-linear"  # the expansion went into the model's own copy
    assert model.peft_config["default"] is not config


# --- adapter API and its errors ----------------------------------------------------------------------------------

def test_add_adapter_does_not_activate_it_and_set_adapter_does() -> None:
    model = _llama(init_lora_weights=False)
    inputs = make_causal_lm_inputs(model)
    default = logits(model, inputs)
    model.add_adapter("other", dt.LoraConfig(init_lora_weights=False, r=2))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert torch.equal(logits(model, inputs), default)
    model.set_adapter("other")
    assert model.active_adapter == "other"
    assert not torch.allclose(logits(model, inputs), default)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".deltas.other." in n
    }


def test_adding_a_duplicate_name_is_refused_and_changes_nothing() -> None:
    model = _llama()
    before = snapshot(model)
    with pytest.raises(dt.AdapterStateError, match="'default' already exists"):
        model.add_adapter("default", dt.LoraConfig(target_modules=["k_proj"]))
    assert_same_state(before, model)


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "..", "__base__", 3])
def test_invalid_adapter_names_are_refused(name) -> None:
    model = _llama()
    with pytest.raises(dt.AdapterStateError, match="invalid adapter name"):
        model.add_adapter(name, dt.LoraConfig())
    assert list(model.peft_config) == ["default"]


def test_a_failing_add_adapter_leaves_the_model_untouched() -> None:
    model = _llama()
    before = snapshot(model)
    layers = adapter_layer_count(model)
    with pytest.raises(dt.TargetError, match="LlamaRMSNorm"):
        model.add_adapter("bad", dt.LoraConfig(target_modules=["k_proj", "post_attention_layernorm"]))
    with pytest.raises(dt.TargetError, match="modules_to_save"):
        model.add_adapter("bad", dt.LoraConfig(target_modules=["k_proj"], modules_to_save=["no_such_head"]))
    assert list(model.peft_config) == ["default"]
    assert adapter_layer_count(model) == layers
    assert_same_state(before, model)


def test_set_adapter_to_a_missing_name_is_refused() -> None:
    model = _llama()
    with pytest.raises(dt.AdapterStateError, match=r"no adapter named 'nope'; adapters: \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(dt.AdapterStateError, match="no adapter named 'nope'"):
        model.set_adapter(["default", "nope"])
    assert model.active_adapters == ["default"]


def test_deleting_the_active_adapter_falls_back_like_peft() -> None:
    """peft's rule: the other active adapters stay active, else the first remaining adapter becomes active, and
    deleting the last one leaves none (the base model's outputs)."""
    model = _llama(init_lora_weights=False)
    batch = make_causal_lm_inputs(model)
    first = logits(model, batch)
    torch.manual_seed(1)
    model.add_adapter("second", dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    model.set_adapter("second")
    second = logits(model, batch)
    model.delete_adapter("second")
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(logits(model, batch), first)
    torch.manual_seed(1)
    model.add_adapter("second", dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    model.set_adapter(["default", "second"])
    model.delete_adapter("default")
    assert model.active_adapters == ["second"]
    torch.testing.assert_close(logits(model, batch), second)
    model.delete_adapter("second")
    assert model.active_adapters == [] and list(model.peft_config) == []
    torch.testing.assert_close(logits(model, batch), logits(tiny_llama(), batch))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_second_adapter_that_trains_biases_is_refused_like_peft(bias: str) -> None:
    """The biases belong to the base model and every adapter shares them: a second adapter training them would
    write the first one's trained biases into its own file. peft refuses it too."""
    model = _llama(bias=bias)
    before = snapshot(model)
    with pytest.raises(dt.ConfigError, match=f"bias='{bias}': adapter 'default' already trains"):
        model.add_adapter("second", dt.LoraConfig(task_type="CAUSAL_LM", bias=bias))
    assert list(model.peft_config) == ["default"]
    assert_same_state(before, model)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", bias=bias))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        theirs.add_adapter("second", peft.LoraConfig(task_type="CAUSAL_LM", bias=bias))
    model.add_adapter("second", dt.LoraConfig(task_type="CAUSAL_LM"))  # bias="none" beside it is fine
    assert list(model.peft_config) == ["default", "second"]


def test_deleting_a_missing_adapter_is_refused() -> None:
    with pytest.raises(dt.AdapterStateError, match="no adapter named 'ghost'"):
        _llama().delete_adapter("ghost")


def test_delete_adapter_removes_its_layers_and_unwraps_modules_it_alone_used() -> None:
    model = _llama(init_lora_weights=False)
    inputs = make_causal_lm_inputs(model)
    expected = logits(model, inputs)
    model.add_adapter("mlp", dt.LoraConfig(target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"]))
    model.delete_adapter("mlp")
    base = model.get_base_model()
    assert list(model.peft_config) == ["default"]
    assert not isinstance(base.model.layers[0].mlp.down_proj, AdapterLayer)
    assert not isinstance(base.lm_head, ModulesToSaveWrapper)
    assert list(base.model.layers[0].self_attn.q_proj.deltas) == ["default"]
    assert torch.equal(logits(model, inputs), expected)


def test_merge_adapter_with_a_missing_name_is_refused() -> None:
    with pytest.raises(dt.AdapterStateError, match="no adapter named 'x'"):
        _llama().merge_adapter(["x"])


def test_inference_mode_config_trains_nothing() -> None:
    model = _llama(inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0


# --- parameter accounting ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainable_parameter_count_is_the_sum_of_low_rank_factors(family: str) -> None:
    model = dt.get_peft_model(FAMILIES[family].factory(), dt.LoraConfig(r=4))
    expected = 0
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, AdapterLayer):
            out_features, in_features = module.deltas["default"].canonical(module.weight, module.base_layer).shape
            expected += 4 * (in_features + out_features)
    base_total = sum(p.numel() for p in FAMILIES[family].factory().parameters())
    assert model.get_nb_trainable_parameters() == (expected, base_total + expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameter_counts_equal_peft_with_task_heads(family: str) -> None:
    task_type = FAMILIES[family].task_type
    ours = dt.get_peft_model(FAMILIES[family].factory(), dt.LoraConfig(task_type=task_type, use_dora=True))
    theirs = peft.get_peft_model(FAMILIES[family].factory(), peft.LoraConfig(task_type=task_type, use_dora=True))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters_prints_peft_format(capsys) -> None:
    ours = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS"))
    ours.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    trainable, total = ours.get_nb_trainable_parameters()
    percent = 100 * trainable / total
    assert printed == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", printed)
    theirs = peft.get_peft_model(tiny_bert("seq_cls"), peft.LoraConfig(task_type="SEQ_CLS"))
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == printed


# --- modules_to_save through save / load / resume (peft #503, #602, #1894) ---------------------------------------

def test_modules_to_save_are_saved_restored_and_training_resumes(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS"))
    batch = make_seq_cls_inputs(model, batch=4)
    train_steps(model, batch, steps=3)
    head = model.base_model.model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)  # it did train
    model.save_pretrained(tmp_path)
    trained = logits(model, batch)

    loaded = dt.PeftModel.from_pretrained(tiny_bert("seq_cls"), tmp_path, is_trainable=True)
    assert type(loaded) is dt.PeftModelForSequenceClassification
    assert torch.equal(logits(loaded, batch), trained)  # the trained head came back, not a fresh one
    loaded_head = loaded.base_model.model.classifier
    assert all(p.requires_grad for p in loaded_head.modules_to_save["default"].parameters())
    assert loaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()

    weight_before = loaded_head.modules_to_save["default"].weight.detach().clone()
    losses = train_steps(loaded, batch, steps=3)
    assert not torch.equal(loaded_head.modules_to_save["default"].weight, weight_before)
    assert losses[-1] < losses[0]


def test_loading_for_inference_freezes_everything(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS")).save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_bert("seq_cls"), tmp_path)
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_merge_and_unload_keeps_the_trained_head_and_returns_a_plain_model() -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    batch = make_seq_cls_inputs(model)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-7)


def test_unload_gives_back_the_original_head() -> None:
    expected = snapshot(tiny_bert("seq_cls"))
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS"))
    train_steps(model, make_seq_cls_inputs(model), steps=1)
    assert_same_state(expected, model.unload())


# --- training ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "head, task_type, make_inputs",
    [("seq_cls", "SEQ_CLS", make_seq_cls_inputs), ("token_cls", "TOKEN_CLS", make_token_cls_inputs),
     ("qa", "QUESTION_ANS", make_qa_inputs)],
)
def test_gradients_reach_only_adapter_and_modules_to_save_parameters(head: str, task_type: str, make_inputs) -> None:
    model = dt.get_peft_model(tiny_bert(head), dt.LoraConfig(task_type=task_type, init_lora_weights=False))
    model.train()
    model(**make_inputs(model)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    owned = {n for n, _ in model.named_parameters() if ".deltas.default." in n or ".modules_to_save.default." in n}
    assert with_grad == owned
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_training_a_few_steps_lowers_the_loss_and_leaves_the_base_alone(factory) -> None:
    base_state = snapshot(factory())
    model = dt.get_peft_model(factory(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    batch = make_causal_lm_inputs(model, batch=4)
    losses = train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0] - 0.05
    assert_same_state(base_state, model.unload())


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_gradient_checkpointing_with_a_frozen_base_still_trains_the_adapters(factory, use_reentrant: bool) -> None:
    # peft #137: with reentrant checkpointing, segments whose inputs need no grad produce no gradients at all.
    model = dt.get_peft_model(factory(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.get_base_model().modules())
    model.train()
    batch = make_causal_lm_inputs(model)
    model(**batch).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # and the gradients are the ones computed without checkpointing
    reference = dt.get_peft_model(factory(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    reference.load_state_dict(model.state_dict())
    reference.train()
    reference(**batch).loss.backward()
    expected = dict(reference.named_parameters())
    for name, param in trainable:
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-4, atol=1e-6)


def test_a_plain_torch_model_can_be_adapted_and_trained() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_new_adapters_follow_the_models_train_or_eval_mode(training: bool) -> None:
    base = tiny_llama().train(training)
    model = dt.get_peft_model(base, dt.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.5))
    model.add_adapter("other", dt.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.5))
    assert model.training == training
    assert all(m.training == training for m in model.modules())

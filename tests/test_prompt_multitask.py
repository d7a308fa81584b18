"""Multitask prompt tuning: each row's prompt ``P* ∘ (u_k v_kᵀ)`` for its task ``k`` against the formula, files
exchanged with peft both ways (peft 0.21.2 is the oracle), the source-checkpoint inits against peft's, cached
generation against full forwards with ``task_ids``, and the errors for missing or bad ``task_ids``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import AdapterLoadError, ConfigError
from tests.models import make_causal_lm_inputs, tiny_llama
from tests.test_prompt_methods import GEN_FAMILIES, _check_cached_equals_loop

T = 3
KW = dict(task_type="CAUSAL_LM", num_virtual_tokens=T, num_tasks=3, num_ranks=2)
TASKS = torch.tensor([2, 0])


def _ours(seed: int = 0, **kw) -> dt.PeftModel:
    torch.manual_seed(seed)
    return dt.get_peft_model(tiny_llama(), dt.MultitaskPromptTuningConfig(**{**KW, **kw}))


def _peft(seed: int = 0, **kw):
    import peft

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(**{**KW, **kw}))


def _logits(model, inputs, task_ids=TASKS):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs, task_ids=task_ids).logits


def test_each_row_gets_its_tasks_prompt_written_out():
    model = _ours()
    encoder = model.prompt_encoder["default"]
    inputs = make_causal_lm_inputs(model)
    shared, cols, rows = encoder.embedding.weight, encoder.prefix_task_cols, encoder.prefix_task_rows
    with torch.no_grad():
        prompts = torch.stack([shared * (cols[k] @ rows[k]) for k in TASKS.tolist()])  # (2, T, d)
        base = model.get_base_model()
        embeds = torch.cat([prompts, base.get_input_embeddings()(inputs["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(2, T, dtype=torch.long), inputs["attention_mask"]], dim=1)
        want = base(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(_logits(model, inputs), want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(_logits(model, inputs, torch.tensor([1, 1])), want)


def test_files_move_both_ways_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = _peft(seed=1)
    inputs = make_causal_lm_inputs(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=1e-5)

    mine = _ours(seed=2)
    mine.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, inputs), _logits(mine, inputs), atol=1e-5, rtol=1e-5)
    ours_keys = {k: v.shape for k, v in load_file(tmp_path / "ours/adapter_model.safetensors").items()}
    theirs_keys = {k: v.shape for k, v in load_file(tmp_path / "theirs/adapter_model.safetensors").items()}
    assert ours_keys == theirs_keys == {"prompt_embeddings": (T, 32), "prefix_task_cols": (3, T, 2),
                                        "prefix_task_rows": (3, 2, 32)}
    our_config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs/adapter_config.json").read_text())
    assert set(our_config) <= set(their_config)
    assert {k: v for k, v in our_config.items() if their_config[k] != v} == {}


@pytest.mark.parametrize("init", ["EXACT_SOURCE_TASK", "AVERAGE_SOURCE_TASKS", "ONLY_SOURCE_SHARED"])
def test_target_starts_from_a_source_checkpoint_as_peft_does(init, tmp_path):
    pytest.importorskip("peft")
    source = _ours(seed=5)
    source.save_pretrained(tmp_path / "source")
    path = str(tmp_path / "source" / "adapter_model.safetensors")
    target = dict(num_tasks=1, prompt_tuning_init=init, prompt_tuning_init_state_dict_path=path,
                  prompt_tuning_init_task=1)
    ours, theirs = _ours(seed=6, **target), _peft(seed=6, **target)
    saved = load_file(path)
    encoder = ours.prompt_encoder["default"]
    assert torch.equal(encoder.embedding.weight, saved["prompt_embeddings"])
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(encoder.prefix_task_cols[0], saved["prefix_task_cols"][1])
    inputs = make_causal_lm_inputs(ours)
    zeros = torch.zeros(2, dtype=torch.long)
    if init == "ONLY_SOURCE_SHARED":  # the factors stay random (seeded differently in each library)
        torch.testing.assert_close(theirs.prompt_encoder["default"].embedding.weight, encoder.embedding.weight)
    else:
        torch.testing.assert_close(_logits(ours, inputs, zeros), _logits(theirs, inputs, zeros), atol=1e-5,
                                   rtol=1e-5)
    # every target task starts from the source factors (peft fails on the shape for num_tasks > 1)
    several = _ours(seed=6, **{**target, "num_tasks": 2})
    if init != "ONLY_SOURCE_SHARED":
        cols = several.prompt_encoder["default"].prefix_task_cols
        assert torch.equal(cols[0], cols[1]) and torch.equal(cols[0], encoder.prefix_task_cols[0])


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_cached_generate_with_task_ids_equals_full_forward_loop(family, padded):
    factory, task = GEN_FAMILIES[family]
    torch.manual_seed(0)
    model = dt.get_peft_model(factory(), dt.MultitaskPromptTuningConfig(
        task_type=task, num_virtual_tokens=T, num_tasks=3, num_ranks=2))
    torch.manual_seed(1)
    with torch.no_grad():  # factors of size 1, so the task prompts are not ~0 (they are P* ∘ u vᵀ)
        encoder = model.prompt_encoder["default"]
        for param in (encoder.prefix_task_cols, encoder.prefix_task_rows):
            param.normal_(0, 1)
    _check_cached_equals_loop(model, task == "SEQ_2_SEQ_LM", padded, task_ids=TASKS)


def test_round_trip_and_trainable_load(tmp_path):
    model = _ours(seed=3)
    inputs = make_causal_lm_inputs(model)
    want = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert torch.equal(_logits(loaded, inputs), want)
    loss = loaded(**inputs, task_ids=TASKS).loss
    loss.backward()
    encoder = loaded.prompt_encoder["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert encoder.prefix_task_cols.grad[1].abs().sum() == 0  # task 1 is in no row


def test_bad_task_ids_and_configs_are_named(tmp_path):
    model = _ours()
    inputs = make_causal_lm_inputs(model)
    with pytest.raises(TypeError, match="needs task_ids"):
        model(**inputs)
    with pytest.raises(TypeError, match="needs task_ids"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"must lie in \[0, 3\)"):
        model(**inputs, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match=r"shape \(2,\)"):
        model(**inputs, task_ids=torch.tensor([0]))
    with pytest.raises(ConfigError, match="one integer task index"):
        model(**inputs, task_ids=torch.tensor([0.0, 1.0]))
    plain = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    with pytest.raises(TypeError, match="takes none"):
        plain(**inputs, task_ids=TASKS)
    lora = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="takes none"):
        lora.generate(input_ids=inputs["input_ids"], task_ids=TASKS, max_new_tokens=2)
    with pytest.raises(ConfigError, match="prompt_tuning_init_state_dict_path"):
        dt.MultitaskPromptTuningConfig(**KW, prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(ConfigError, match="SAMPLE_VOCAB"):
        dt.MultitaskPromptTuningConfig(**KW, prompt_tuning_init="SAMPLE_VOCAB")
    with pytest.raises(ConfigError, match="num_tasks"):
        dt.MultitaskPromptTuningConfig(**{**KW, "num_tasks": 0})
    _ours(num_ranks=3).save_pretrained(tmp_path / "r3")
    bad = dict(prompt_tuning_init="AVERAGE_SOURCE_TASKS",
               prompt_tuning_init_state_dict_path=str(tmp_path / "r3" / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="same num_virtual_tokens and num_ranks"):
        _ours(**bad)
    with pytest.raises(AdapterLoadError, match="shape mismatch for 'prefix_task_cols'"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "r3",
                                     config=dt.MultitaskPromptTuningConfig(**KW, inference_mode=True))

"""Adapter files (``deltatune.checkpoint``, ``deltatune.files``): peft's layout and keys, the pure key mapping, atomic
writes, and loading that refuses bad files with a message naming the problem while leaving the model exactly as it
was."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune import checkpoint
from deltatune.layers import AdapterLayer, ModulesToSaveWrapper
from deltatune.targeting import trained_biases
from tests.adapter_utils import assert_same_state, logits, snapshot
from tests.models import VOCAB_SIZE, make_causal_lm_inputs, make_seq_cls_inputs, tiny_bert, tiny_llama

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _saved_llama(directory: Path, **kwargs) -> dt.PeftModel:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs))
    model.save_pretrained(directory)
    return model


def _edit_config(directory: Path, **changes) -> None:
    data = json.loads((directory / CONFIG).read_text())
    data.update(changes)
    (directory / CONFIG).write_text(json.dumps(data))


def _assert_load_fails_cleanly(directory: Path, error: type[Exception], match: str, **kwargs) -> None:
    """Loading raises ``error`` matching ``match`` and leaves the base model bit for bit as it was, unwrapped."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dt.PeftModel.from_pretrained(model, directory, **kwargs)
    assert_same_state(before, model)
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules())


def _no_temp_files(directory: Path) -> bool:
    """No temporary file inside ``directory`` and no leftover of a directory swap beside it."""
    inside = [p for p in directory.rglob("*") if p.name.startswith(".tmp-")]
    beside = [p for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.deltatune-save-")]
    return not inside and not beside


# --- what is written ---------------------------------------------------------------------------------------------

def test_saved_directory_has_peft_layout_keys_and_config(tmp_path: Path) -> None:
    _saved_llama(tmp_path, r=4)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]
    keys = set(load_file(tmp_path / WEIGHTS))
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight"
        for i in (0, 1) for proj in ("q_proj", "v_proj") for ab in "AB"
    }
    assert keys == expected
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["inference_mode"] is True  # as peft writes it, whatever the in-memory mode


def test_saved_tensors_are_the_adapters_values(tmp_path: Path) -> None:
    model = _saved_llama(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    a = model.base_model.model.model.layers[1].self_attn.v_proj.deltas["default"].lora_A.weight
    assert torch.equal(saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"], a)


def test_other_adapters_go_to_subfolders_and_each_file_holds_only_its_adapter(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False))
    model.add_adapter("mlp", dt.LoraConfig(target_modules=["down_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "mlp" / WEIGHTS).is_file()
    assert all("q_proj" in k or "v_proj" in k for k in load_file(tmp_path / WEIGHTS))
    assert all("down_proj" in k for k in load_file(tmp_path / "mlp" / WEIGHTS))

    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "mlp", adapter_name="mlp")
    inputs = make_causal_lm_inputs(model)
    for name in ("default", "mlp"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_selected_adapters_limits_what_is_saved(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig())
    model.add_adapter("other", dt.LoraConfig())
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_pickle_format_is_written_on_request_and_read_back(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, "adapter_model.bin"]
    inputs = make_causal_lm_inputs(model)
    assert torch.equal(logits(dt.PeftModel.from_pretrained(tiny_llama(), tmp_path), inputs), logits(model, inputs))


def test_adapter_loads_under_another_name_with_bias_all_and_a_trained_head(tmp_path: Path) -> None:
    # bias="all" saves the model's own biases; the head copy's bias must not also be saved under a key naming the
    # adapter, or the file only loads back under that same name.
    config = dt.LoraConfig(task_type="SEQ_CLS", bias="all", init_lora_weights=False)
    model = dt.get_peft_model(tiny_bert("seq_cls"), config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].bias.add_(1.0)
    model.save_pretrained(tmp_path)
    assert not [k for k in load_file(tmp_path / WEIGHTS) if ".default." in k or k.endswith(".default")]
    other = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS"), adapter_name="first")
    other.load_adapter(tmp_path, adapter_name="second")
    other.set_adapter("second")
    inputs = make_seq_cls_inputs(model)
    assert torch.equal(logits(other, inputs), logits(model, inputs))


# --- key mapping: pure functions ---------------------------------------------------------------------------------

def test_saved_keys_map_to_in_memory_names() -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS"), adapter_name="ad")
    root = model.get_base_model()
    holders = checkpoint.adapter_holders(root)
    q = "bert.encoder.layer.0.attention.self.query"
    mapping = checkpoint.to_model_keys(
        [
            f"{q}.lora_A.weight",
            f"{q}.base_layer.bias",  # the wrapped module itself (bias="lora_only")
            "classifier.weight",  # a modules_to_save copy
            "classifier.original_module.bias",  # the frozen original (peft's bias="all")
            "classifier.modules_to_save.bias",  # peft's bias="all" spelling of the copy's bias
            "bert.pooler.dense.bias",  # outside any wrapper
        ],
        holders,
        "ad",
    )
    assert mapping == {
        f"{q}.lora_A.weight": f"{q}.deltas.ad.lora_A.weight",
        f"{q}.base_layer.bias": f"{q}.base_layer.bias",
        "classifier.weight": "classifier.modules_to_save.ad.weight",
        "classifier.original_module.bias": "classifier.original_module.bias",
        "classifier.modules_to_save.bias": "classifier.modules_to_save.ad.bias",
        "bert.pooler.dense.bias": "bert.pooler.dense.bias",
    }
    state = dict(root.named_parameters())
    assert all(target in state for target in mapping.values())


def test_adapter_state_dict_round_trips_through_the_key_mapping() -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS", bias="lora_only"))
    root = model.get_base_model()
    state = checkpoint.layer_adapter_state_dict(root, "default", biases=trained_biases(model.peft_config["default"]))
    assert any(key.endswith(".base_layer.bias") for key in state)  # lora_only: the adapted layers' biases
    mapping = checkpoint.to_model_keys(state, checkpoint.adapter_holders(root), "default")
    params = dict(root.named_parameters())
    for key, target in mapping.items():
        assert torch.equal(params[target], state[key]), key


# --- atomic writes -----------------------------------------------------------------------------------------------

def _old_and_new(tmp_path: Path) -> tuple[dict[str, bytes], dt.PeftModel]:
    _saved_llama(tmp_path, r=4)
    old = {name: (tmp_path / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    new = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    return old, new


def _assert_files(tmp_path: Path, expected: dict[str, bytes]) -> None:
    assert {name: (tmp_path / name).read_bytes() for name in expected} == expected
    assert _no_temp_files(tmp_path)


def test_failing_serialiser_leaves_the_previous_files_intact(tmp_path: Path, monkeypatch) -> None:
    old, new = _old_and_new(tmp_path)

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full while serialising")

    monkeypatch.setattr("safetensors.torch.save", broken_save)
    with pytest.raises(RuntimeError, match="serialising"):
        new.save_pretrained(tmp_path)
    _assert_files(tmp_path, old)


@pytest.mark.parametrize("failing", ["deltatune.files._exchange", "os.fsync", "os.mkdir"])
def test_failing_write_or_rename_leaves_the_previous_files_intact_and_no_temp_files(
    tmp_path: Path, monkeypatch, failing: str
) -> None:
    old, new = _old_and_new(tmp_path)

    def broken(*args, **kwargs):
        raise OSError(f"{failing} failed")

    monkeypatch.setattr(failing, broken)
    with pytest.raises(OSError, match="failed"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    _assert_files(tmp_path, old)
    # and the old adapter still loads
    dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_successful_save_replaces_both_files(tmp_path: Path) -> None:
    old, new = _old_and_new(tmp_path)
    new.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["r"] == 2
    assert (tmp_path / WEIGHTS).read_bytes() != old[WEIGHTS]
    assert _no_temp_files(tmp_path)


# --- refusing bad files ------------------------------------------------------------------------------------------

def test_shape_mismatch_names_the_key_and_both_shapes_and_leaves_the_model_unchanged(tmp_path: Path) -> None:
    _saved_llama(tmp_path, r=8)
    _edit_config(tmp_path, r=4)
    _assert_load_fails_cleanly(
        tmp_path, dt.AdapterLoadError,
        r"shape mismatch for '.*layers\.0\.self_attn\.q_proj\.lora_A\.weight': saved \[8, 32\], model has \[4, 32\]",
    )


def test_resized_vocabulary_says_to_resize_the_embeddings(tmp_path: Path) -> None:
    base = tiny_llama()
    base.resize_token_embeddings(VOCAB_SIZE + 8, mean_resizing=False)
    model = dt.get_peft_model(base, dt.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path)
    _assert_load_fails_cleanly(
        tmp_path, dt.AdapterLoadError,
        rf"saved \[{VOCAB_SIZE + 8}, 32\], model has \[{VOCAB_SIZE}, 32\].*resize_token_embeddings",
    )


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated-half"),
        pytest.param(lambda data: data[:5], id="truncated-inside-header-length"),
        pytest.param(lambda data: b"\xff" * 64, id="absurd-header-length"),
        pytest.param(lambda data: data[:8] + b"{not json" + data[17:], id="garbled-header"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_weights_are_refused_naming_the_file(tmp_path: Path, corrupt) -> None:
    _saved_llama(tmp_path)
    path = tmp_path / WEIGHTS
    path.write_bytes(corrupt(path.read_bytes()))
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, WEIGHTS)


def test_corrupt_config_is_refused_naming_the_file(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    (tmp_path / CONFIG).write_text('{"peft_type": "LORA", ')
    _assert_load_fails_cleanly(tmp_path, dt.ConfigError, CONFIG)


def test_a_directory_without_a_config_is_refused(tmp_path: Path) -> None:
    _assert_load_fails_cleanly(tmp_path, dt.ConfigError, f"no {CONFIG}")


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, f"no {WEIGHTS} or adapter_model.bin")


def test_a_file_lacking_an_adapter_tensor_is_refused(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, tmp_path / WEIGHTS)
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, r"lacks 1 tensor.*layers\.1\.self_attn\.v_proj.*lora_B")


def test_a_file_with_tensors_for_modules_the_model_lacks_is_refused(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, tmp_path / WEIGHTS)
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, r"do not fit this model.*layers\.7")


def test_a_file_that_would_overwrite_base_weights_is_refused(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors["base_model.model.model.norm.weight"] = torch.zeros(32)
    save_file(tensors, tmp_path / WEIGHTS)
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, r"model\.norm\.weight.*overwrite a base-model weight")


def test_unknown_peft_type_is_a_config_error(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    _edit_config(tmp_path, peft_type="SOME_FUTURE_METHOD")
    _assert_load_fails_cleanly(tmp_path, dt.ConfigError, r"peft_type 'SOME_FUTURE_METHOD' is not supported.*LORA")


def test_harmless_unknown_fields_give_exactly_one_warning_naming_them(tmp_path: Path) -> None:
    model = _saved_llama(tmp_path)
    _edit_config(tmp_path, future_field=1, another_new_field="x", peft_version="9.9.9")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ours = [w for w in caught if "unknown to LoraConfig" in str(w.message)]
    assert len(ours) == 1
    assert "another_new_field" in str(ours[0].message) and "future_field" in str(ours[0].message)
    assert "peft_version" not in str(ours[0].message)  # metadata is not "unknown"
    inputs = make_causal_lm_inputs(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


@pytest.mark.parametrize(
    "field, value",
    [("megatron_config", {"tensor_model_parallel_size": 2})],
)
def test_peft_fields_that_change_the_math_are_refused(tmp_path: Path, field: str, value) -> None:
    _saved_llama(tmp_path)
    _edit_config(tmp_path, **{field: value})
    _assert_load_fails_cleanly(tmp_path, dt.ConfigError, rf"sets {field}=.*does not implement")


def test_peft_fields_left_at_their_off_value_load_silently(tmp_path: Path) -> None:
    model = _saved_llama(tmp_path)
    _edit_config(tmp_path, layer_replication=None, lora_bias=False, use_qalora=False, qalora_group_size=16,
                 eva_config=None, trainable_token_indices=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert [str(w.message) for w in caught] == []
    inputs = make_causal_lm_inputs(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_pickled_weights_are_read_with_weights_only(tmp_path: Path, monkeypatch) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig())
    model.save_pretrained(tmp_path, safe_serialization=False)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert calls == [True]


_EXECUTED: list[str] = []


def _record_execution(marker: str) -> None:
    _EXECUTED.append(marker)


class _Payload:
    """Unpickling this calls ``_record_execution``: what a malicious ``adapter_model.bin`` would do."""

    def __reduce__(self):
        return (_record_execution, ("pwned",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    _saved_llama(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with open(tmp_path / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.x": _Payload()}, fh)
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, "weights-only")
    assert _EXECUTED == []


def test_safetensors_only_refuses_a_pickle(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_llama(), dt.LoraConfig()).save_pretrained(tmp_path, safe_serialization=False)
    _assert_load_fails_cleanly(tmp_path, dt.AdapterLoadError, "safetensors_only=True", safetensors_only=True)


def test_failed_load_adapter_keeps_the_existing_adapters(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False))
    inputs = make_causal_lm_inputs(model)
    expected = logits(model, inputs)
    before = snapshot(model)
    _saved_llama(tmp_path, r=8)
    _edit_config(tmp_path, r=2)
    with pytest.raises(dt.AdapterLoadError, match="shape mismatch"):
        model.load_adapter(tmp_path, adapter_name="broken")
    assert list(model.peft_config) == ["default"]
    assert_same_state(before, model)
    assert torch.equal(logits(model, inputs), expected)

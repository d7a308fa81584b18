"""AutoPeftModel*: base model from the adapter's config, Auto class and wrapper from its task, kwargs routing, and the
trust_remote_code check read from config.json as data."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import transformers

from deltatune import (
    AdapterStateError,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    ConfigError,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    RemoteCodeError,
    get_peft_model,
)
from deltatune.auto import AUTO_CLASS_FOR_TASK, check_remote_code
from tests.hubcache import fake_commit, write_snapshot
from tests.models import (
    make_causal_lm_inputs,
    make_qa_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    make_token_cls_inputs,
    tiny_bert,
    tiny_llama,
    tiny_t5,
)


def _plain_inputs(model: Any) -> dict[str, torch.Tensor]:
    batch = make_seq_cls_inputs(model)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# (task, auto class, expected wrapper, base factory, transformers Auto class, targets, inputs, output field)
CASES = {
    "CAUSAL_LM": (AutoPeftModelForCausalLM, PeftModelForCausalLM, tiny_llama, ["q_proj", "v_proj"],
                  make_causal_lm_inputs, "logits"),
    "SEQ_2_SEQ_LM": (AutoPeftModelForSeq2SeqLM, PeftModelForSeq2SeqLM, tiny_t5, ["q", "v"], make_seq2seq_inputs,
                     "logits"),
    "SEQ_CLS": (AutoPeftModelForSequenceClassification, PeftModelForSequenceClassification,
                lambda: tiny_bert("seq_cls"), ["query", "value"], make_seq_cls_inputs, "logits"),
    "TOKEN_CLS": (AutoPeftModelForTokenClassification, PeftModelForTokenClassification,
                  lambda: tiny_bert("token_cls"), ["query", "value"], make_token_cls_inputs, "logits"),
    "QUESTION_ANS": (AutoPeftModelForQuestionAnswering, PeftModelForQuestionAnswering, lambda: tiny_bert("qa"),
                     ["query", "value"], make_qa_inputs, "start_logits"),
    "FEATURE_EXTRACTION": (AutoPeftModelForFeatureExtraction, PeftModelForFeatureExtraction,
                           lambda: tiny_bert("base"), ["query", "value"], _plain_inputs, "last_hidden_state"),
}


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Saved (adapter, reference) pairs shared by the module's tests; built on first use."""
    return {"root": tmp_path_factory.mktemp("pairs")}


@pytest.fixture
def save_pair(tmp_path: Path, pair_cache: dict) -> Callable[..., tuple[Path, torch.Tensor]]:
    """``save_pair(task, **config)``: a copy in ``tmp_path`` (free to edit) of a saved adapter for the task's tiny
    base model and its reference output (see :func:`_make_pair`)."""

    def get(task: str, **config: Any) -> tuple[Path, torch.Tensor]:
        key = (task, tuple(sorted(config.items())))
        if key not in pair_cache:
            pair_cache[key] = _make_pair(pair_cache["root"] / f"pair{len(pair_cache)}", task, **config)
        adapter, reference = pair_cache[key]
        shutil.copytree(adapter, tmp_path / "adapter")
        return tmp_path / "adapter", reference

    return get


def _make_pair(tmp: Path, task: str, **config: Any) -> tuple[Path, torch.Tensor]:
    """Save the task's tiny base model and a non-zero LoRA adapter trained on it (naming the base's directory);
    return the adapter directory and the adapted model's reference output."""
    _, _, factory, targets, make_inputs, field = CASES[task]
    factory().save_pretrained(tmp / "base")
    auto = getattr(transformers, AUTO_CLASS_FOR_TASK[task])
    base = auto.from_pretrained(tmp / "base").eval()  # same attention kernel as the load under test
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type=config.pop("task_type", task), target_modules=targets,
                                            init_lora_weights=False, **config))
    with torch.no_grad():
        reference = getattr(model(**make_inputs(model)), field)
    model.save_pretrained(tmp / "adapter")
    return tmp / "adapter", reference


@pytest.mark.parametrize("task", sorted(CASES))
def test_each_auto_class_loads_base_and_adapter(task: str, save_pair: Callable) -> None:
    auto_cls, wrapper, _, _, make_inputs, field = CASES[task]
    adapter, reference = save_pair(task)
    for cls in (auto_cls, AutoPeftModel):
        model = cls.from_pretrained(str(adapter))
        assert type(model) is wrapper
        assert not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(getattr(model(**make_inputs(model)), field), reference)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_wrong_auto_class_for_task_is_refused_before_loading(
    task: str, monkeypatch: pytest.MonkeyPatch, save_pair: Callable
) -> None:
    adapter, _ = save_pair(task)
    right = CASES[task][0]
    for auto_name in AUTO_CLASS_FOR_TASK.values():
        monkeypatch.setattr(getattr(transformers, auto_name), "from_pretrained", _must_not_run)
    for cls, _, *_ in CASES.values():
        if cls is right:
            continue
        with pytest.raises(ConfigError, match=rf"task_type is {task}.*use {right.__name__}") as info:
            cls.from_pretrained(str(adapter))
        assert "adapter_config.json" in str(info.value)


def _must_not_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the base model must not be loaded")


def test_no_task_type_uses_the_class_task(save_pair: Callable) -> None:
    adapter, reference = save_pair("CAUSAL_LM", task_type=None)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert type(model) is PeftModelForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(model(**make_causal_lm_inputs(model)).logits, reference)


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_auto_peft_model_without_task_uses_transformers_auto_mapping(save_pair: Callable) -> None:
    adapter, reference = save_pair("CAUSAL_LM", task_type=None)
    _edit_config(adapter, auto_mapping={"base_model_class": "LlamaForCausalLM",
                                        "parent_library": "transformers.models.llama.modeling_llama"})
    model = AutoPeftModel.from_pretrained(str(adapter))
    assert type(model) is PeftModel
    with torch.no_grad():
        torch.testing.assert_close(model(**make_causal_lm_inputs(model)).logits, reference)


@pytest.mark.parametrize(
    "auto_mapping",
    [None, {"base_model_class": "Evil", "parent_library": "deltatune_evil_module"},
     {"base_model_class": "X", "parent_library": "transformers_modules.repo.modeling_x"},
     {"base_model_class": "NotAClass", "parent_library": "transformers"}],
)
def test_auto_peft_model_without_task_never_imports_what_the_config_names(
    auto_mapping: dict | None, save_pair: Callable
) -> None:
    adapter, _ = save_pair("CAUSAL_LM", task_type=None)
    _edit_config(adapter, auto_mapping=auto_mapping)
    with pytest.raises(ConfigError, match="base model's class is unknown"):
        AutoPeftModel.from_pretrained(str(adapter))
    assert "deltatune_evil_module" not in sys.modules


def test_missing_base_model_name(save_pair: Callable) -> None:
    adapter, _ = save_pair("CAUSAL_LM")
    _edit_config(adapter, base_model_name_or_path=None)
    with pytest.raises(ConfigError, match="base_model_name_or_path is not set"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))


def test_base_without_config_json(tmp_path: Path, save_pair: Callable) -> None:
    adapter, _ = save_pair("CAUSAL_LM")
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    shutil.copytree(base, tmp_path / "base")
    (tmp_path / "base" / "config.json").unlink()
    _edit_config(adapter, base_model_name_or_path=str(tmp_path / "base"))
    with pytest.raises(ConfigError, match="has no config.json"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))


def test_base_that_does_not_exist(save_pair: Callable) -> None:
    adapter, _ = save_pair("CAUSAL_LM")
    _edit_config(adapter, base_model_name_or_path="/nonexistent/base")
    with pytest.raises(ConfigError, match="adapter_config.json names base model '/nonexistent/base'"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))


def _trains_only_the_adapter(model: PeftModel) -> bool:
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    return bool(trainable) and all(".deltas.default." in name for name in trainable)


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        ({"dtype": torch.float64}, lambda m, seen: m.get_base_model().dtype == torch.float64),
        ({"torch_dtype": torch.bfloat16}, lambda m, seen: m.get_base_model().dtype == torch.bfloat16),
        ({"device_map": "cpu"}, lambda m, seen: m.get_base_model().device.type == "cpu"),
        ({"attn_implementation": "eager"}, lambda m, seen: m.get_base_model().config._attn_implementation == "eager"),
        # shared by both loads: the base gets them as given
        ({"local_files_only": True, "token": False}, lambda m, seen: seen["local_files_only"] is True
         and seen["token"] is False),
        ({"is_trainable": True}, lambda m, seen: _trains_only_the_adapter(m)),
        ({"adapter_name": "mine"}, lambda m, seen: m.active_adapter == "mine" and list(m.peft_config) == ["mine"]),
    ],
)
def test_kwargs_routing(kwargs: dict, check: Callable, save_pair: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """``check(model, seen)`` gets the loaded model and the kwargs the base's ``from_pretrained`` received."""
    adapter, _ = save_pair("CAUSAL_LM")
    seen: dict = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **base_kwargs: Any):
        seen.update(base_kwargs)
        return original(*args, **base_kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), **kwargs)
    assert seen, "the base was not loaded through AutoModelForCausalLM.from_pretrained"
    assert check(model, seen)
    with torch.no_grad():
        model(**make_causal_lm_inputs(model))


def test_adapter_only_kwargs_do_not_reach_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save_pair: Callable
) -> None:
    adapter, _ = save_pair("CAUSAL_LM")
    (tmp_path / "nested").mkdir()
    adapter.rename(tmp_path / "nested" / "sub")
    seen: dict = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "nested"), subfolder="sub", safetensors_only=True,
                                             cache_dir=str(tmp_path / "cache"))
    assert "subfolder" not in seen and "safetensors_only" not in seen
    assert seen["trust_remote_code"] is False and seen["cache_dir"] == str(tmp_path / "cache")
    assert seen["revision"] is None


def test_explicit_config_overrides_the_file(save_pair: Callable) -> None:
    adapter, reference = save_pair("CAUSAL_LM")
    config = LoraConfig.from_pretrained(str(adapter))
    _edit_config(adapter, base_model_name_or_path="/nonexistent")
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), config=config)
    with torch.no_grad():
        torch.testing.assert_close(model(**make_causal_lm_inputs(model)).logits, reference)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".", "x\\y", "/abs"])
def test_bad_adapter_name_refused_before_loading(
    name: str, monkeypatch: pytest.MonkeyPatch, save_pair: Callable
) -> None:
    adapter, _ = save_pair("CAUSAL_LM")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _must_not_run)
    with pytest.raises(AdapterStateError, match="invalid adapter name"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter), adapter_name=name)


def test_auto_classes_are_not_instantiable() -> None:
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoPeftModelForCausalLM()


# --- check_remote_code: config.json read as data ------------------------------------------------------------------

def _config_dir(tmp: Path, **config: Any) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    return str(tmp)


CUSTOM_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}


def test_builtin_model_needs_no_code(tmp_path: Path) -> None:
    assert check_remote_code(_config_dir(tmp_path, model_type="llama"), "AutoModelForCausalLM") is None
    assert check_remote_code(_config_dir(tmp_path, model_type="llama"), "AutoModelForCausalLM", True) is None


def test_builtin_model_with_auto_map(tmp_path: Path) -> None:
    """transformers' own class is used without trust_remote_code; with it, the repo's code would run."""
    path = _config_dir(tmp_path, model_type="llama", auto_map={"AutoModelForCausalLM": "modeling_x.MyLlama"})
    assert check_remote_code(path, "AutoModelForCausalLM") is None
    code = check_remote_code(path, "AutoModelForCausalLM", trust_remote_code=True)
    assert code is not None and code.files == ["modeling_x.py"]


def test_custom_model_refused_with_full_explanation(tmp_path: Path) -> None:
    path = _config_dir(tmp_path / "m", model_type="xmodel", auto_map=CUSTOM_MAP)
    with pytest.raises(RemoteCodeError) as info:
        check_remote_code(path, "AutoModelForCausalLM")
    message = str(info.value)
    for part in ("needs custom code", "configuration_x.py", "modeling_x.py", str(tmp_path / "m"), "arbitrary code",
                 "trust_remote_code=True", "Review"):
        assert part in message
    assert isinstance(info.value, ConfigError)
    code = check_remote_code(path, "AutoModelForCausalLM", trust_remote_code=True)
    assert code.files == ["configuration_x.py", "modeling_x.py"]
    with pytest.raises(RemoteCodeError):  # only True opts in
        check_remote_code(path, "AutoModelForCausalLM", trust_remote_code="yes")  # type: ignore[arg-type]


def test_code_from_another_repo_is_named(tmp_path: Path) -> None:
    path = _config_dir(tmp_path, model_type="xmodel",
                       auto_map={"AutoConfig": "other/code--configuration_x.XConfig",
                                 "AutoModelForCausalLM": "other/code--modeling_x.XForCausalLM"})
    with pytest.raises(RemoteCodeError, match="hub repo 'other/code'"):
        check_remote_code(path, "AutoModelForCausalLM")


def test_custom_model_without_the_requested_class(tmp_path: Path) -> None:
    path = _config_dir(tmp_path, model_type="xmodel", auto_map=CUSTOM_MAP)
    with pytest.raises(ConfigError, match="cannot be loaded with transformers' AutoModelForSeq2SeqLM") as info:
        check_remote_code(path, "AutoModelForSeq2SeqLM", trust_remote_code=True)
    assert not isinstance(info.value, RemoteCodeError)


def test_unknown_model_type_without_auto_map(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not implemented by this transformers version"):
        check_remote_code(_config_dir(tmp_path, model_type="nonesuch"), "AutoModelForCausalLM")


def test_builtin_model_wrong_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not fit its base model"):
        check_remote_code(_config_dir(tmp_path, model_type="llama"), "AutoModelForSeq2SeqLM")


def test_remote_code_check_on_hub_repo(tmp_path: Path) -> None:
    commit = fake_commit("custom")
    write_snapshot(tmp_path, "org/custom", {"config.json": json.dumps(
        {"model_type": "xmodel", "auto_map": CUSTOM_MAP}).encode()}, commit=commit, refs=["main"])
    with pytest.raises(RemoteCodeError, match="(?s)hub repo 'org/custom' at revision 'main'.*pin revision="):
        check_remote_code("org/custom", "AutoModelForCausalLM", revision="main", cache_dir=str(tmp_path))
    with pytest.raises(RemoteCodeError) as info:
        check_remote_code("org/custom", "AutoModelForCausalLM", revision=commit, cache_dir=str(tmp_path))
    assert "pin revision" not in str(info.value)


def test_malformed_base_config(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="config.json"):
        check_remote_code(str(tmp_path), "AutoModelForCausalLM")


def test_adapter_saved_with_an_extended_tokenizer_resizes_the_base_embeddings(tmp_path: Path) -> None:
    # Training added tokens and resized the embeddings; the adapter travels with that tokenizer (as peft's users save
    # it), so loading resizes the base model to the tokenizer before the adapter's weights are put in.
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.train_utils import write_llama

    base_dir = write_llama(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_tokens(["<tool>", "</tool>"])
    base = LlamaForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "embed_tokens"],
                                            modules_to_save=["lm_head"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, len(tokenizer) - 2, 7, len(tokenizer) - 1]])  # includes both new tokens
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert loaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)

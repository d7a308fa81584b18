"""What loading refuses, and how: path-escaping adapter names, absurd safetensors headers, pickles that are not plain
weights, tensors of the wrong dtype or for another adapter, malformed JSON; and that a refused load leaves the base
model exactly as it was."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from deltatune import (
    AdapterLoadError,
    AdapterStateError,
    ConfigError,
    DeltatuneError,
    LoraConfig,
    PeftModel,
    TargetError,
    get_peft_model,
)
from deltatune.files import read_safetensors_header
from tests.models import make_causal_lm_inputs, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _save(tmp: Path, name: str = "adapter", **config) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, init_lora_weights=False, **config))
    model.save_pretrained(tmp / name)
    return tmp / name


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "module structure changed"
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _refused(tmp: Path, error: type[DeltatuneError], match: str, adapter: Path | None = None, **kwargs) -> str:
    """Load ``adapter`` onto a fresh base, expect ``error``, check the base is untouched; return the message."""
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(error, match=match) as info:
        PeftModel.from_pretrained(base, str(adapter or tmp / "adapter"), **kwargs)
    _assert_untouched(base, before)
    return str(info.value)


# --- adapter names never escape the save directory ----------------------------------------------------------------

BAD_NAMES = ["../evil", "..", ".", "a/b", "a\\b", "/abs", "", "x.y", "nul\0"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_by_from_pretrained_before_any_io(name: str) -> None:
    with pytest.raises(AdapterStateError, match="invalid adapter name"):
        PeftModel.from_pretrained(tiny_llama(), "/nonexistent/adapter", adapter_name=name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_by_load_adapter(tmp_path: Path, name: str) -> None:
    adapter = _save(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    with pytest.raises(AdapterStateError, match="invalid adapter name"):
        model.load_adapter(str(adapter), adapter_name=name)
    assert list(model.peft_config) == ["default"]


def test_save_refuses_names_that_escape(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    model.peft_config["../escaped"] = model.peft_config["default"]  # bypassing add_adapter's check on purpose
    with pytest.raises(AdapterStateError, match="invalid adapter name"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["default", "../escaped"])
    assert not (tmp_path / "escaped").exists()


def test_save_refuses_symlinked_subfolder_pointing_outside(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    model.add_adapter("other", LoraConfig(target_modules=TARGETS))
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "other")
    with pytest.raises(AdapterStateError, match="outside"):
        model.save_pretrained(tmp_path / "out")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_non_default_adapters_saved_in_their_subfolder(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    model.add_adapter("other", LoraConfig(target_modules=["o_proj"]))
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "other" / "adapter_model.safetensors").is_file()


# --- safetensors headers --------------------------------------------------------------------------------------------

def _forbid_safetensors_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("safetensors must not be parsed after the header was refused")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)


@pytest.mark.parametrize("claimed", [2**64 - 1, 2**63, 2**40, "size+1", 0])
def test_absurd_header_length_refused_before_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claimed: int | str
) -> None:
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    length = len(data) - 8 + 1 if claimed == "size+1" else claimed
    path.write_bytes(struct.pack("<Q", length) + data[8:])
    if claimed != 0:
        _forbid_safetensors_load(monkeypatch)
    message = _refused(tmp_path, AdapterLoadError, "safetensors")
    assert str(path) in message


def test_header_over_the_limit_refused_without_reading_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A (sparse) 101 MiB file whose header claims 101 MiB: the limit refuses it from the first 8 bytes."""
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    length = 101 * 1024 * 1024
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", length))
        fh.truncate(8 + length)
    _forbid_safetensors_load(monkeypatch)
    _refused(tmp_path, AdapterLoadError, "corrupt safetensors header")


@pytest.mark.parametrize(
    "header",
    [
        b"[]",
        b"not json",
        b"\xff\xfe{}",
        json.dumps({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 10**9]}}).encode(),
        json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}).encode(),
        json.dumps({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"x": "F32"}).encode(),
        json.dumps({"__metadata__": {"format": 1}}).encode(),
        b"[" * 100_000,
    ],
)
def test_malformed_headers(tmp_path: Path, header: bytes) -> None:
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(AdapterLoadError, match="corrupt safetensors") as info:
        read_safetensors_header(str(path))
    assert str(path) in str(info.value)
    _refused(tmp_path, AdapterLoadError, "safetensors")


# --- pickles ----------------------------------------------------------------------------------------------------------

_PWNED: list[str] = []


def _pwn() -> dict:
    _PWNED.append("code ran")
    return {}


class _Evil:
    def __reduce__(self):
        return (_pwn, ())


def _as_bin(adapter: Path, obj: object) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    (adapter / "adapter_model.bin").write_bytes(buffer.getvalue())


def test_bin_adapter_loads_weights_only(tmp_path: Path) -> None:
    adapter = _save(tmp_path)
    reference = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    _as_bin(adapter, load_file(str(adapter / "adapter_model.safetensors")))
    model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    inputs = make_causal_lm_inputs(model)
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    adapter = _save(tmp_path)
    _as_bin(adapter, {"x": _Evil()})
    _PWNED.clear()
    message = _refused(tmp_path, AdapterLoadError, "weights-only pickle")
    assert not _PWNED
    assert "adapter_model.bin" in message


@pytest.mark.parametrize("payload", [[torch.zeros(1)], {"a": 1}, {1: torch.zeros(1)}])
def test_bin_that_is_not_a_dict_of_tensors(tmp_path: Path, payload: object) -> None:
    adapter = _save(tmp_path)
    _as_bin(adapter, payload)
    _refused(tmp_path, AdapterLoadError, "dict of tensors")


def test_safetensors_only_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _save(tmp_path)
    _as_bin(adapter, load_file(str(adapter / "adapter_model.safetensors")))

    def boom(*args, **kwargs):
        raise AssertionError("torch.load must not be called with safetensors_only=True")

    monkeypatch.setattr(torch, "load", boom)
    _refused(tmp_path, AdapterLoadError, "safetensors_only=True", safetensors_only=True)


# --- tensors that do not belong ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_non_float_tensors_for_float_parameters(tmp_path: Path, dtype: torch.dtype) -> None:
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(path))
    message = _refused(tmp_path, AdapterLoadError, "floating-point")
    assert str(path) in message and key.removeprefix("base_model.model.") in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_converted(tmp_path: Path, dtype: torch.dtype) -> None:
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.deltas["default"].lora_A.weight
    assert lora_a.dtype == torch.float32
    torch.testing.assert_close(
        lora_a, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float(), rtol=0, atol=0
    )


def test_key_addressing_another_adapter_is_refused(tmp_path: Path) -> None:
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key.replace("q_proj.", "q_proj.deltas.default.")] = torch.zeros_like(tensors.pop(key))
    save_file(tensors, str(tmp_path / "evil.safetensors"))
    model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    before = _state(model)
    (adapter / "adapter_model.safetensors").write_bytes((tmp_path / "evil.safetensors").read_bytes())
    with pytest.raises(AdapterLoadError, match="do not fit"):
        model.load_adapter(str(adapter), adapter_name="second")
    assert list(model.peft_config) == ["default"]
    _assert_untouched(model, before)


def test_a_shared_tensor_saved_under_two_paths_with_different_values_is_refused(tmp_path: Path) -> None:
    # Lily's down-projection is one tensor for layers 0 and 1 (stride_A=2); peft writes it under both layers' paths
    from deltatune import LilyConfig

    config = LilyConfig(target_modules=["q_proj"], r=4, stride_A=2, init_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lily_A.weight"
    assert torch.equal(tensors[key], tensors[key.replace("layers.1", "layers.0")])
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(path))
    model = get_peft_model(tiny_llama(), config, adapter_name="kept")
    before = _state(model)
    with pytest.raises(AdapterLoadError, match="are one shared tensor of the adapter but hold different values"):
        model.load_adapter(str(tmp_path), adapter_name="second")
    assert list(model.peft_config) == ["kept"]
    _assert_untouched(model, before)


# --- adapter_config.json --------------------------------------------------------------------------------------------

def _write_config(adapter: Path, **changes) -> Path:
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"r": "4"}, "field 'r' must be of type int"),
        ({"r": True}, "field 'r' must be of type int"),
        ({"lora_alpha": "16"}, "field 'lora_alpha' must be of type float"),
        ({"lora_dropout": None}, "lora_dropout"),
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": ["q_proj", 1]}, "target_modules"),
        ({"target_modules": "(("}, "not a valid regular expression"),
        ({"rank_pattern": {"((": 2}}, "not a valid regular expression"),
        ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"task_type": "NOT_A_TASK"}, "task_type"),
        ({"peft_type": "NOT_A_METHOD"}, "peft_type"),
        ({"peft_type": 7}, "peft_type"),
        ({"base_model_name_or_path": 5}, "base_model_name_or_path"),
        ({"lora_dropout": float("nan")}, "lora_dropout"),
    ],
)
def test_config_values_of_the_wrong_type(tmp_path: Path, changes: dict, match: str) -> None:
    path = _write_config(_save(tmp_path), **changes)
    message = _refused(tmp_path, ConfigError, match)
    assert str(path) in message


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[1, 2]", b"null", b"\xff\xfe\x00", b"[" * 100_000 + b"]" * 100_000, b'{"r": 1' + b"0" * 5000 + b"}"],
)
def test_unreadable_config_files(tmp_path: Path, content: bytes) -> None:
    adapter = _save(tmp_path)
    (adapter / "adapter_config.json").write_bytes(content)
    message = _refused(tmp_path, ConfigError, "adapter_config.json")
    assert str(adapter / "adapter_config.json") in message


def test_oversized_config_is_not_read(tmp_path: Path) -> None:
    adapter = _save(tmp_path)
    with open(adapter / "adapter_config.json", "r+b") as fh:
        fh.truncate(17 * 1024 * 1024)  # sparse: cheap to create, must not be parsed
    _refused(tmp_path, ConfigError, "too large")


def test_target_errors_name_the_config_file(tmp_path: Path) -> None:
    path = _write_config(_save(tmp_path), target_modules=["no_such_module"])
    message = _refused(tmp_path, TargetError, "no_such_module")
    assert str(path) in message


def test_missing_and_extra_keys(tmp_path: Path) -> None:
    adapter = _save(tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file(dict(list(tensors.items())[1:]), str(path))
    assert str(path) in _refused(tmp_path, AdapterLoadError, "lacks")
    save_file({**tensors, "base_model.model.junk.weight": torch.zeros(1)}, str(path))
    assert str(path) in _refused(tmp_path, AdapterLoadError, "do not fit this model")


# --- initialisations that rewrite base weights -------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_failed_load_of_weight_rewriting_init_restores_the_base(tmp_path: Path, init: str) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, init_lora_weights=init, r=2))
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file(dict(list(tensors.items())[:-1]), str(path))
    _refused(tmp_path, AdapterLoadError, "lacks")


@pytest.mark.parametrize("changes", [{"r": 100_000_000}, {"rank_pattern": {"q_proj": 2**30}}])
def test_config_asking_for_more_parameters_than_the_file_holds(tmp_path: Path, changes: dict) -> None:
    """A huge rank in the config is refused from a meta-device dry run, before anything is allocated."""
    _write_config(_save(tmp_path), **changes)
    message = _refused(tmp_path, AdapterLoadError, "describes an adapter of .* parameters but .* holds only")
    assert "adapter_model.safetensors" in message and "adapter_config.json" in message


def test_small_rank_mismatch_gets_the_precise_message(tmp_path: Path) -> None:
    _write_config(_save(tmp_path), r=5)
    _refused(tmp_path, AdapterLoadError, r"shape mismatch .*saved \[8, 32\], model has \[5, 32\]")


@pytest.mark.parametrize("changes", [{"r": 10**30}, {"r": 0}, {"rank_pattern": {"q_proj": 0}}])
def test_absurd_ranks_are_config_errors(tmp_path: Path, changes: dict) -> None:
    _write_config(_save(tmp_path), **changes)
    _refused(tmp_path, ConfigError, "positive integer")


def test_configs_written_by_peft_pass_the_type_check(tmp_path: Path) -> None:
    """The JSON type check must accept every field the way peft writes it (peft is the oracle here)."""
    peft = pytest.importorskip("peft")
    from deltatune import PeftConfig

    configs = [
        peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]),
        peft.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True, rank_pattern={"q_proj": 2},
                        alpha_pattern={"v_proj": 3.5}, layers_to_transform=[0], layers_pattern="layers",
                        modules_to_save=["lm_head"], exclude_modules=["k_proj"]),
        peft.LoraConfig(target_modules="all-linear"),
        peft.LoraConfig(target_modules=".*q_proj", use_rslora=True, init_lora_weights="gaussian", bias="lora_only",
                        lora_dropout=0.1),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    ]
    for i, config in enumerate(configs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / str(i))
            loaded = PeftConfig.from_pretrained(str(tmp_path / str(i)))
        assert loaded.peft_type.value == config.peft_type.value


# --- method-specific config fields (found by tests/test_fuzz_loading.py) -------------------------------------------

def _save_method(tmp: Path, config) -> Path:
    torch.manual_seed(0)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp / "adapter")
    return tmp / "adapter"


@pytest.mark.parametrize("key", [10**30, -(10**30), 2**64])
def test_vera_prng_key_outside_the_seed_range_is_a_config_error(tmp_path: Path, key: int) -> None:
    """torch.Generator.manual_seed raised a bare ValueError ("Overflow when unpacking long long") for such keys."""
    from deltatune import VeraConfig

    _write_config(_save_method(tmp_path, VeraConfig(target_modules=TARGETS, r=8, init_weights=False)),
                  projection_prng_key=key)
    _refused(tmp_path, ConfigError, r"projection_prng_key must be an integer in \[-2\*\*63, 2\*\*64\)")


@pytest.mark.parametrize("terms", [1025, 10**9, 10**30])
def test_oft_neumann_terms_are_bounded(tmp_path: Path, terms: int) -> None:
    """A huge num_cayley_neumann_terms loaded fine and then made every forward loop (practically) forever."""
    from deltatune import OFTConfig

    _write_config(_save_method(tmp_path, OFTConfig(target_modules=TARGETS, r=0, oft_block_size=8, init_weights=False)),
                  num_cayley_neumann_terms=terms)
    _refused(tmp_path, ConfigError, r"num_cayley_neumann_terms must be an integer in \[2, 1024\]")


@pytest.mark.parametrize("init_r", [2**20, 2**31 - 1])
def test_adalora_absurd_init_r_is_refused_before_any_allocation(tmp_path: Path, init_r: int) -> None:
    """A fresh AdaLoRA delta used to build an init_r-long mask on the CPU first (2 GB for 2**31), so the dry run on
    the meta device could not size it and the real build ran for minutes."""
    from deltatune import AdaLoraConfig

    _write_config(_save_method(tmp_path, AdaLoraConfig(target_modules=TARGETS, init_r=4, total_step=5)),
                  init_r=init_r)
    _refused(tmp_path, AdapterLoadError, "describes an adapter of .* parameters .* Nothing was allocated")


@pytest.mark.parametrize(
    ("method", "changes", "match"),
    [
        ("lora", {"lora_alpha": 1e308}, "lora_alpha must be a finite number"),
        ("lora", {"lora_alpha": 1e39, "use_rslora": True}, "lora_alpha must be a finite number"),
        ("lora", {"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ("lora", {"alpha_pattern": {"q_proj": 1e300}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
        ("bottleneck", {"scaling": 1e308}, "scaling must be a finite number"),
        ("lokr", {"alpha": 1e308}, "alpha must be a finite number"),
        ("adalora", {"orth_reg_weight": float("nan")}, "orth_reg_weight must be a finite number"),
        ("vera", {"d_initial": float("inf")}, "d_initial must be a finite number"),
    ],
)
def test_scales_beyond_float32_are_config_errors(tmp_path: Path, method: str, changes: dict, match: str) -> None:
    """torch refuses to apply a factor beyond float32's range to a float32 tensor (``RuntimeError: value cannot be
    converted to type float without overflow``, in the forward after a successful load)."""
    import deltatune as dt

    configs = {
        "bottleneck": lambda: dt.BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4),
        "lokr": lambda: dt.LoKrConfig(target_modules=TARGETS, r=2),
        "adalora": lambda: dt.AdaLoraConfig(target_modules=TARGETS, init_r=4, total_step=5),
        "vera": lambda: dt.VeraConfig(target_modules=TARGETS, r=8),
    }
    if method == "lora":
        _save(tmp_path)
    else:
        _save_method(tmp_path, configs[method]())
    _write_config(tmp_path / "adapter", **changes)
    _refused(tmp_path, ConfigError, match)


def test_prompt_table_larger_than_the_file_is_refused_before_allocation(tmp_path: Path) -> None:
    """token_dim=2**31 made loading allocate a 24 GiB prompt table (RuntimeError from the allocator)."""
    from deltatune import PromptTuningConfig

    _write_config(_save_method(tmp_path, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
                  token_dim=2**31)
    message = _refused(tmp_path, AdapterLoadError, "describes an adapter of .* parameters but .* holds only")
    assert "adapter_model.safetensors" in message and "adapter_config.json" in message


def test_prompt_token_dim_must_match_the_word_embeddings(tmp_path: Path) -> None:
    """A table as wide as its config says but not as wide as the model's embeddings loaded, then failed in forward."""
    from deltatune import PromptTuningConfig

    adapter = _save_method(tmp_path, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    _write_config(adapter, token_dim=64)
    save_file({"prompt_embeddings": torch.randn(3, 64)}, str(adapter / "adapter_model.safetensors"))
    _refused(tmp_path, ConfigError, "token_dim=64 differs from the width 32 of .*word embeddings")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"encoder_hidden_size": 10**12}, ConfigError, "encoder_hidden_size must be a positive integer of at most"),
        ({"encoder_num_layers": 10**9}, ConfigError, "encoder_num_layers must be a positive integer of at most"),
        ({"encoder_hidden_size": 2**20}, AdapterLoadError, "encoder it describes has .* more than the base model"),
    ],
)
def test_trainable_p_tuning_encoder_size_is_bounded(tmp_path: Path, changes: dict, error: type, match: str) -> None:
    """A trainable load builds the encoder first: encoder_hidden_size=10**12 failed in the allocator."""
    from deltatune import PromptEncoderConfig

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_hidden_size=16)
    _write_config(_save_method(tmp_path, config), **changes)
    _refused(tmp_path, error, match, is_trainable=True)


# --- a bad adapter loaded into a model that already has adapters ----------------------------------------------------

def _truncate_config(adapter: Path) -> None:
    path = adapter / "adapter_config.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _drop_a_tensor(adapter: Path) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(adapter / "adapter_model.safetensors"))


def _weights_of_another_config(adapter: Path) -> None:
    other = _save(adapter.parent, "other", r=2, lora_alpha=4)
    (adapter / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes())


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        pytest.param(_truncate_config, ConfigError, "adapter_config.json: not a readable JSON", id="truncated-config"),
        pytest.param(lambda a: _write_config(a, r=4), AdapterLoadError, "shape mismatch", id="mismatched-r"),
        pytest.param(lambda a: _write_config(a, peft_type="NOT_A_METHOD"), ConfigError, "peft_type",
                     id="unknown-peft-type"),
        pytest.param(_drop_a_tensor, AdapterLoadError, "adapter_model.safetensors", id="missing-tensor"),
        pytest.param(_weights_of_another_config, AdapterLoadError, "adapter_model.safetensors",
                     id="weights-of-another-config"),
        pytest.param(lambda a: (a / "adapter_model.safetensors").write_bytes(
            (a / "adapter_model.safetensors").read_bytes()[:-7]), AdapterLoadError, "adapter_model.safetensors",
            id="truncated-weights"),
    ],
)
def test_a_bad_adapter_leaves_a_model_with_adapters_computing_as_before(tmp_path: Path, corrupt, error, match) -> None:
    """load_adapter into a model holding two adapters: one clear error naming the file, and every existing adapter
    (alone, combined, disabled) computes exactly what it computed before."""
    _save(tmp_path, "first")
    _save(tmp_path, "second", r=4, lora_alpha=3)
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "first")).eval()
    model.load_adapter(str(tmp_path / "second"), "second")
    batch = make_causal_lm_inputs(model)

    def outputs() -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for names in (["default"], ["second"], ["default", "second"]):
                model.set_adapter(names)
                out["+".join(names)] = model(**batch).logits
            with model.disable_adapter():
                out["base"] = model(**batch).logits
        model.set_adapter("default")
        return out

    expected, before = outputs(), _state(model)
    bad = _save(tmp_path, "bad", r=8)
    corrupt(bad)
    with pytest.raises(error, match=match) as info:
        model.load_adapter(str(bad), "third")
    assert str(bad) in str(info.value)  # the message names the file
    assert list(model.peft_config) == ["default", "second"]
    _assert_untouched(model, before)
    for key, value in outputs().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

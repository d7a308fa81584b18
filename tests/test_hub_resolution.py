"""Adapters (and base models) resolved from a hub repo id through huggingface_hub's own cache code, offline.

A real cache layout (``models--org--name/{blobs,refs,snapshots,.no_exist}``) is written into a temporary directory;
``HF_HUB_OFFLINE=1`` (set in conftest) makes ``hf_hub_download`` resolve branches, tags, commits and sub-folders from
it exactly as it would after a download. Nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

from deltatune import (
    AdapterLoadError,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    ConfigError,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
)
from deltatune.files import cached_snapshot
from deltatune.cli import main
from tests.hubcache import directory_files, fake_commit, write_snapshot
from tests.models import make_causal_lm_inputs, tiny_llama

ADAPTER_REPO = "org/adapter"
BASE_REPO = "org/base"
BIN_REPO = "org/bin-adapter"
C_V1, C_MAIN = fake_commit("adapter-v1"), fake_commit("adapter-main")
B_PINNED, B_MAIN = fake_commit("base-pinned"), fake_commit("base-main")


def _adapter(tmp: Path, name: str, seed: int, base_seed: int = 0, **config) -> tuple[Path, torch.Tensor]:
    """Save a non-zero LoRA adapter trained on ``tiny_llama(base_seed)``; return its directory and reference logits."""
    torch.manual_seed(seed)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, base_model_name_or_path=BASE_REPO,
                     revision=B_PINNED, **config)
    model = get_peft_model(tiny_llama(base_seed), cfg)
    with torch.no_grad():
        logits = model(**make_causal_lm_inputs(model)).logits
    model.save_pretrained(tmp / name)
    return tmp / name, logits


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One cache with: org/adapter (tag v1 -> C_V1; main -> C_MAIN with a 'sub' adapter), org/base (main -> B_MAIN,
    the adapters pin B_PINNED), and a pickle-only org/bin-adapter."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "cache"
    v1_dir, v1_logits = _adapter(tmp, "v1", seed=1, target_modules=["q_proj", "v_proj"])
    main_dir, main_logits = _adapter(tmp, "main", seed=2, target_modules=["q_proj", "v_proj"])
    sub_dir, sub_logits = _adapter(tmp, "sub", seed=3, target_modules=["o_proj"], r=2)
    write_snapshot(cache, ADAPTER_REPO, directory_files(v1_dir), commit=C_V1, refs=["v1"])
    write_snapshot(cache, ADAPTER_REPO, {**directory_files(main_dir), **directory_files(sub_dir, "sub/")},
                   commit=C_MAIN, refs=["main"])
    for seed, commit, refs in ((0, B_PINNED, ["trained-on"]), (1, B_MAIN, ["main"])):
        tiny_llama(seed).save_pretrained(tmp / f"base{seed}")
        write_snapshot(cache, BASE_REPO, directory_files(tmp / f"base{seed}"), commit=commit, refs=refs)
    # A pickle-only adapter as huggingface_hub caches it after an online download: the failed safetensors lookup
    # left a .no_exist marker.
    tensors = load_file(str(v1_dir / "adapter_model.safetensors"))
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    bin_commit = fake_commit("bin")
    write_snapshot(
        cache, BIN_REPO,
        {"adapter_config.json": (v1_dir / "adapter_config.json").read_bytes(), "adapter_model.bin": buffer.getvalue()},
        commit=bin_commit, missing=["adapter_model.safetensors"],
    )
    return {"cache": str(cache), "v1": v1_logits, "main": main_logits, "sub": sub_logits, "bin_commit": bin_commit}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_causal_lm_inputs(model)).logits


def test_offline_mode_is_on() -> None:
    assert huggingface_hub.constants.HF_HUB_OFFLINE


@pytest.mark.parametrize(
    ("revision", "expected"), [("v1", "v1"), (C_V1, "v1"), (None, "main"), ("main", "main"), (C_MAIN, "main")]
)
def test_revision_resolves_tag_branch_and_commit(hub: dict, revision: str | None, expected: str) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, revision=revision, cache_dir=hub["cache"])
    assert isinstance(model, PeftModelForCausalLM)
    torch.testing.assert_close(_logits(model), hub[expected], rtol=0, atol=0)


def test_subfolder(hub: dict) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, subfolder="sub", cache_dir=hub["cache"])
    assert model.peft_config["default"].target_modules == ["o_proj"]
    torch.testing.assert_close(_logits(model), hub["sub"], rtol=0, atol=0)


def test_subfolder_missing_at_other_revision(hub: dict) -> None:
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, revision="v1", subfolder="sub", cache_dir=hub["cache"])


def test_default_cache_from_hub_constants(hub: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cache_dir, resolution uses huggingface_hub's configured cache (HF_HUB_CACHE)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub["cache"])
    monkeypatch.setenv("HF_HUB_CACHE", hub["cache"])
    model = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, revision="v1")
    torch.testing.assert_close(_logits(model), hub["v1"], rtol=0, atol=0)
    assert cached_snapshot(ADAPTER_REPO, "v1").endswith(C_V1)


def test_load_adapter_with_revision(hub: dict) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, revision="main", cache_dir=hub["cache"])
    model.load_adapter(ADAPTER_REPO, adapter_name="old", revision="v1", cache_dir=hub["cache"])
    model.set_adapter("old")
    torch.testing.assert_close(_logits(model), hub["v1"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("repo", "revision"), [(ADAPTER_REPO, "v9"), (ADAPTER_REPO, fake_commit("nope")), ("org/absent", None)]
)
def test_uncached_revision_or_repo_is_a_clear_error(hub: dict, repo: str, revision: str | None) -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="not in the local Hugging Face cache"):
        PeftModel.from_pretrained(base, repo, revision=revision, cache_dir=hub["cache"])
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])


def test_invalid_repo_id(hub: dict) -> None:
    with pytest.raises(AdapterLoadError, match="neither an existing directory nor a valid hub repo id"):
        PeftModel.from_pretrained(tiny_llama(), "not a/valid//id", cache_dir=hub["cache"])


def test_pickle_only_repo_uses_no_exist_marker(hub: dict) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), BIN_REPO, cache_dir=hub["cache"])
    torch.testing.assert_close(_logits(model), hub["v1"], rtol=0, atol=0)
    with pytest.raises(AdapterLoadError, match="safetensors_only"):
        PeftModel.from_pretrained(tiny_llama(), BIN_REPO, cache_dir=hub["cache"], safetensors_only=True)


@pytest.mark.parametrize("auto_cls", [AutoPeftModelForCausalLM, AutoPeftModel])
def test_auto_model_loads_pinned_base_from_hub_cache(hub: dict, auto_cls: type) -> None:
    """The adapter (tag v1) names org/base pinned to a commit that is not main: the pinned base is loaded."""
    model = auto_cls.from_pretrained(ADAPTER_REPO, revision="v1", cache_dir=hub["cache"])
    assert isinstance(model, PeftModelForCausalLM)
    # from_pretrained picks its own attention kernel (sdpa), so outputs agree to float rounding, not bit for bit.
    torch.testing.assert_close(_logits(model), hub["v1"], rtol=1e-4, atol=1e-5)
    base_weights = model.get_base_model().model.embed_tokens.weight
    torch.testing.assert_close(base_weights, tiny_llama(0).model.embed_tokens.weight, rtol=0, atol=0)
    assert not torch.equal(base_weights, tiny_llama(1).model.embed_tokens.weight)


def test_auto_model_subfolder_and_commit(hub: dict) -> None:
    model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_REPO, revision=C_MAIN, subfolder="sub",
                                                     cache_dir=hub["cache"])
    torch.testing.assert_close(_logits(model), hub["sub"], rtol=1e-4, atol=1e-5)


def test_auto_model_uncached_base_revision(hub: dict, tmp_path: Path) -> None:
    """A base revision missing from the cache fails in the remote-code check, before transformers runs."""
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=BASE_REPO,
                                                    revision="v-missing"))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match="config.json"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"), cache_dir=hub["cache"])


def test_inspect_hub_repo(hub: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub["cache"])
    assert main(["inspect", ADAPTER_REPO, "--revision", "main", "--subfolder", "sub"]) == 0
    out = capsys.readouterr().out
    assert "o_proj" in out and "rank:" in out and f"{BASE_REPO} (revision {B_PINNED})" in out
    assert os.path.join("snapshots", C_MAIN, "sub") in out
    assert main(["inspect", BIN_REPO]) == 0
    assert "weights not inspected" in capsys.readouterr().out


def test_config_revision_field_roundtrip(hub: dict) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, revision="v1", cache_dir=hub["cache"])
    config = model.peft_config["default"]
    assert (config.base_model_name_or_path, config.revision) == (BASE_REPO, B_PINNED)
    assert dataclasses.replace(config).revision == B_PINNED

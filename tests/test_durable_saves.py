"""Saves are atomic per directory, not per file: SIGKILL a process that saves versions in a loop, many times, at
random moments, and check that the directory always holds exactly one saved version (config *and* weights, of every
adapter saved together) that loads.

The saving process is forked from the test process (deltatune and torch already imported), so each kill costs
milliseconds and a few dozen of them fit the default suite; the long variant is ``-m slow``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import files
from tests.models import tiny_mlp

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _model() -> dt.PeftModel:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["lin1"]))
    return model


def _save_version(model: dt.PeftModel, target: Path, version: int) -> None:
    """Version ``v``: every LoRA tensor of both adapters filled with ``v``, ``lora_alpha = v + 1`` in both configs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.fill_(float(version))
    for config in model.peft_config.values():
        config.lora_alpha = float(version + 1)
    model.save_pretrained(target)


def _version_of(directory: Path) -> int:
    """The one version ``directory`` holds; fails if its config and weights come from different versions."""
    alpha = json.loads((directory / CONFIG).read_text())["lora_alpha"]
    values = {float(v) for t in load_file(directory / WEIGHTS).values() for v in t.unique()}
    assert len(values) == 1, f"{directory}: weights of several versions {sorted(values)}"
    version = int(values.pop())
    assert alpha == version + 1, f"{directory}: config of version {alpha - 1}, weights of version {version}"
    return version


def _saving_child(target: Path, start: int, no_exchange: bool) -> int:
    """Fork a process that saves versions ``start``, ``start + 1``, ... into ``target`` until it is killed; returns
    once the child is ready to save."""
    ready, tell = os.pipe()
    pid = os.fork()
    if pid:
        os.close(tell)
        os.read(ready, 1)
        os.close(ready)
        return pid
    try:  # the child: never returns into pytest
        os.close(ready)
        if no_exchange:
            files._exchange = lambda a, b: False
        model = _model()
        os.write(tell, b"1")
        version = start
        while True:
            _save_version(model, target, version)
            version += 1
    finally:
        os._exit(1)


def _kill_loop(tmp_path: Path, kills: int, no_exchange: bool, seed: int) -> None:
    rng = random.Random(seed)
    target = tmp_path / "adapter"
    started = time.perf_counter()
    _save_version(_model(), target, 0)
    save_time = time.perf_counter() - started  # kills land anywhere within about three saves
    seen, newest = set(), 0
    for _ in range(kills):
        pid = _saving_child(target, newest + 1, no_exchange)
        time.sleep(rng.uniform(0.0, 3 * save_time))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if no_exchange:  # two renames: a kill between them leaves the directory absent until the next save repairs
            files.recover_directory(target)
        top, other = _version_of(target), _version_of(target / "other")
        assert top == other, f"the two adapters saved together hold versions {top} and {other}"
        assert top >= newest, f"version {top} went back from {newest}"
        loaded = dt.PeftModel.from_pretrained(tiny_mlp(), target)
        assert loaded.peft_config["default"].lora_alpha == top + 1
        loaded.load_adapter(target / "other", "other")
        seen.add(top)
        newest = top
    assert len(seen) > 3, f"the kills hit too few distinct versions ({sorted(seen)})"
    # The next save cleans whatever the kills left beside the directory.
    _save_version(_model(), target, newest + 1)
    assert _version_of(target) == newest + 1
    assert not [n for n in os.listdir(tmp_path) if files._SAVE_MARK in n]


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two-renames"])
def test_save_killed_at_random_moments_leaves_exactly_one_version(tmp_path: Path, no_exchange: bool) -> None:
    _kill_loop(tmp_path, kills=25, no_exchange=no_exchange, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two-renames"])
def test_save_killed_hundreds_of_times_leaves_exactly_one_version(tmp_path: Path, no_exchange: bool) -> None:
    _kill_loop(tmp_path, kills=400, no_exchange=no_exchange, seed=2)


# --- what a save keeps, drops and repairs ------------------------------------------------------------------------

def test_a_save_keeps_foreign_entries_and_drops_the_adapters_old_files(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    (target / "tokenizer").mkdir(parents=True)
    (target / "tokenizer" / "vocab.txt").write_text("a b c")
    (target / "README.md").write_text("notes")
    (target / "adapter_model.bin").write_bytes(b"an older pickled version")
    (target / "link").symlink_to("README.md")
    (target / "old_adapter").mkdir()
    (target / "old_adapter" / CONFIG).write_text("{}")
    os.chmod(target, 0o750)
    _save_version(_model(), target, 3)
    assert sorted(os.listdir(target)) == sorted(
        [CONFIG, WEIGHTS, "README.md", "link", "old_adapter", "other", "tokenizer"]
    )
    assert (target / "tokenizer" / "vocab.txt").read_text() == "a b c" and os.readlink(target / "link") == "README.md"
    assert (target / "old_adapter" / CONFIG).read_text() == "{}"
    assert _version_of(target) == _version_of(target / "other") == 3
    assert os.stat(target).st_mode & 0o777 == 0o750


def test_saving_into_the_current_directory_follows_it(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "adapter"
    _save_version(_model(), target, 1)
    monkeypatch.chdir(target)
    _save_version(_model(), Path("."), 2)
    assert os.path.samefile(os.getcwd(), target) and _version_of(Path(".")) == 2


def test_a_save_interrupted_between_the_two_renames_is_repaired_and_named_by_a_load(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    _save_version(_model(), target, 1)
    _save_version(_model(), tmp_path / "staged", 2)
    # What a kill between the fallback's two renames leaves: the old version retired, the new one staged, no target.
    os.rename(target, tmp_path / f".adapter{files._SAVE_MARK}old-999999999-x")
    os.rename(tmp_path / "staged", tmp_path / f".adapter{files._SAVE_MARK}new-999999999-x")
    with pytest.raises(dt.AdapterLoadError, match="a save into it was interrupted"):
        dt.PeftModel.from_pretrained(tiny_mlp(), target)
    files.recover_directory(target)
    assert _version_of(target) == 2 and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_load_racing_a_save_reads_config_and_weights_of_one_version(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "adapter"
    _save_version(_model(), target, 1)
    real = files.read_weights
    swaps = iter([2])

    def read_weights_during_a_save(*args, **kwargs):
        for version in swaps:  # a save lands between the config read and the weights read, once
            _save_version(_model(), target, version)
        return real(*args, **kwargs)

    monkeypatch.setattr("deltatune.model.read_weights", read_weights_during_a_save)
    loaded = dt.PeftModel.from_pretrained(tiny_mlp(), target)
    assert loaded.peft_config["default"].lora_alpha == 3.0
    lora_a = next(p for n, p in loaded.named_parameters() if "lora_A" in n)
    assert torch.all(lora_a == 2.0)

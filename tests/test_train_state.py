"""Run directories and checkpoints: atomic, pruned, and refusing to mix runs."""

from __future__ import annotations

import json
import random

import pytest
import torch

from deltatune.train.metrics import MetricsLog, read_metrics, summary_table
from deltatune.train.options import TrainError, TrainOptions
from deltatune.train.state import (
    TrainerState,
    capture_rng,
    check_run_dir,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_run,
)


def _save(directory, step, keep=2, train_state=None):
    return save_checkpoint(
        str(directory), TrainerState(step=step, tokens=10 * step), '{"peft_type": "LORA"}\n',
        {"base_model.model.x.lora_A.weight": torch.full((2, 2), float(step))},
        {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, {"last_epoch": step}, [capture_rng()], keep,
        train_state,
    )


def test_checkpoint_round_trip_and_pruning(tmp_path):
    kept = torch.tensor([True, False, True])
    for step in (5, 10, 15):
        _save(tmp_path, step, train_state={"base_model.model.x.kept": kept} if step == 15 else None)
    assert not (tmp_path / "checkpoints" / "step-000010" / "train_state.safetensors").exists()  # none: no file
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step-000010", "step-000015"]
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert ckpt["state"].step == 15 and ckpt["state"].tokens == 150
    assert torch.equal(ckpt["adapter"]["base_model.model.x.lora_A.weight"], torch.full((2, 2), 15.0))
    assert ckpt["scheduler"] == {"last_epoch": 15} and len(ckpt["rng"]) == 1
    assert ckpt["config"] == {"peft_type": "LORA"}
    assert ckpt["train_state"].keys() == {"base_model.model.x.kept"}
    assert torch.equal(ckpt["train_state"]["base_model.model.x.kept"], kept)
    assert load_checkpoint(str(tmp_path / "checkpoints" / "step-000010"))["train_state"] == {}


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
    _save(tmp_path, 5)
    stale = tmp_path / "checkpoints" / "step-000010"
    stale.mkdir()
    (stale / ".tmp-abc").write_bytes(b"partial")
    assert latest_checkpoint(str(tmp_path)).endswith("step-000005")  # LATEST never moved to the partial one
    _save(tmp_path, 7)
    assert not stale.exists()


def test_rng_states_restore_exactly():
    state = capture_rng()
    expected = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    restore_rng(state)
    again = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    assert expected[0] == again[0] and torch.equal(expected[1], again[1]) and expected[2] == again[2]


def test_check_run_dir(tmp_path):
    options = TrainOptions(model="m", data="d", out=str(tmp_path / "run"))
    assert check_run_dir(options) is None  # new directory
    write_run(options.out, options, {})
    with pytest.raises(TrainError, match="already holds this run \\(no checkpoint yet\\)"):
        check_run_dir(options)
    other = TrainOptions(model="m", data="d", lr=1.0, epochs=9, out=options.out)
    with pytest.raises(TrainError, match="differs in --epochs, --lr"):
        check_run_dir(other)
    assert check_run_dir(TrainOptions(model="m", data="d", lr=1.0, out=options.out, overwrite=True)) is None
    _save(options.out, 3)
    resumed = TrainOptions(model="m", data="d", out=options.out, resume=options.out)
    assert check_run_dir(resumed).endswith("step-000003")


def test_metrics_log_drops_lines_past_the_checkpoint_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in range(1, 6):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step})
    with open(log.path, "a") as fh:
        fh.write('{"kind": "train", "step": 6, "lo')  # cut by a kill
    MetricsLog(str(tmp_path), resume_step=3)
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    MetricsLog(str(tmp_path))  # a fresh run starts a fresh file
    assert read_metrics(log.path) == []


def test_summary_table_formats_loss_and_percentages():
    table = summary_table({"eval_loss": 4.5, "eval_exact_match": 0.0}, {"eval_loss": 0.25, "eval_exact_match": 0.825})
    assert "4.5000" in table and "0.2500" in table and "0.0%" in table and "82.5%" in table
    assert json.dumps(TrainerState().__dict__)

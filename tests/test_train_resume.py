"""``--resume`` after SIGKILL continues exactly: the loss sequence equals the uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deltatune.commands.train import resolve_options
from deltatune.train import TrainError
from tests.train_utils import cli_env, read_losses, run_cli, sentiment_records, write_jsonl, write_llama


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return write_llama(root / "llama"), write_jsonl(root / "train.jsonl", sentiment_records(48))


def _args(model: str, data: str) -> list[str]:
    # Dropout and several epochs: the resumed run must restore the RNG and the data position too.
    return ["train", "--model", model, "--data", data, "--r", "4", "--target", "all-linear", "--lr", "1e-2",
            "--lora-dropout", "0.1", "--epochs", "13", "--batch-size", "4", "--save-steps", "7", "--eval-split", "0",
            "--no-progress"]


def _train_steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as fh:
        steps = [json.loads(line)["step"] for line in fh if line.endswith("\n") and '"train"' in line]
    return max(steps, default=0)


def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(inputs, tmp_path):
    model, data = inputs
    reference = run_cli(*_args(model, data), "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    expected = read_losses(tmp_path / "ref")
    total = max(expected)
    assert total == 156

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", *_args(model, data), "--out", str(killed_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while _train_steps(killed_dir) < 30 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = _train_steps(killed_dir)
    assert 30 <= stopped_at < total
    assert not (killed_dir / "adapter").exists()

    resumed = run_cli("train", "--resume", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert read_losses(killed_dir) == expected  # every step's loss, lr and grad norm, exactly


def test_resume_refuses_changed_options_and_unknown_directories(inputs, tmp_path):
    model, data = inputs
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"options": {"model": model, "data": data, "lr": 0.01}}))
    with pytest.raises(TrainError, match=r"--lr differ\(s\) from the run's options"):
        resolve_options({"resume": str(tmp_path / "run"), "lr": 0.02})
    with pytest.raises(TrainError, match="not a run directory"):
        resolve_options({"resume": str(tmp_path)})
    options = resolve_options({"resume": str(tmp_path / "run"), "lr": 0.01, "progress": False})
    assert (options.out, options.lr, options.progress) == (str(tmp_path / "run"), 0.01, False)

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


# --- killed at random moments, checkpointing every step ------------------------------------------------------------

def _short_args(model: str, data: str) -> list[str]:
    return ["train", "--model", model, "--data", data, "--r", "4", "--target", "all-linear", "--lr", "1e-2",
            "--lora-dropout", "0.1", "--max-steps", "24", "--batch-size", "4", "--save-steps", "1",
            "--save-total-limit", "2", "--eval-split", "0", "--no-progress"]


def _kill_at_random(argv: list[str], run_dir, delay: float) -> bool:
    """Start ``deltatune`` with ``argv``, SIGKILL it ``delay`` seconds after its first step; whether it was killed
    (``False``: it finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        start = _train_steps(run_dir)
        while _train_steps(run_dir) <= start and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()


def _killed_and_resumed_equals_uninterrupted(inputs, tmp_path, kills: int, seed: int) -> None:
    import random

    import torch
    from safetensors.torch import load_file

    from deltatune.train.state import LOCK_FILE, latest_checkpoint, load_checkpoint

    model, data = inputs
    reference = run_cli(*_short_args(model, data), "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    with open(tmp_path / "ref" / "summary.json", encoding="utf-8") as fh:
        seconds = json.load(fh)["elapsed"]  # the 24 steps and their checkpoints
    rng = random.Random(seed)
    run_dir = tmp_path / "killed"
    argv = [*_short_args(model, data), "--out", str(run_dir)]
    killed = 0
    while killed < kills:
        if not _kill_at_random(argv, run_dir, rng.uniform(0.0, seconds / kills)):
            break
        killed += 1
        latest = latest_checkpoint(str(run_dir))  # never a half-written checkpoint, wherever the kill landed
        if latest is not None:
            load_checkpoint(latest)
        assert (run_dir / LOCK_FILE).exists()  # a SIGKILLed run cannot remove its lock ...
        argv = ["train", "--resume", str(run_dir), "--no-progress"]
    assert killed, "the run finished before it could be killed"
    resumed = run_cli("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "ended without releasing its lock; taking it over" in resumed.stderr  # ... the next run takes it over
    assert read_losses(run_dir) == read_losses(tmp_path / "ref")
    got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7)
    assert (run_dir / "adapter" / "adapter_config.json").read_text() == \
        (tmp_path / "ref" / "adapter" / "adapter_config.json").read_text()


@pytest.mark.slow
def test_cli_run_killed_at_random_moments_with_a_checkpoint_every_step_resumes_exactly(inputs, tmp_path):
    _killed_and_resumed_equals_uninterrupted(inputs, tmp_path, kills=4, seed=1)


def test_forked_run_killed_at_random_moments_resumes_exactly(inputs, tmp_path, capsys):
    """The default suite's variant: the run is forked from this process (no interpreter start per kill) and killed
    at a few random moments of its steps and per-step checkpoint writes; resumed in process."""
    import random

    import torch
    from safetensors.torch import load_file

    from deltatune.train import TrainOptions, train
    from deltatune.train.state import latest_checkpoint, load_checkpoint
    from tests.train_utils import one_thread

    model, data = inputs
    options = dict(model=model, data=data, r=4, target="all-linear", lr=1e-2, lora_dropout=0.1, max_steps=16,
                   batch_size=4, save_steps=1, eval_split=0, progress=False)
    with one_thread():
        reference = train(TrainOptions(**options, out=str(tmp_path / "ref")))
    rng = random.Random(0)
    run_dir = tmp_path / "killed"
    resume, cut = {}, 0
    for _ in range(3):
        before = _train_steps(run_dir)
        pid = os.fork()
        if pid == 0:  # the child trains until killed
            try:
                with one_thread():
                    train(TrainOptions(**options, out=str(run_dir), **resume))
            finally:
                os._exit(0)
        while _train_steps(run_dir) <= before and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, reference.elapsed / 4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        cut += not (run_dir / "adapter").exists()
        load_checkpoint(latest_checkpoint(str(run_dir)))  # complete, wherever the kill landed
        resume = {"resume": str(run_dir)}
    assert cut, "every run finished before it could be killed"
    capsys.readouterr()
    with one_thread():
        train(TrainOptions(**options, out=str(run_dir), **resume))
    assert "ended without releasing its lock; taking it over" in capsys.readouterr().err
    assert read_losses(run_dir) == read_losses(tmp_path / "ref")
    got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7)

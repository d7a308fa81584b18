"""Data parallel on CPU (gloo): 2 processes x 4 examples train the same adapter as 1 process x 8 examples."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import cli_env, read_losses, run_cli, sentiment_records, write_jsonl, write_llama


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # 44 examples: the last global batch of each epoch has 4, split 2 + 2 over the processes.
    return write_llama(root / "llama"), write_jsonl(root / "train.jsonl", sentiment_records(44))


def _args(model: str, data: str, batch: int, out) -> list[str]:
    # --rank, not --r: torchrun's own argument parser would take --r as an abbreviation of its options.
    return ["train", "--model", model, "--data", data, "--rank", "4", "--target", "all-linear", "--lr", "1e-2",
            "--epochs", "2", "--batch-size", str(batch), "--eval-split", "0", "--save-steps", "0", "--no-progress",
            "--out", str(out)]


def _assert_same_training(a, b) -> None:
    la, lb = read_losses(a), read_losses(b)
    assert la.keys() == lb.keys() and len(la) == 12
    for step in la:
        assert la[step][0] == pytest.approx(lb[step][0], abs=1e-5), step
    ta = load_file(a / "adapter" / "adapter_model.safetensors")
    tb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=1e-4, rtol=1e-4)


def _launch(prefix: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "-m", "deltatune", *args], capture_output=True, text=True, env=cli_env(),
                          timeout=300)


def test_torchrun_two_processes_match_one(inputs, tmp_path):
    model, data = inputs
    single = run_cli(*_args(model, data, 8, tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                  _args(model, data, 4, tmp_path / "two"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) x 4" in ddp.stderr
    _assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_accelerate_launch_two_processes_match_one(inputs, tmp_path):
    model, data = inputs
    single = run_cli(*_args(model, data, 8, tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    # On CPU, accelerate's torchrun launcher is selected with --multi_gpu; deltatune then sets up gloo.
    ddp = _launch([shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   "0"], _args(model, data, 4, tmp_path / "two"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _assert_same_training(tmp_path / "one", tmp_path / "two")

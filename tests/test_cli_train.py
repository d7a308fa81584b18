"""``deltatune train`` from the command line: help, defaults, run directories and one-line errors."""

from __future__ import annotations

import argparse
import errno
import json
import os

import pytest

from deltatune.cli import build_parser, main
from deltatune.commands.train import resolve_options
from deltatune.train.presets import DEFAULT_PRESET, PRESETS
from tests.train_utils import sentiment_records, write_jsonl, write_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"llama": write_llama(root / "llama"), "data": write_jsonl(root / "train.jsonl", sentiment_records(24))}


def base_args(files, out) -> list[str]:
    return ["train", "--model", files["llama"], "--data", files["data"], "--r", "4", "--target", "all-linear",
            "--max-steps", "2", "--eval-split", "4", "--eval-generate", "2", "--show-examples", "0", "--no-progress",
            "--out", str(out)]


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _parser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["train", "generate", "merge"])
def test_help_explains_every_option(command):
    parser = _parser(command)
    assert parser.description and len(parser.description) > 100
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings or action.dest


def test_train_help_text(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--resume", "--preset", "sentiment-minilm", "accelerate launch", "polarity", "--grad-accum"):
        assert needle in text


def test_no_arguments_means_the_default_preset():
    options = resolve_options({})
    assert options.preset == DEFAULT_PRESET and options.model == PRESETS[DEFAULT_PRESET]["model"]
    assert options.out.startswith(os.path.join("runs", DEFAULT_PRESET))
    tweaked = resolve_options({"preset": "sentiment-minilm", "epochs": 1.0, "out": "x"})
    assert (tweaked.task, tweaked.epochs, tweaked.out) == ("seq-cls", 1.0, "x")


def test_model_without_data_is_an_error(files, capsys):
    code, _, err = run(["train", "--model", files["llama"]], capsys)
    assert code == 2 and err.count("\n") == 1 and "--data is required" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/no/such.jsonl"], "data file '/no/such.jsonl' does not exist"),
        (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["--label-column", "y"], "--label-column does not apply to --task causal-lm"),
        (["--prompt-column", "question"], "has no column 'question'"),
        (["--method", "nope"], "--method 'nope' is not available"),
        (["--lr", "abc"], "invalid float value"),
        (["--epochs", "-1", "--max-steps", "0"], "--max-steps must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(files, tmp_path, capsys, extra, message):
    try:
        code, _, err = run(base_args(files, tmp_path / "run") + extra, capsys)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_empty_dataset(files, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    args = base_args(files, tmp_path / "run")
    args[args.index("--data") + 1] = str(tmp_path / "empty.jsonl")
    code, _, err = run(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "holds no examples" in err


def test_run_directory_holding_another_run(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base_args(files, out), capsys)[0] == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run(base_args(files, out) + ["--lr", "0.05"], capsys)
    assert code == 2 and err.count("\n") == 1 and "holds a different run (differs in --lr)" in err
    code, _, err = run(base_args(files, out), capsys)
    assert code == 2 and "already holds this run (finished); continue it with --resume" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before  # nothing lost
    code, _, _ = run(base_args(files, out) + ["--lr", "0.05", "--overwrite"], capsys)
    assert code == 0 and json.loads((out / "run.json").read_text())["options"]["lr"] == 0.05


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(files, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(base_args(files, out) + ["--overwrite"], capsys)
    assert code == 2 and "not a deltatune run directory" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_of_a_finished_run_just_reports(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base_args(files, out), capsys)[0] == 0
    code, printed, err = run(["train", "--resume", str(out), "--no-progress"], capsys)
    assert code == 0 and "resuming" in err and "2/2 steps" in printed


def test_disk_full_is_one_line_and_keeps_the_checkpoint(files, tmp_path, capsys, monkeypatch):
    import deltatune.files as files_module

    real = files_module._write_synced

    def full(path, data):  # the disk fills up while checkpoint 2's optimizer state is written
        if path.endswith("optimizer.pt") and "step-000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(files_module, "_write_synced", full)
    out = tmp_path / "run"
    code, _, err = run(base_args(files, out) + ["--save-steps", "1"], capsys)
    # stderr has the run's progress lines, then exactly one error line
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and errors == [err.splitlines()[-1]] and errors[0].startswith("deltatune train: error: ")
    assert "disk full" in err and "step-000001 is intact" in err and f"--resume {out}" in err
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-000001"


def test_a_second_run_into_the_same_out_is_refused_in_one_line(files, tmp_path, capsys):
    from deltatune.train.state import LOCK_FILE, run_lock

    out = tmp_path / "run"
    with run_lock(str(out)):  # a run in progress
        holder = json.loads((out / LOCK_FILE).read_text())
        code, _, err = run(base_args(files, out), capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"--out {out} is in use by another run (pid {holder['pid']} on {holder['host']}, started" in err
    assert not out.exists()  # the lock created the directory and removed it again
    assert run(base_args(files, out), capsys)[0] == 0
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    from deltatune.train.state import LOCK_FILE, run_lock

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999999, "host": "h", "started": "2026-01-01T00:00:00Z"}))
    with run_lock(str(out)):
        pass
    err = capsys.readouterr().err
    assert "the run that held it (pid 999999999 on h, started 2026-01-01T00:00:00Z) ended without releasing" in err
    assert os.listdir(out) == []

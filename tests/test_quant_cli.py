"""``deltatune train --quantize``: QLoRA from the command line, with the memory saving in the run summary."""

from __future__ import annotations

import importlib.util
import json

import pytest

from deltatune.cli import main
from tests.train_utils import sentiment_records, write_jsonl, write_llama

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcli")
    return {"llama": write_llama(root / "llama"), "data": write_jsonl(root / "train.jsonl", sentiment_records(16))}


def _args(files, out, kind) -> list[str]:
    return ["train", "--model", files["llama"], "--data", files["data"], "--r", "4", "--target", "all-linear",
            "--max-steps", "2", "--eval-split", "4", "--eval-generate", "0", "--show-examples", "0",
            "--no-progress", "--out", str(out), "--quantize", kind]


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow),
                                  pytest.param("torchao-int8", marks=pytest.mark.slow)])
def test_train_quantized_reports_memory_saving(files, tmp_path, capsys, kind):
    if kind.startswith("torchao"):
        pytest.importorskip("torchao")
    assert main(_args(files, tmp_path / "run", kind)) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quantize"] == kind and summary["steps"] == 2
    # the 14 quantized layers hold 18432 weights: 4 bytes each dense, about 1-1.4 bytes each quantized (tiny layers:
    # the scales weigh in)
    saved = summary["base_dense_bytes"] - summary["base_bytes"]
    assert 18432 * 2.5 < saved < 18432 * 3.5
    assert f"base model quantized {kind}:" in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["quantize"] == kind if "options" in run else run["quantize"] == kind


def test_quantize_without_the_library_is_one_line(files, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert main(_args(files, tmp_path / "run", "nf4")) != 0
    err = capsys.readouterr().err.strip()
    assert "--quantize nf4 needs bitsandbytes" in err and "pip install 'deltatune[quant]'" in err
    assert len(err.splitlines()) == 1


def test_unknown_quantization_is_refused(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_args(files, tmp_path / "run", "fp8"))
    assert "--quantize" in capsys.readouterr().err

"""Smoke test of the benchmark suite: ``python -m benchmarks.run --quick`` completes and every row is a finite number.

No timing assertions — numbers from a tiny model on a shared CI machine mean nothing; this only keeps the suite
runnable as ``src`` changes. Runs in a subprocess, as a user would, so the suite's thread and OpenMP settings do not
leak into the test process. Needs peft (the ``test`` extra).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_suite_runs(tmp_path: Path) -> None:
    out_md, out_json = tmp_path / "RESULTS.md", tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--output", str(out_md), "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads(out_json.read_text())
    areas = {row["area"] for row in data["rows"]}
    assert {"forward", "train", "memory", "mixed", "inject", "files", "real"} <= areas
    for row in data["rows"]:
        assert math.isfinite(row["value"]) and row["value"] >= 0, row
    assert len(data["goals"]) == 13
    assert all(goal["status"] in ("PASS", "FAIL") for goal in data["goals"]), data["goals"]
    text = out_md.read_text()
    assert "## Goals" in text and "## Profile of deltatune" in text

"""Metrics file, loss-curve plot and the end-of-run summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as written (a killed run keeps what it logged).

    Lines carry ``"kind": "train"`` (step, loss, lr, grad_norm, tokens, ...) or ``"kind": "eval"`` (step, eval_*).
    """

    def __init__(self, directory: str, resume_step: int | None = None) -> None:
        self.path = os.path.join(directory, METRICS_FILE)
        if resume_step is not None and os.path.exists(self.path):
            # Lines past the checkpoint were logged by the killed process and are computed again now.
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step and r.get("phase") != "after"]
            from ..files import atomic_write_files

            atomic_write_files({self.path: "".join(json.dumps(r) + "\n" for r in kept).encode()})
        elif resume_step is None and os.path.exists(self.path):
            os.unlink(self.path)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            from .state import write_failure

            raise write_failure(os.path.dirname(self.path), METRICS_FILE, exc) from None


def read_metrics(path: str) -> list[dict[str, Any]]:
    records = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return records


def plot_losses(metrics_path: str, png_path: str) -> str | None:
    """Training loss per step (and eval loss per evaluation) as a PNG; ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(png_path)
    except OSError:  # the plot is a convenience; the metrics file has the numbers
        return None
    finally:
        plt.close(fig)
    return png_path


# --- summary ---------------------------------------------------------------------------------------------------------

METRIC_LABELS = {
    "eval_loss": "eval loss",
    "eval_accuracy": "accuracy",
    "eval_choice_accuracy": "answer accuracy (best-scoring answer)",
    "eval_exact_match": "exact match (generated answer)",
    "eval_token_accuracy": "token accuracy",
}


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if name != "eval_loss" else f"{value:.4f}"


def summary_table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """A before/after table of the held-out metrics both evaluations have."""
    before, after = before or {}, after or {}
    names = [n for n in METRIC_LABELS if n in before or n in after]
    if not names:
        return ""
    width = max(len(METRIC_LABELS[n]) for n in names) + 2
    lines = [f"{'held-out metric':<{width}}{'before':>10}{'after':>10}"]
    lines.append("-" * len(lines[0]))
    for n in names:
        lines.append(f"{METRIC_LABELS[n]:<{width}}{_fmt(n, before.get(n)):>10}{_fmt(n, after.get(n)):>10}")
    return "\n".join(lines)


def examples_table(rows: Sequence[dict[str, Any]], width: int = 100) -> str:
    """The held-out examples with the expected answer and the model's answers before and after training."""
    out = []
    for i, row in enumerate(rows, 1):
        prompt = " ".join(str(row["prompt"]).split())
        if len(prompt) > width:
            prompt = prompt[: width - 3] + "..."
        out.append(f"[{i}] {prompt}")
        out.append(f"    expected: {row['reference']!r}")
        out.append(f"    before:   {row.get('before')!r}")
        out.append(f"    after:    {row.get('after')!r}")
    return "\n".join(out)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"

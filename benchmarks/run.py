"""Run the whole benchmark suite: ``python -m benchmarks.run [--quick] [--only AREA ...] [--output PATH]``.

Prints each area's numbers as it goes, then the results table and the goals (PASS/FAIL), and writes them as markdown
(default ``benchmarks/RESULTS.md`` for a full run; a ``--quick`` run writes only where ``--output`` says).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable, and keep benchmarks/ off sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    __package__ = "benchmarks"

from benchmarks import (  # noqa: E402
    checkpointing, forward, injection, memory, mixed_batch, other_methods, profiling, real_training, training,
)
from benchmarks.common import CPU, FULL, QUICK, THREADS, Results, Size, contention_probe, log, setup_torch  # noqa: E402

AREAS = {
    "forward": forward.run,
    "train": training.run,
    "memory": memory.run,
    "mixed": mixed_batch.run,
    "inject": injection.run,
    "files": checkpointing.run,
    "methods": other_methods.run,
    "real": real_training.run,
}
HERE = Path(__file__).resolve().parent


@dataclass
class Goal:
    text: str
    key: str
    op: str  # "<=" or ">="
    target: float
    measured: float | None = None
    by_cpu: float | None = None  # the same ratio from CPU time, where the metric is a timing

    def _meets(self, value: float) -> bool:
        return value <= self.target if self.op == "<=" else value >= self.target

    @property
    def status(self) -> str:
        """PASS/FAIL on the wall-clock ratio (what the goal says)."""
        if self.measured is None or math.isnan(self.measured):
            return "n/a"
        return "PASS" if self._meets(self.measured) else "FAIL"

    @property
    def caveat(self) -> str:
        """Non-empty when the CPU-time ratio gives the other verdict: the wall verdict is then within the noise."""
        if self.status == "n/a" or self.by_cpu is None or math.isnan(self.by_cpu):
            return ""
        return "" if self._meets(self.by_cpu) == (self.status == "PASS") else "CPU time disagrees"


def goals(metrics: dict[str, float]) -> list[Goal]:
    gs = [
        Goal("unmerged LoRA forward time <= 1.06x base forward", "fwd.dt_over_base", "<=", 1.06),
        Goal("LoRA training step >= 1.2x faster than peft's", "train.lora_speedup", ">=", 1.2),
        Goal("mixed batch over 8 adapters <= 1.05x the single-adapter batch", "mixed.dt_8_over_single", "<=", 1.05),
        Goal("mixed batch over 8 adapters >= 1.1x peft's mixed-batch speed", "mixed.speedup_8", ">=", 1.1),
        Goal("injection on the 7B-shaped meta model >= 2x faster than peft's", "inject.speedup", ">=", 2.0),
        Goal("DoRA training step >= 1.3x peft's DoRA speed", "train.dora_speedup", ">=", 1.3),
        Goal("saved activation memory of LoRA step <= peft's (ratio)", "mem.lora_dt_over_peft", "<=", 1.0),
        Goal("saved activation memory of DoRA <= 1.3x LoRA's (ratio)", "mem.dora_dt_over_lora_dt", "<=", 1.3),
        Goal("real model: deltatune defaults >= 1.15x peft's step speed", "real.dt_speedup", ">=", 1.15),
        Goal("real model: enable_fast_training() >= 1.8x peft's float32 step speed", "real.fast_speedup", ">=", 1.8),
        Goal("real model: enable_fast_training() peak memory <= 0.4x peft's", "real.fast_peak_ratio", "<=", 0.4),
        Goal("real model: fast checkpointed peak memory <= 0.4x peft's", "real.fast_ckpt_peak_ratio", "<=", 0.4),
        Goal("real model: fast first-step loss within 1% of peft's float32 loss", "real.fast_loss_dev", "<=", 0.01),
    ]
    for g in gs:
        g.measured, g.by_cpu = metrics.get(g.key), metrics.get(g.key + CPU)
    return gs


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip()
    except Exception:
        return ""


def environment() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import deltatune

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except Exception:
        pass
    dirty = " (uncommitted changes)" if _git("status", "--porcelain", "--", "src") else ""
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltatune": f"{deltatune.__version__} @ {_git('rev-parse', '--short', 'HEAD') or '?'}{dirty}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "contention probe at start": contention_probe(),
    }


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"
    return f"{value:.2f} {unit}"


def markdown(size: Size, env: dict[str, str], res: Results, gs: list[Goal], area_s: dict[str, float],
             profile_md: str | None) -> str:
    lines = [f"# deltatune vs peft — benchmark results ({size.name} size)", "",
             "Written by `python -m benchmarks.run`; see `benchmarks/README.md` for what each row measures.", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += [f"- **workload**: Llama-shaped, hidden {size.hidden}, {size.layers} layers, intermediate "
              f"{size.intermediate}, vocab {size.vocab}, batch {size.batch}x{size.seq}; LoRA r={size.r}, alpha "
              f"{2 * size.r}, dropout 0, on q/k/v/o/gate/up/down; mixed batch {size.mixed_batch}x{size.mixed_seq}; "
              f"meta model hidden {size.meta_hidden}, {size.meta_layers} layers, intermediate "
              f"{size.meta_intermediate}, vocab {size.meta_vocab}",
              f"- **rounds**: warm-up {size.warmup}, median of {size.repeats_fast} (fast ops) / {size.repeats_slow} "
              f"(training steps) / {size.repeats_mixed} (mixed batch) / {size.repeats_setup} (injection), interleaved "
              f"round-robin",
              "- **wall time per area**: " + ", ".join(f"{k} {v:.0f} s" for k, v in area_s.items()), ""]
    lines += ["## Goals", "", "Judged on the wall-clock median ratio; the CPU-time ratio is a cross-check that is less "
              "sensitive to other processes on the machine.", "",
              "| goal | measured (wall) | by CPU time | target | result |", "|---|---:|---:|---:|---|"]
    for g in gs:
        m = "—" if g.measured is None else f"{g.measured:.3f}"
        c = "—" if g.by_cpu is None else f"{g.by_cpu:.3f}"
        lines.append(f"| {g.text} | {m} | {c} | {g.op} {g.target} | **{g.status}**"
                     f"{' (' + g.caveat + ')' if g.caveat else ''} |")
    lines += ["", "## All numbers", "", "| area | measurement | value | note |", "|---|---|---:|---|"]
    for r in res.rows:
        lines.append(f"| {r.area} | {r.name} | {_fmt(r.value, r.unit)} | {r.note} |")
    if res.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    if profile_md:
        lines += ["", profile_md]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1-2 rounds (a smoke run, seconds)")
    parser.add_argument("--only", nargs="+", choices=list(AREAS), help="run only these areas")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile section")
    parser.add_argument("--output", type=Path, help="markdown file to write (full run default: benchmarks/RESULTS.md)")
    parser.add_argument("--json", type=Path, help="also write rows, metrics and goals as JSON here")
    args = parser.parse_args(argv)

    size = QUICK if args.quick else FULL
    setup_torch(args.threads)
    env = environment()
    log(f"deltatune benchmarks, {size.name} size — " + "; ".join(f"{k}: {v}" for k, v in env.items()))
    res = Results()
    area_s: dict[str, float] = {}
    for name in args.only or list(AREAS):
        start = time.perf_counter()
        res.extend(AREAS[name](size))
        area_s[name] = time.perf_counter() - start
    profile_md = None
    if not args.no_profile:
        start = time.perf_counter()
        profile_md = profiling.run(size)
        area_s["profile"] = time.perf_counter() - start
    env["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env["contention probe at end"] = contention_probe()

    gs = goals(res.metrics)
    width = max(len(r.name) for r in res.rows) if res.rows else 20
    log("\n" + "=" * (width + 30))
    for r in res.rows:
        log(f"{r.area:8s} {r.name:{width}s} {_fmt(r.value, r.unit):>14s}  {r.note}")
    for n in res.notes:
        log(f"note: {n}")
    log("")
    for g in gs:
        m = "—" if g.measured is None else f"{g.measured:.3f}"
        c = "" if g.by_cpu is None else f", by CPU time {g.by_cpu:.3f}"
        log(f"{g.status:4s}  {g.text}: {m} (target {g.op} {g.target}{c}){'  <- ' + g.caveat if g.caveat else ''}")

    output = args.output or (None if args.quick else HERE / "RESULTS.md")
    if output is not None:
        output.write_text(markdown(size, env, res, gs, area_s, profile_md))
        log(f"\nwrote {output}")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"size": size.name, "environment": env, "rows": [asdict(r) for r in res.rows], "metrics": res.metrics,
             "notes": res.notes, "goals": [{**asdict(g), "status": g.status, "caveat": g.caveat} for g in gs], "seconds": area_s},
            indent=2, default=str,
        ))
    log(f"total {sum(area_s.values()):.0f} s")
    return res


if __name__ == "__main__":
    main()

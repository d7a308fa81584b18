"""Where deltatune's time goes: torch.profiler operator tables and cProfile Python-level entries.

Profiles three workloads — unmerged LoRA forward, LoRA training step, mixed batch over 8 adapters — and returns a
markdown section. Operator tables show self CPU time per op per iteration; the cProfile tables show which Python
functions (deltatune's own in particular) take time, the part the library controls directly.
"""

from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

from .common import Size, TrainStep, build_llama, deltatune_lora, fresh_copy, log, token_ids
from .mixed_batch import build_models

TOP_OPS = 12
TOP_PY = 12


def _op_table(fn, iters: int) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    lines = ["| op | self CPU ms / iter | % of total | calls / iter |", "|---|---:|---:|---:|"]
    for e in top:
        lines.append(
            f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / iters:.2f} | {100 * e.self_cpu_time_total / total:.1f} "
            f"| {e.count / iters:.0f} |"
        )
    lines.append(f"\nTotal self CPU per iteration: {total / 1e3 / iters:.1f} ms (op count per iteration: "
                 f"{sum(e.count for e in events) / iters:.0f}).")
    return "\n".join(lines)


def _where(entry: tuple) -> str:
    filename, line, func = entry
    if filename == "~":
        return func
    parts = filename.split(os.sep)
    for anchor in ("deltatune", "peft", "transformers", "torch"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            filename = "/".join(parts[idx:])
            break
    else:
        filename = parts[-1]
    return f"{filename}:{line}({func})"


def _py_tables(fn, iters: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = stats.stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
    total = stats.total_tt or 1.0
    lines = [f"cProfile, {iters} iterations, {total / iters * 1e3:.1f} ms per iteration under the profiler.", "",
             "Top by own time (tottime):", "", "| function | calls / iter | tottime ms / iter | cumtime ms / iter |",
             "|---|---:|---:|---:|"]
    for key, (_cc, nc, tt, ct, _) in sorted(rows.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP_PY]:
        lines.append(f"| `{_where(key)}` | {nc / iters:.0f} | {tt / iters * 1e3:.2f} | {ct / iters * 1e3:.2f} |")
    own = [(k, v) for k, v in rows.items() if f"{os.sep}deltatune{os.sep}" in k[0]]
    own_tt = sum(v[2] for _, v in own)
    lines += ["", f"deltatune's own functions (src/deltatune): {own_tt / iters * 1e3:.2f} ms/iter own time "
              f"({100 * own_tt / total:.1f}% of the profiled total):", "",
              "| function | calls / iter | tottime ms / iter | cumtime ms / iter |", "|---|---:|---:|---:|"]
    for key, (_cc, nc, tt, ct, _) in sorted(own, key=lambda kv: kv[1][3], reverse=True)[:TOP_PY]:
        lines.append(f"| `{_where(key)}` | {nc / iters:.0f} | {tt / iters * 1e3:.2f} | {ct / iters * 1e3:.2f} |")
    return "\n".join(lines)


def run(size: Size) -> str:
    import tempfile

    from .common import build_meta_llama

    iters = 3 if size.name == "full" else 1
    base = build_llama(size)
    ids = token_ids(size)
    dt = deltatune_lora(fresh_copy(base), size).eval()

    def forward():
        with torch.no_grad():
            dt(input_ids=ids)

    lora_step = TrainStep(deltatune_lora(fresh_copy(base), size), ids)
    dora_step = TrainStep(deltatune_lora(fresh_copy(base), size, use_dora=True), ids)
    mixed_dt, _ = build_models(size, base, 8)
    mixed_ids = token_ids(size, batch=size.mixed_batch, seq=size.mixed_seq)
    rows = [f"a{i % 8}" for i in range(size.mixed_batch)]

    def mixed():
        with torch.no_grad():
            mixed_dt(input_ids=mixed_ids, adapter_names=rows)

    meta_models = []

    def inject():  # a fresh meta model per call, built before the profiler starts (see _prepared below)
        deltatune_lora(meta_models.pop(), size)

    tmp = tempfile.TemporaryDirectory(prefix="deltatune-profile-")
    saved = []

    def save():
        path = f"{tmp.name}/{len(saved)}"
        saved.append(path)
        dt.save_pretrained(path)

    # (title, fn, operator table too?, untimed preparation before warm-up and before the profiled iterations)
    workloads = [
        (f"LoRA forward (unmerged, no_grad, {size.batch}x{size.seq})", forward, True, None),
        (f"LoRA training step ({size.batch}x{size.seq})", lora_step, True, None),
        (f"DoRA training step ({size.batch}x{size.seq})", dora_step, True, None),
        (f"mixed batch over 8 adapters ({size.mixed_batch}x{size.mixed_seq}, no_grad)", mixed, True, None),
        (f"get_peft_model on the meta model (hidden {size.meta_hidden}, {size.meta_layers} layers)", inject, False,
         lambda n: meta_models.extend(build_meta_llama(size) for _ in range(n))),
        ("save_pretrained (LoRA, all linear)", save, False, None),
    ]
    parts = ["## Profile of deltatune", ""]
    try:
        for title, fn, ops, prepare in workloads:
            log(f"[profile] {title}")
            if prepare:
                prepare(1)
            fn()  # warm-up
            parts += [f"### {title}", ""]
            if size.name == "full":
                gc.collect()  # once per workload, so that a full collection does not land inside the profiled calls
            if ops:
                parts += [_op_table(fn, iters), ""]
            if prepare:
                prepare(iters)
            parts += [_py_tables(fn, iters), ""]
    finally:
        tmp.cleanup()
    return "\n".join(parts)

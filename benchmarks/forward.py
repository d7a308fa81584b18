"""Unmerged LoRA inference forward against the plain base model, deltatune and peft side by side."""

from __future__ import annotations

import torch

from .common import Results, Size, build_llama, deltatune_lora, fresh_copy, interleave, log, peft_lora, plain, token_ids

AREA = "forward"


def run(size: Size) -> Results:
    res = Results()
    base = build_llama(size)
    dt = deltatune_lora(fresh_copy(base), size).eval()
    pf = peft_lora(fresh_copy(base), size).eval()
    ids = token_ids(size)

    def forward(model):
        def call():
            with torch.no_grad():
                model(input_ids=ids)
        return plain(call)

    t = interleave(
        {"base": forward(base), "deltatune": forward(dt), "peft": forward(pf)},
        repeats=size.repeats_fast, warmup=size.warmup,
    )
    res.time(AREA, f"base model forward {size.batch}x{size.seq} (no_grad)", t["base"], "fwd.base_ms")
    res.time(AREA, f"deltatune LoRA r={size.r} unmerged forward", t["deltatune"], "fwd.dt_ms")
    res.time(AREA, f"peft LoRA r={size.r} unmerged forward", t["peft"], "fwd.peft_ms")
    d = res.ratio(AREA, "deltatune LoRA / base (time)", "fwd.dt_ms", "fwd.base_ms", "fwd.dt_over_base")
    p = res.ratio(AREA, "peft LoRA / base (time)", "fwd.peft_ms", "fwd.base_ms", "fwd.peft_over_base")
    res.ratio(AREA, "speed-up deltatune vs peft (peft time / deltatune time)", "fwd.peft_ms", "fwd.dt_ms",
              "fwd.speedup")
    log(f"[forward] deltatune {d:.3f}x base, peft {p:.3f}x base")
    return res

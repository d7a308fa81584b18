"""Adapter files and merging: ``save_pretrained``, ``PeftModel.from_pretrained``, ``merge_and_unload``.

Each round gets fresh state from an untimed setup (a new directory to save into; a fresh copy of the base model to
load onto or to merge into), so only the library call is timed. The adapter has non-zero random weights.
"""

from __future__ import annotations

import itertools
import os
import tempfile

from .common import Case, Results, Size, build_llama, deltatune_lora, fresh_copy, interleave, log, peft_lora

AREA = "files"


def run(size: Size) -> Results:
    import deltatune
    import peft

    res = Results()
    base = build_llama(size)
    dt = deltatune_lora(fresh_copy(base), size, init_lora_weights=False)
    pf = peft_lora(fresh_copy(base), size, init_lora_weights=False)
    counter = itertools.count()

    with tempfile.TemporaryDirectory(prefix="deltatune-bench-") as tmp:
        def new_dir() -> str:
            return os.path.join(tmp, f"save{next(counter)}")

        t = interleave(
            {
                "deltatune": Case(lambda d: dt.save_pretrained(d), setup=new_dir),
                "peft": Case(lambda d: pf.save_pretrained(d), setup=new_dir),
            },
            repeats=size.repeats_fast, warmup=size.warmup,
        )
        d = res.time(AREA, f"deltatune save_pretrained (LoRA r={size.r}, all linear)", t["deltatune"], "save.dt_ms")
        p = res.time(AREA, "peft save_pretrained", t["peft"], "save.peft_ms")
        res.ratio(AREA, "save speed-up deltatune vs peft (peft time / deltatune time)", "save.peft_ms", "save.dt_ms",
              "save.speedup")
        log(f"[files] save: deltatune {d:.1f} ms, peft {p:.1f} ms")

        dt_dir, pf_dir = os.path.join(tmp, "dt"), os.path.join(tmp, "peft")
        dt.save_pretrained(dt_dir)
        pf.save_pretrained(pf_dir)
        t = interleave(
            {
                "deltatune": Case(
                    lambda m: deltatune.PeftModel.from_pretrained(m, dt_dir), setup=lambda: fresh_copy(base)
                ),
                "peft": Case(lambda m: peft.PeftModel.from_pretrained(m, pf_dir), setup=lambda: fresh_copy(base)),
            },
            repeats=size.repeats_fast, warmup=size.warmup,
        )
        d = res.time(AREA, "deltatune PeftModel.from_pretrained", t["deltatune"], "load.dt_ms")
        p = res.time(AREA, "peft PeftModel.from_pretrained", t["peft"], "load.peft_ms")
        res.ratio(AREA, "load speed-up deltatune vs peft (peft time / deltatune time)", "load.peft_ms", "load.dt_ms",
              "load.speedup")
        log(f"[files] load: deltatune {d:.1f} ms, peft {p:.1f} ms")

    t = interleave(
        {
            "deltatune": Case(
                lambda m: m.merge_and_unload(),
                setup=lambda: deltatune_lora(fresh_copy(base), size, init_lora_weights=False),
            ),
            "peft": Case(
                lambda m: m.merge_and_unload(), setup=lambda: peft_lora(fresh_copy(base), size, init_lora_weights=False)
            ),
        },
        repeats=size.repeats_fast, warmup=size.warmup,
    )
    d = res.time(AREA, "deltatune merge_and_unload", t["deltatune"], "merge.dt_ms")
    p = res.time(AREA, "peft merge_and_unload", t["peft"], "merge.peft_ms")
    res.ratio(AREA, "merge speed-up deltatune vs peft (peft time / deltatune time)", "merge.peft_ms", "merge.dt_ms",
              "merge.speedup")
    log(f"[files] merge_and_unload: deltatune {d:.1f} ms, peft {p:.1f} ms")
    return res

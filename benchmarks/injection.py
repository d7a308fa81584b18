"""``get_peft_model`` on a 7B-shaped Llama whose parameters live on the meta device.

The base model is built (untimed) inside a ``torch.device("meta")`` context for every round, then the injection is
timed outside it, as a user would call it (e.g. before FSDP materialises the weights). A meta base costs no memory and
no init, so the time is the libraries' own work: walking and matching modules, building and wrapping the deltas.
"""

from __future__ import annotations

from .common import Case, Results, Size, build_meta_llama, deltatune_lora, interleave, log, peft_lora

AREA = "inject"


def run(size: Size) -> Results:
    res = Results()
    cases = {
        "deltatune": Case(lambda m: deltatune_lora(m, size), setup=lambda: build_meta_llama(size)),
        "peft": Case(lambda m: peft_lora(m, size), setup=lambda: build_meta_llama(size)),
    }
    t = interleave(cases, repeats=size.repeats_setup, warmup=1)
    shape = f"hidden {size.meta_hidden}, {size.meta_layers} layers, meta device"
    d = res.time(AREA, f"deltatune get_peft_model, LoRA r={size.r} all linear ({shape})", t["deltatune"],
                 "inject.dt_ms")
    p = res.time(AREA, "peft get_peft_model, same", t["peft"], "inject.peft_ms")
    res.ratio(AREA, "injection speed-up deltatune vs peft (peft time / deltatune time)", "inject.peft_ms",
              "inject.dt_ms", "inject.speedup")
    log(f"[inject] deltatune {d:.0f} ms, peft {p:.0f} ms (speed-up {p / d:.2f}x)")
    return res

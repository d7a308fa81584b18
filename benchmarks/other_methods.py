"""Training steps of further methods (IA3, prefix and prompt tuning), deltatune vs peft, where deltatune has them.

Which methods exist is asked of ``deltatune.registry.supported_types()`` at run time, so rows appear by themselves
as methods land in ``src``; a method that is registered but fails here is reported as a note, not an abort.
"""

from __future__ import annotations

import traceback

from .common import Results, Size, TrainStep, build_llama, fresh_copy, interleave, log, plain, token_ids

AREA = "methods"

# peft type name -> (config kwargs shared by both libraries, peft's config class name)
METHODS = {
    "IA3": (
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "IA3Config",
    ),
    "PREFIX_TUNING": (dict(task_type="CAUSAL_LM", num_virtual_tokens=20), "PrefixTuningConfig"),
    "PROMPT_TUNING": (dict(task_type="CAUSAL_LM", num_virtual_tokens=20), "PromptTuningConfig"),
}


def run(size: Size) -> Results:
    import deltatune
    import peft
    from deltatune import registry

    res = Results()
    supported = {str(getattr(t, "value", t)) for t in registry.supported_types()}
    base = None
    ids = token_ids(size)
    for peft_type, (kwargs, peft_cls_name) in METHODS.items():
        if peft_type not in supported:
            why = f"not in deltatune.registry.supported_types() {sorted(supported)}"
            res.skip(AREA, f"{peft_type} training step", why)
            log(f"[methods] {peft_type}: not supported by deltatune yet, skipped")
            continue
        try:
            base = base if base is not None else build_llama(size)
            dt_cfg = registry.config_class(peft_type)(**kwargs)
            pf_cfg = getattr(peft, peft_cls_name)(**kwargs)
            steps = {
                "deltatune": TrainStep(deltatune.get_peft_model(fresh_copy(base), dt_cfg), ids),
                "peft": TrainStep(peft.get_peft_model(fresh_copy(base), pf_cfg), ids),
            }
            # Not goals: fewer rounds than the LoRA steps, to keep the full run short.
            t = interleave({k: plain(v) for k, v in steps.items()}, repeats=max(2, size.repeats_slow - 2),
                           warmup=size.warmup)
        except Exception as exc:  # a half-finished method must not take the whole suite down
            res.skip(AREA, f"{peft_type} training step", f"failed: {type(exc).__name__}: {exc}")
            log(f"[methods] {peft_type}: failed\n{traceback.format_exc()}")
            continue
        d = res.time(AREA, f"deltatune {peft_type} step {size.batch}x{size.seq}", t["deltatune"], f"{peft_type}.dt_ms")
        p = res.time(AREA, f"peft {peft_type} step", t["peft"], f"{peft_type}.peft_ms")
        res.ratio(AREA, f"{peft_type} speed-up deltatune vs peft (peft time / deltatune time)", f"{peft_type}.peft_ms",
                  f"{peft_type}.dt_ms", f"{peft_type}.speedup")
        log(f"[methods] {peft_type}: deltatune {d:.0f} ms, peft {p:.0f} ms")
    return res

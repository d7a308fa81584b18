"""Training step (forward + backward + AdamW): LoRA and DoRA, deltatune vs peft, full fine-tuning, and the floor.

All cases run in one interleaved group so that every ratio between them (LoRA vs peft, DoRA vs LoRA, LoRA vs full
fine-tuning) compares rounds taken under the same machine conditions. The floor is the frozen base model's forward
and activation-gradient backward with no adapter: no LoRA implementation can be faster than it, so it tells how much
of a LoRA step the adapter library controls at all.
"""

from __future__ import annotations

from .common import (
    FrozenBaseStep, Results, Size, TrainStep, build_llama, deltatune_lora, fresh_copy, interleave, log, peft_lora,
    plain, token_ids,
)

AREA = "train"


def run(size: Size) -> Results:
    res = Results()
    base = build_llama(size)
    ids = token_ids(size)
    full = fresh_copy(base).requires_grad_(True)
    steps = {
        "floor": FrozenBaseStep(fresh_copy(base), ids),
        "full": TrainStep(full, ids),
        "lora dt": TrainStep(deltatune_lora(fresh_copy(base), size), ids),
        "lora peft": TrainStep(peft_lora(fresh_copy(base), size), ids),
        "dora dt": TrainStep(deltatune_lora(fresh_copy(base), size, use_dora=True), ids),
        "dora peft": TrainStep(peft_lora(fresh_copy(base), size, use_dora=True), ids),
    }
    t = interleave({k: plain(v) for k, v in steps.items()}, repeats=size.repeats_slow, warmup=size.warmup)
    shape = f"{size.batch}x{size.seq}"
    res.time(AREA, f"floor: frozen base forward+backward, the activation grads LoRA needs, no adapter {shape}",
             t["floor"], "train.floor_ms")
    res.time(AREA, f"full fine-tuning step {shape}", t["full"], "train.full_ms")
    res.time(AREA, f"deltatune LoRA r={size.r} step", t["lora dt"], "train.lora_dt_ms")
    res.time(AREA, f"peft LoRA r={size.r} step", t["lora peft"], "train.lora_peft_ms")
    res.time(AREA, f"deltatune DoRA r={size.r} step", t["dora dt"], "train.dora_dt_ms")
    res.time(AREA, f"peft DoRA r={size.r} step", t["dora peft"], "train.dora_peft_ms")
    lora = res.ratio(AREA, "LoRA speed-up deltatune vs peft (peft time / deltatune time)", "train.lora_peft_ms",
                     "train.lora_dt_ms", "train.lora_speedup")
    dora = res.ratio(AREA, "DoRA speed-up deltatune vs peft (peft time / deltatune time)", "train.dora_peft_ms",
                     "train.dora_dt_ms", "train.dora_speedup")
    res.ratio(AREA, "deltatune LoRA / floor (time)", "train.lora_dt_ms", "train.floor_ms", "train.lora_dt_over_floor")
    res.ratio(AREA, "peft LoRA / floor (time)", "train.lora_peft_ms", "train.floor_ms", "train.lora_peft_over_floor")
    res.ratio(AREA, "deltatune LoRA / full fine-tuning (time)", "train.lora_dt_ms", "train.full_ms",
              "train.lora_dt_over_full")
    res.ratio(AREA, "peft LoRA / full fine-tuning (time)", "train.lora_peft_ms", "train.full_ms",
              "train.lora_peft_over_full")
    res.ratio(AREA, "deltatune DoRA / deltatune LoRA (time)", "train.dora_dt_ms", "train.lora_dt_ms",
              "train.dora_dt_over_lora_dt")
    res.ratio(AREA, "peft DoRA / peft LoRA (time)", "train.dora_peft_ms", "train.lora_peft_ms",
              "train.dora_peft_over_lora_peft")
    log(f"[train] speed-up vs peft: LoRA {lora:.3f}x, DoRA {dora:.3f}x")
    return res

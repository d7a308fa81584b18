"""Activation memory saved for backward by one training forward, parameters excluded.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves passes through the pack hook;
the total is the sum of ``nbytes`` over the *unique* storages among them, skipping any storage that belongs to a
model parameter (a parameter, or a view such as ``weight.T``, costs no extra memory). Deterministic, so measured once.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Results, Size, build_llama, deltatune_lora, fresh_copy, log, peft_lora, token_ids

AREA = "memory"
MIB = 2**20


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages autograd saves during one training forward (with loss)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # hold references so no storage is freed and its address reused mid-count

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_storages and ptr not in storages:
                storages[ptr] = storage.nbytes()
                keep.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    keep.clear()
    return sum(storages.values())


def run(size: Size) -> Results:
    res = Results()
    base = build_llama(size)
    ids = token_ids(size)
    full = fresh_copy(base)
    full.requires_grad_(True)
    models = {
        "full fine-tuning": lambda: full,
        "peft LoRA": lambda: peft_lora(fresh_copy(base), size),
        "deltatune LoRA": lambda: deltatune_lora(fresh_copy(base), size),
        "peft DoRA": lambda: peft_lora(fresh_copy(base), size, use_dora=True),
        "deltatune DoRA": lambda: deltatune_lora(fresh_copy(base), size, use_dora=True),
    }
    keys = {
        "full fine-tuning": "mem.full", "peft LoRA": "mem.lora_peft", "deltatune LoRA": "mem.lora_dt",
        "peft DoRA": "mem.dora_peft", "deltatune DoRA": "mem.dora_dt",
    }
    mib = {}
    for name, make in models.items():
        mib[name] = saved_activation_bytes(make(), ids) / MIB
        res.value(AREA, f"{name}: saved activations, {size.batch}x{size.seq} forward", mib[name], "MiB", keys[name])
    res.ratio(AREA, "deltatune LoRA / peft LoRA (memory)", "mem.lora_dt", "mem.lora_peft", "mem.lora_dt_over_peft")
    res.ratio(AREA, "deltatune DoRA / deltatune LoRA (memory)", "mem.dora_dt", "mem.lora_dt",
              "mem.dora_dt_over_lora_dt")
    res.ratio(AREA, "peft DoRA / peft LoRA (memory)", "mem.dora_peft", "mem.lora_peft", "mem.dora_peft_over_lora_peft")
    res.ratio(AREA, "deltatune DoRA / peft DoRA (memory)", "mem.dora_dt", "mem.dora_peft", "mem.dora_dt_over_peft")
    log("[memory] " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mib.items()))
    return res

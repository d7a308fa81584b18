"""The training loop, on ``accelerate``: one process or many (DDP; FSDP/DeepSpeed via ``accelerate config``).

What makes a run reproducible and resumable exactly:

* Data order is a pure function of (seed, epoch) (:func:`data.epoch_order`); the data position is the step count.
* One optimizer step consumes one *global batch*: ``batch_size x processes x grad_accum`` examples, split in a fixed
  way over processes and micro-steps. The loss of each micro-batch is its *summed* token loss divided by the global
  batch's target-token count (times the process count, which DDP's gradient averaging divides out again), so the
  gradient is the same whatever the split: 1 process x 8, 2 processes x 4 or 1 process x 4 x 2 accumulation steps.
* A checkpoint holds adapter, optimizer, scheduler, every process's RNG state, the trainer state and the adapter's
  training state (``Delta.train_state``: AdaLoRA's full factors and allocator), so the steps after ``--resume``
  compute exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import get_peft_model
from ..errors import DeltatuneError
from . import data as D
from .evaluate import MAX_CHOICES, evaluate, forward_logits, loss_sum
from .metrics import MetricsLog, examples_table, format_duration, plot_losses, summary_table
from .models import build_peft_config, infer_task, load_model, load_tokenizer
from .options import TrainError, TrainOptions
from .state import (
    TrainerState,
    adapter_train_state,
    capture_rng,
    check_run_dir,
    clear_run_dir,
    latest_checkpoint,
    load_checkpoint,
    restore_adapter,
    restore_rng,
    save_checkpoint,
    write_failure,
    write_run,
)


@dataclass
class RunResult:
    """What :func:`train` returns: where things are and the before/after metrics."""

    out: str
    steps: int
    before: dict[str, float] | None
    after: dict[str, float] | None
    elapsed: float
    stopped_early: bool = False


def log(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


# --- launch environment ----------------------------------------------------------------------------------------------

def _multi_process_cpu() -> bool:
    """Whether this is one of several processes on a machine without GPUs: accelerate then needs ``cpu=True`` to
    set up CPU data parallelism (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def _fresh_accelerator_state() -> None:
    """Let a second ``train()`` in the same single process use other settings (e.g. bf16): accelerate keeps its
    state process-wide and refuses changes. Distributed runs keep theirs (it holds the process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset(reset_partial_state=True)


def _busy_machine_note() -> str | None:
    """A hint when other processes keep the cores busy: PyTorch's OpenMP threads then spin waiting for each other
    and each step can take many times longer, unless they wait passively."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load > cores + 0.5 and "OMP_WAIT_POLICY" not in os.environ and torch.get_num_threads() > 1:
        return (f"note: the machine is busy (load {load:.1f} on {cores} cores); if steps are slow, run with "
                f"OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1)")
    return None


def _launch_note(world: int) -> str | None:
    """A hint when ``accelerate launch`` started one process on a CPU-only machine (its default launcher cannot
    start several CPU processes; its torchrun launcher, selected by ``--multi_gpu``, can)."""
    if world == 1 and "ACCELERATE_DYNAMO_BACKEND" in os.environ and "WORLD_SIZE" not in os.environ \
            and not torch.cuda.is_available():
        return ("note: accelerate launch started a single process; for data-parallel training on CPU use "
                "`accelerate launch --multi_gpu --num_processes N ...` (torchrun with gloo) or torchrun")
    return None


# --- the loop --------------------------------------------------------------------------------------------------------

def train(options: TrainOptions) -> RunResult:
    """Run (or resume) one training run as described by ``options``; returns paths and metrics.

    Raises:
        TrainError: bad input; nothing in the run directory was changed (except by ``--overwrite`` after all
            inputs were checked).
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object, set_seed

    _fresh_accelerator_state()
    accelerator = Accelerator(mixed_precision="bf16" if options.bf16 else "no", cpu=_multi_process_cpu())
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    out = options.out
    assert out is not None

    resume_from = check_run_dir(options)  # raises before anything is written
    for note in (_launch_note(world), _busy_machine_note()):
        if note:
            log(note, main)

    # --- inputs (checked before the run directory changes) -----------------------------------------------------------
    from .presets import resolve_model

    with accelerator.main_process_first():
        model_dir = resolve_model(options.model, is_main_process=main)
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load model {options.model!r}: {str(exc).splitlines()[0]}") from None
    tokenizer = load_tokenizer(model_dir)
    train_records, eval_records = D.read_records(options.data)
    if options.eval_data is not None:
        eval_records, _ = D.read_records(options.eval_data)
    task = infer_task(model_config, train_records, options.task)
    if options.chat and task != "causal-lm":
        raise TrainError(f"--chat does not apply to --task {task} (only to causal-lm)")
    explicit_columns = {"prompt": options.prompt_column, "completion": options.completion_column,
                        "text": options.text_column, "label": options.label_column}
    columns = D.choose_columns(task, train_records, explicit_columns, options.data)
    if eval_records is None:
        train_records, eval_records = D.split_eval(train_records, options.eval_split, options.seed)
    elif eval_records:
        D.choose_columns(task, eval_records, explicit_columns, options.eval_data or options.data)
    labels = D.label_names(task, train_records + eval_records, columns.label) if columns.label else None
    encoder = D.Tokenizer(tokenizer, task, columns, options.max_length, options.chat, labels)
    train_set = D.tokenize(train_records, encoder, options.data)
    eval_set = D.tokenize(eval_records, encoder, options.eval_data or options.data) if eval_records else []
    if options.early_stopping_patience is not None and not (eval_set and options.eval_steps):
        raise TrainError("--early-stopping-patience needs held-out data (--eval-split or --eval-data) and --eval-steps")

    global_batch = options.batch_size * world * options.grad_accum
    parts = world * options.grad_accum
    steps_per_epoch = len(train_set) // global_batch + (1 if len(train_set) % global_batch >= parts else 0)
    if steps_per_epoch == 0:
        raise TrainError(
            f"{len(train_set)} training examples are fewer than one step needs ({parts} = processes x --grad-accum)"
        )
    total_steps = options.max_steps or max(1, math.ceil(options.epochs * steps_per_epoch))

    set_seed(options.seed)
    base = load_model(model_dir, task, labels, tokenizer.pad_token_id)
    set_seed(options.seed)
    peft_config = build_peft_config(options, task, total_steps)
    try:
        model = get_peft_model(base, peft_config)
    except DeltatuneError as exc:
        raise TrainError(str(exc)) from None
    if options.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen base (no input-grad trick needed); transformers >= 5.2x
        # names it activation checkpointing and deprecates the old name.
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=options.lr)
    from transformers import get_scheduler

    warmup = options.warmup_steps if options.warmup_steps is not None else int(options.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[options.lr_schedule],
        optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
    )

    # --- the run directory ------------------------------------------------------------------------------------------
    state = TrainerState()
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        state = ckpt["state"]
        restore_adapter(model, "default", ckpt, resume_from)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"]
        if len(rng) != world:
            raise TrainError(
                f"--resume: the checkpoint was written by {len(rng)} process(es); resume it with the same number "
                f"(this launch has {world})"
            )
        log(f"resuming {out} from {os.path.basename(resume_from)} (step {state.step} of {total_steps})", main)
    if main:
        if options.overwrite and os.path.isdir(out) and not options.resume:
            clear_run_dir(out)
        info = {"model_dir": model_dir, "task": task, "labels": labels, "chat": options.chat,
                "columns": dataclasses.asdict(columns), "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch, "processes": world, "global_batch": global_batch}
        try:
            write_run(out, options, info)
        except OSError as exc:
            raise write_failure(out, "run.json", exc) from None
    accelerator.wait_for_everyone()
    metrics = MetricsLog(out, resume_step=state.step if resume_from is not None else None) if main else None

    ptrain, pall = model.get_nb_trainable_parameters()
    log(f"model {options.model} ({task}, {pall - ptrain:,} parameters) + {options.method} adapter "
        f"({ptrain:,} trainable, {100 * ptrain / pall:.2f}%)", main and resume_from is None)
    log(f"data: {len(train_set)} training / {len(eval_set)} held-out examples; {total_steps} steps of "
        f"{global_batch} examples ({world} process(es) x {options.batch_size} x {options.grad_accum} accumulation)",
        main and resume_from is None)

    autocast = accelerator.autocast
    unwrapped = model
    choices = None
    if task in ("causal-lm", "seq2seq") and columns.completion is not None:
        distinct = sorted({e.reference for e in train_set + eval_set if e.reference is not None})
        if 2 <= len(distinct) <= MAX_CHOICES:
            eos = [tokenizer.eos_token_id] if task == "causal-lm" and tokenizer.eos_token_id is not None else []
            choices = [(d, tokenizer(d, add_special_tokens=False)["input_ids"] + eos) if task == "causal-lm"
                       else (d, tokenizer(text_target=d)["input_ids"]) for d in distinct]
    show = _pick_examples(eval_set, options.show_examples)

    def run_eval(generate: bool) -> tuple[dict[str, float], dict[int, str]]:
        return evaluate(
            unwrapped, eval_set, task=task, tokenizer=tokenizer, batch_size=options.batch_size,
            device=accelerator.device, label_names=labels, choices=choices,
            generate_n=options.eval_generate if generate else 0, answer_indices=show if generate else (),
            autocast=autocast,
        )

    before_path = os.path.join(out, "before.json")
    before: dict[str, Any] | None = None
    before_answers: dict[int, str] = {}
    if eval_set and main:
        if resume_from is None or not os.path.exists(before_path):
            log("evaluating the base model on the held-out examples...", True)
            t0 = time.perf_counter()
            before, before_answers = run_eval(generate=True)
            log(f"  {_fmt_metrics(before)} ({format_duration(time.perf_counter() - t0)})", True)
            try:
                with open(before_path, "w", encoding="utf-8") as fh:
                    json.dump({"metrics": before, "answers": before_answers}, fh)
            except OSError as exc:
                raise write_failure(out, "before.json", exc) from None
            metrics.write({"kind": "eval", "phase": "before", "step": 0, **before})
        else:
            with open(before_path, encoding="utf-8") as fh:
                saved = json.load(fh)
            before, before_answers = saved["metrics"], {int(k): v for k, v in saved["answers"].items()}

    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        restore_rng(ckpt["rng"][rank])

    # --- steps ------------------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state.step, disable=not (main and options.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    params = [p for _, p in trainable]
    epoch_cache: tuple[int, list[list[int]]] | None = None
    segment_start, segment_tokens = time.perf_counter(), 0
    elapsed_before = state.elapsed

    def checkpoint() -> None:
        state.elapsed = elapsed_before + time.perf_counter() - segment_start
        rng_states = gather_object([capture_rng()])
        if main:
            save_checkpoint(
                out, state, unwrapped.peft_config["default"].to_json_string(),
                unwrapped.adapter_state_dict("default"), optimizer.state_dict(), scheduler.state_dict(),
                rng_states, options.save_total_limit, adapter_train_state(unwrapped, "default"),
            )
        accelerator.wait_for_everyone()

    stop = state.stopped_early  # a run that stopped early stays stopped when resumed
    try:
        while state.step < total_steps and not stop:
            epoch, index = divmod(state.step, steps_per_epoch)
            if epoch_cache is None or epoch_cache[0] != epoch:
                epoch_cache = (epoch, D.global_batches(len(train_set), global_batch, options.seed, epoch))
            indices = epoch_cache[1][index]
            micro = D.shard(indices, parts)
            targets = sum(train_set[i].targets for i in indices)
            model.train()
            local_sum = torch.zeros((), device=accelerator.device)
            local_tokens = 0
            for a in range(options.grad_accum):
                chunk = [train_set[i] for i in micro[a * world + rank]]
                batch = {k: v.to(accelerator.device) for k, v in D.collate(chunk, task, tokenizer.pad_token_id).items()}
                local_tokens += int(batch["attention_mask"].sum())
                sync = contextlib.nullcontext() if a == options.grad_accum - 1 else accelerator.no_sync(model)
                with sync, autocast():
                    summed = loss_sum(task, forward_logits(model, task, batch), batch["labels"])
                    objective = summed * (world / targets)
                    extra = unwrapped.base_model.adapter_loss()  # e.g. AdaLoRA's regulariser, once per step
                    if extra is not None:
                        objective = objective + extra / options.grad_accum
                    accelerator.backward(objective)
                local_sum += summed.detach().float()
            grad_norm = None
            if options.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, options.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            # Methods that reallocate as they train (AdaLoRA's budget) do it from this step's gradients, under
            # peft's name for the call.
            reallocate = getattr(unwrapped.base_model, "update_and_allocate", None)
            if reallocate is not None:
                reallocate(state.step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals = accelerator.reduce(torch.stack([local_sum, torch.tensor(float(local_tokens),
                                                                              device=accelerator.device)]), "sum")
            loss, tokens = float(totals[0]) / targets, int(totals[1])
            state.step += 1
            state.tokens += tokens
            segment_tokens += tokens
            seconds = time.perf_counter() - segment_start
            speed = segment_tokens / seconds if seconds > 0 else 0.0
            if main:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                if state.step % options.log_steps == 0 or state.step == total_steps:
                    metrics.write({"kind": "train", "step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                                   "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                                   "tokens_per_s": round(speed, 1), "elapsed": round(elapsed_before + seconds, 2)})
            if options.eval_steps and eval_set and state.step % options.eval_steps == 0 and state.step < total_steps:
                t0 = time.perf_counter()
                stop = _eval_during_training(state, options, main, run_eval, metrics, unwrapped, out, bar)
                stop = broadcast_object_list([stop])[0]
                state.stopped_early = stop
                segment_start += time.perf_counter() - t0  # tokens/s and elapsed count training only
            if stop or state.step == total_steps or (options.save_steps and state.step % options.save_steps == 0):
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        latest = latest_checkpoint(out)
        kept = f"the last checkpoint is {os.path.basename(latest)}" if latest else "no checkpoint was written yet"
        raise TrainError(f"interrupted at step {state.step}; {kept}; continue with --resume {out}") from None
    bar.close()
    state.elapsed = elapsed_before + time.perf_counter() - segment_start

    # --- the end ----------------------------------------------------------------------------------------------------
    after, after_answers = None, {}
    if main:
        try:
            unwrapped.save_pretrained(os.path.join(out, "adapter"))
        except OSError as exc:
            raise write_failure(out, "the final adapter", exc) from None
        if eval_set:
            log("evaluating the trained adapter on the held-out examples...", True)
            after, after_answers = run_eval(generate=True)
            metrics.write({"kind": "eval", "phase": "after", "step": state.step, **after})
        png = plot_losses(metrics.path, os.path.join(out, "loss.png"))
        report = _report(options, state, total_steps, before, after, eval_set, show, before_answers, after_answers,
                         png, out)
        print(report, flush=True)
        summary = {"steps": state.step, "total_steps": total_steps, "elapsed": state.elapsed, "tokens": state.tokens,
                   "before": before, "after": after, "stopped_early": state.stopped_early,
                   "best_eval_loss": state.best_eval_loss, "best_step": state.best_step}
        try:
            with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
                json.dump(summary, fh, indent=2)
        except OSError as exc:
            raise write_failure(out, "summary.json", exc) from None
    accelerator.wait_for_everyone()
    return RunResult(out, state.step, before, after, state.elapsed, state.stopped_early)


def _pick_examples(examples: list[D.Example], n: int) -> list[int]:
    """``n`` held-out examples to show, taking the answers (labels) in turn when there are only a few kinds."""
    groups: dict[str | None, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.reference, []).append(i)
    if len(groups) > MAX_CHOICES:
        return list(range(min(n, len(examples))))
    picked: list[int] = []
    queues = [list(g) for g in groups.values()]
    while len(picked) < min(n, len(examples)):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked)


def _eval_during_training(state, options, main, run_eval, metrics, model, out, bar) -> bool:
    """Evaluate (main process), track the best adapter, and decide on early stopping."""
    if not main:
        return False
    result, _ = run_eval(generate=False)
    metrics.write({"kind": "eval", "step": state.step, **result})
    bar.write(f"step {state.step}: {_fmt_metrics(result)}", file=sys.stderr)
    loss = result["eval_loss"]
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.bad_evals = loss, state.step, 0
        try:
            model.save_pretrained(os.path.join(out, "best"))
        except OSError as exc:
            raise write_failure(out, "the best adapter", exc) from None
    else:
        state.bad_evals += 1
    patience = options.early_stopping_patience
    if patience is not None and state.bad_evals >= patience:
        bar.write(f"early stopping: no better eval loss for {patience} evaluation(s); best at step "
                  f"{state.best_step} (saved in {os.path.join(out, 'best')})", file=sys.stderr)
        return True
    return False


def _fmt_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for name, value in metrics.items():
        short = name.removeprefix("eval_")
        parts.append(f"{short} {value:.4f}" if name == "eval_loss" else f"{short} {100 * value:.1f}%")
    return ", ".join(parts)


def _report(options, state, total_steps, before, after, eval_set, show, before_answers, after_answers, png,
            out) -> str:
    lines = ["", f"== deltatune train: {out} =="]
    lines.append(
        f"{state.step}/{total_steps} steps in {format_duration(state.elapsed)} "
        f"({state.tokens / max(state.elapsed, 1e-9):.0f} tokens/s)"
        + (", stopped early" if state.stopped_early else "")
    )
    table = summary_table(before, after)
    if table:
        lines += ["", table]
    if show and (before_answers or after_answers):
        rows = [{"prompt": eval_set[i].prompt_text, "reference": eval_set[i].reference,
                 "before": before_answers.get(i), "after": after_answers.get(i)} for i in show]
        lines += ["", "held-out examples:", examples_table(rows)]
    lines += ["", f"adapter:  {os.path.join(out, 'adapter')}"]
    if state.best_step is not None:
        lines.append(f"best:     {os.path.join(out, 'best')} (eval loss {state.best_eval_loss:.4f} at step "
                     f"{state.best_step})")
    lines.append(f"metrics:  {os.path.join(out, 'metrics.jsonl')}" + (f", plot: {png}" if png else ""))
    lines.append(f"next:     deltatune generate {out} --prompt \"...\"   |   deltatune merge {out} --out merged/")
    return "\n".join(lines)

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

:func:`train` reads top to bottom as the run's phases: inputs (model, tokenizer, data: all checked before the run
directory changes), model and optimizer, resume, the run directory, the evaluation before training, the steps, and
the end (final adapter, evaluation after training, report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .. import get_peft_model, quant
from ..errors import DeltatuneError
from ..registry import get_method
from . import data as D
from .evaluate import MAX_CHOICES, evaluate, forward_logits, loss_sum
from .launch import launch_notes, start_accelerator
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
    run_lock,
    save_checkpoint,
    write_failure,
    write_run,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..model import PeftModel


@dataclass
class RunResult:
    """What :func:`train` returns: where things are and the before/after metrics."""

    out: str
    steps: int
    before: dict[str, float] | None
    after: dict[str, float] | None
    elapsed: float
    stopped_early: bool = False


ADAPTER = "default"  # the one adapter a run trains


def log(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


# --- the run --------------------------------------------------------------------------------------------------------

def train(options: TrainOptions) -> RunResult:
    """Run (or resume) one training run as described by ``options``; returns paths and metrics.

    The main process holds the run directory's lock (:func:`state.run_lock`) from start to end.

    Raises:
        TrainError: bad input, or another run holds ``options.out``; nothing in the run directory was changed
            (except by ``--overwrite`` after all inputs were checked).
    """
    accelerator = start_accelerator(options)
    assert options.out is not None
    with run_lock(options.out) if accelerator.is_main_process else contextlib.nullcontext():
        return _train(options, accelerator)


def _train(options: TrainOptions, accelerator: Accelerator) -> RunResult:
    """:func:`train` once the run directory is held."""
    main, world = accelerator.is_main_process, accelerator.num_processes
    resume_from = check_run_dir(options)  # raises before anything is written
    for note in launch_notes(world):
        log(note, main)

    inputs = _load_inputs(options, accelerator)
    model, optimizer, scheduler = _build_model(options, inputs, accelerator.device)
    state, rng_states = TrainerState(), None
    if resume_from is not None:
        state, rng_states = _resume(resume_from, model, optimizer, scheduler, world)
        log(f"resuming {options.out} from {os.path.basename(resume_from)} (step {state.step} of "
            f"{inputs.total_steps})", main)
    metrics = _open_run_dir(options, inputs, accelerator, state.step if resume_from is not None else None)
    if resume_from is None:
        _log_start(options, inputs, model, world, main)

    evaluator = _evaluator(options, inputs, model, accelerator)
    before = None
    if inputs.eval_set and main:
        before = _evaluate_base(evaluator, options.out, metrics, resume_from is not None)

    params = [p for p in model.parameters() if p.requires_grad]  # what gradient clipping measures
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if rng_states is not None:  # last, so that nothing before the first step shifts it
        restore_rng(rng_states[accelerator.process_index])
    run = Run(options, accelerator, inputs, model, wrapped, params, optimizer, scheduler, state, metrics, evaluator)
    _run_steps(run)
    return _finish(run, before)


# --- inputs ---------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Model, tokenizer and data of a run, read and checked before the run directory changes, and the step counts.

    Attributes:
        model_dir: Directory (or cached hub id) the base model and tokenizer load from.
        tokenizer: The model's tokenizer; its pad id pads every batch.
        task: ``causal-lm``, ``seq2seq``, ``seq-cls`` or ``token-cls``.
        columns: Which record fields hold prompt, completion, text and label.
        labels: Class names for the classification tasks, in the order of the head's outputs.
        train_set: Tokenised training examples.
        eval_set: Tokenised held-out examples (may be empty).
        global_batch: Examples per optimizer step: ``batch_size x processes x grad_accum``.
        steps_per_epoch: Optimizer steps per pass over ``train_set``.
        total_steps: Optimizer steps of the whole run (what the LR schedule and AdaLoRA's budget count to).
    """

    model_dir: str
    tokenizer: Any
    task: str
    columns: D.Columns
    labels: list[str] | None
    train_set: list[D.Example]
    eval_set: list[D.Example]
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def _load_inputs(options: TrainOptions, accelerator: Accelerator) -> Inputs:
    """Resolve the model, load its config and tokenizer, read and tokenise the data, and count the steps.

    Everything here can fail on bad input, so all of it runs before the run directory changes.

    Raises:
        TrainError: the model, tokenizer or data cannot be used, or the options do not fit them.
    """
    from transformers import AutoConfig

    from .presets import resolve_model

    with accelerator.main_process_first():  # a .gguf model is converted once, by the main process
        model_dir = resolve_model(options.model, is_main_process=accelerator.is_main_process)
    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load model {options.model!r}: {str(exc).splitlines()[0]}") from None
    tokenizer = load_tokenizer(model_dir)
    task, columns, labels, train_set, eval_set = _read_examples(options, model_config, tokenizer)
    global_batch, steps_per_epoch, total_steps = _count_steps(len(train_set), options, accelerator.num_processes)
    return Inputs(model_dir, tokenizer, task, columns, labels, train_set, eval_set, global_batch, steps_per_epoch,
                  total_steps)


def _read_examples(
    options: TrainOptions, model_config: Any, tokenizer: Any,
) -> tuple[str, D.Columns, list[str] | None, list[D.Example], list[D.Example]]:
    """The task, the columns and labels, and the tokenised training and held-out examples.

    The held-out examples come from ``--eval-data``, else from the data's own eval split (a dataset directory's),
    else from ``--eval-split`` of the training records; labels are collected over both sets so that the
    classification head covers every class.
    """
    train_records, eval_records = D.read_records(options.data)
    if options.eval_data is not None:
        eval_records, _ = D.read_records(options.eval_data)
    task = infer_task(model_config, train_records, options.task)
    if options.chat and task != "causal-lm":
        raise TrainError(f"--chat does not apply to --task {task} (only to causal-lm)")
    explicit_columns = {"prompt": options.prompt_column, "completion": options.completion_column,
                        "text": options.text_column, "label": options.label_column,
                        "task_id": options.task_id_column}
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
    return task, columns, labels, train_set, eval_set


def _count_steps(examples: int, options: TrainOptions, world: int) -> tuple[int, int, int]:
    """The global batch, the steps per epoch and the run's total steps, for ``examples`` training examples.

    An epoch's last, short global batch still makes a step when every process and micro-step gets an example from it
    (``processes x grad_accum`` of them); a shorter remainder is left out of that epoch.

    Raises:
        TrainError: there are fewer examples than one step needs.
    """
    global_batch = options.batch_size * world * options.grad_accum
    parts = world * options.grad_accum
    steps_per_epoch = examples // global_batch + (1 if examples % global_batch >= parts else 0)
    if steps_per_epoch == 0:
        raise TrainError(
            f"{examples} training examples are fewer than one step needs ({parts} = processes x --grad-accum)"
        )
    total_steps = options.max_steps or max(1, math.ceil(options.epochs * steps_per_epoch))
    return global_batch, steps_per_epoch, total_steps


# --- model and optimizer --------------------------------------------------------------------------------------------

def _loss_sum(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The micro-batch's summed loss: from the chunked loss of :meth:`PeftModel.enable_fast_training` where it is on
    (no logits), else from the logits."""
    task, state = run.inputs.task, run.model.fast_training
    methods = [get_method(c.peft_type) for c in run.model.peft_config.values()]
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "task_ids") if k in batch}
    if any(getattr(m, "run_scope", None) for m in methods):
        # the forward finishes outputs.loss with a term of its own given labels (Shadow's auxiliary loss): the
        # outputs' mean, times this micro-batch's targets, is the summed loss with that term, as Trainer sees it
        targets = labels[:, 1:] if task == "causal-lm" else labels
        return run.wrapped(**inputs).loss * (targets != D.IGNORE).sum()
    # A method with a loss term (AdaLoRA) gets it added to outputs.loss by the model; this loop adds it once per step.
    has_term = any(getattr(m, "loss_term", None) for m in methods)
    if state is None or not state.chunked_loss or task not in ("causal-lm", "seq2seq") or has_term:
        return loss_sum(task, forward_logits(run.wrapped, task, batch), labels)
    if task == "causal-lm":  # divided by one: the sum, as loss_sum gives it
        return run.wrapped(**inputs, use_cache=False, num_items_in_batch=torch.ones((), device=labels.device)).loss
    return run.wrapped(**inputs).loss * (labels != D.IGNORE).sum()  # seq2seq (T5): the mean, times its targets


def _build_model(
    options: TrainOptions, inputs: Inputs, device: torch.device,
) -> tuple[PeftModel, Optimizer, LRScheduler]:
    """The base model with a fresh adapter on ``device``, its optimizer and its learning-rate scheduler.

    The seed is set before loading the base model (a new classification head is initialised then) and again after
    it, so the adapter's initialisation does not depend on what loading drew.

    Raises:
        TrainError: the method's options do not fit the model.
    """
    from accelerate.utils import set_seed

    set_seed(options.seed)
    base = load_model(inputs.model_dir, inputs.task, inputs.labels, inputs.tokenizer.pad_token_id,
                      quantize=options.quantize, device=device)
    set_seed(options.seed)
    peft_config = build_peft_config(options, inputs.task, inputs.total_steps,
                                    D.task_count(inputs.train_set + inputs.eval_set))
    try:
        model = get_peft_model(base, peft_config)
    except DeltatuneError as exc:
        raise TrainError(str(exc)) from None
    if options.gradient_checkpointing:
        # Non-reentrant checkpointing gives the adapters their gradients behind a frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.quantize is None:  # a quantized base was loaded onto the device (bitsandbytes 8-bit cannot move)
        model.to(device)
    if options.fast:  # after the move: the compute dtype follows the device; a quantized base keeps its own
        fast_options: dict[str, Any] = {"compute_dtype": None} if options.quantize else {}
        if options.memory_budget is not None:  # measured on the batch of the longest examples
            longest = sorted(inputs.train_set, key=lambda e: len(e.input_ids))[-options.batch_size:]
            sample = D.collate(longest, inputs.task, inputs.tokenizer.pad_token_id)
            fast_options.update(memory_budget=options.memory_budget,
                                sample_batch={k: v.to(device) for k, v in sample.items()})
        try:
            model.enable_fast_training(**fast_options)
        except DeltatuneError as exc:
            raise TrainError(str(exc)) from None
    optimizer = _optimizer(model, options)
    return model, optimizer, _scheduler(optimizer, options, inputs.total_steps)


def _optimizer(model: PeftModel, options: TrainOptions) -> Optimizer:
    """AdamW over the trainable parameters, with ``--weight-decay`` on matrices only (no decay on biases and other
    vectors, as usual for AdamW)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=options.lr)


def _scheduler(optimizer: Optimizer, options: TrainOptions, total_steps: int) -> LRScheduler:
    """``--lr-schedule`` over ``total_steps``, after ``--warmup-steps`` (or ``--warmup-ratio`` of the run)."""
    from transformers import get_scheduler

    warmup = options.warmup_steps if options.warmup_steps is not None else int(options.warmup_ratio * total_steps)
    return get_scheduler(
        {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[options.lr_schedule],
        optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
    )


# --- resume and the run directory -----------------------------------------------------------------------------------

def _resume(path: str, model: PeftModel, optimizer: Optimizer, scheduler: LRScheduler,
            world: int) -> tuple[TrainerState, list[dict[str, Any]]]:
    """Put checkpoint ``path``'s adapter (with its training state), optimizer and scheduler back.

    Returns:
        The trainer state, and every process's RNG state: :func:`train` restores this process's only right before
        the first step, after the base model's evaluation and ``accelerator.prepare``, so the steps draw exactly what
        the uninterrupted run drew.

    Raises:
        TrainError: the checkpoint does not fit this run, or was written by a different number of processes (each
            process's data shard and RNG state would differ).
    """
    ckpt = load_checkpoint(path)
    restore_adapter(model, ADAPTER, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"]
    if len(rng) != world:
        raise TrainError(
            f"--resume: the checkpoint was written by {len(rng)} process(es); resume it with the same number "
            f"(this launch has {world})"
        )
    return ckpt["state"], rng


def _open_run_dir(options: TrainOptions, inputs: Inputs, accelerator: Accelerator,
                  resume_step: int | None) -> MetricsLog | None:
    """Write ``run.json`` (after clearing the directory for ``--overwrite``) and open ``metrics.jsonl``.

    These are the first changes to the run directory, made once every input has been checked. A resumed run drops
    the metrics its killed process logged after ``resume_step``. Returns the metrics log on the main process.
    """
    out = options.out
    assert out is not None
    if accelerator.is_main_process:
        if options.overwrite and os.path.isdir(out) and not options.resume:
            clear_run_dir(out)
        info = {"model_dir": inputs.model_dir, "task": inputs.task, "labels": inputs.labels, "chat": options.chat,
                "columns": dataclasses.asdict(inputs.columns), "total_steps": inputs.total_steps,
                "steps_per_epoch": inputs.steps_per_epoch, "processes": accelerator.num_processes,
                "global_batch": inputs.global_batch}
        try:
            write_run(out, options, info)
        except OSError as exc:
            raise write_failure(out, "run.json", exc) from None
    accelerator.wait_for_everyone()
    return MetricsLog(out, resume_step=resume_step) if accelerator.is_main_process else None


def _log_start(options: TrainOptions, inputs: Inputs, model: PeftModel, world: int, main: bool) -> None:
    """What a fresh run trains: model and adapter sizes, data and steps."""
    trainable, total = model.get_nb_trainable_parameters()
    log(f"model {options.model} ({inputs.task}, {total - trainable:,} parameters) + {options.method} adapter "
        f"({trainable:,} trainable, {100 * trainable / total:.2f}%)", main)
    log(f"data: {len(inputs.train_set)} training / {len(inputs.eval_set)} held-out examples; {inputs.total_steps} "
        f"steps of {inputs.global_batch} examples ({world} process(es) x {options.batch_size} x {options.grad_accum} "
        f"accumulation)", main)
    state = model.fast_training
    if state is not None:
        parts = [name for name, on in (("chunked loss", state.chunked_loss),
                                       (f"{state.compute_dtype} base".replace("torch.", ""), state.compute_dtype),
                                       (f"checkpointing 1 decoder layer in {state.checkpoint_every}",
                                        state.checkpoint_every))
                 if on]
        log(f"fast training: {', '.join(parts) or 'nothing applies'}"
            + "".join(f"; {note}" for note in state.notes) + " (--no-fast: the standard path)", main)


# --- held-out evaluation --------------------------------------------------------------------------------------------

class Evaluation(NamedTuple):
    """One held-out evaluation: its metrics (``eval_loss``, ``eval_accuracy``, ...) and the answers of the examples
    the report shows, by index into the held-out set."""

    metrics: dict[str, float]
    answers: dict[int, str]


@dataclass
class Evaluator:
    """Held-out evaluation of the adapter model, set up once for the evaluations before, during and after training.

    Attributes:
        choices: The distinct reference answers with their token ids, when there are few of them (labels written as
            text): the model is then also scored on which of them it finds likeliest.
        show: Held-out examples whose answers (before and after training) the final report shows.
    """

    model: PeftModel
    inputs: Inputs
    batch_size: int
    generate_n: int
    accelerator: Accelerator
    choices: list[tuple[str, list[int]]] | None
    show: list[int]

    def __call__(self, generate: bool) -> Evaluation:
        """The metrics; with ``generate``, also generated answers: the first ``--eval-generate`` examples scored by
        exact match, and those in ``show``."""
        inputs = self.inputs
        return Evaluation(*evaluate(
            self.model, inputs.eval_set, task=inputs.task, tokenizer=inputs.tokenizer, batch_size=self.batch_size,
            device=self.accelerator.device, label_names=inputs.labels, choices=self.choices,
            generate_n=self.generate_n if generate else 0, answer_indices=self.show if generate else (),
            autocast=self.accelerator.autocast,
        ))


def _evaluator(options: TrainOptions, inputs: Inputs, model: PeftModel, accelerator: Accelerator) -> Evaluator:
    """The held-out evaluation of ``model``; answers are scored as choices when the data has only a few kinds."""
    choices = None
    tokenizer = inputs.tokenizer
    if inputs.task in ("causal-lm", "seq2seq") and inputs.columns.completion is not None:
        distinct = sorted({e.reference for e in inputs.train_set + inputs.eval_set if e.reference is not None})
        if 2 <= len(distinct) <= MAX_CHOICES:
            causal = inputs.task == "causal-lm"
            eos = [tokenizer.eos_token_id] if causal and tokenizer.eos_token_id is not None else []
            choices = [(d, tokenizer(d, add_special_tokens=False)["input_ids"] + eos) if causal
                       else (d, tokenizer(text_target=d)["input_ids"]) for d in distinct]
    return Evaluator(model, inputs, options.batch_size, options.eval_generate, accelerator, choices,
                     _pick_examples(inputs.eval_set, options.show_examples))


def _evaluate_base(evaluator: Evaluator, out: str, metrics: MetricsLog, resumed: bool) -> Evaluation:
    """The held-out metrics before training (main process; the fresh adapter leaves the base model's outputs as they
    are), kept in ``before.json`` so that a resumed run, whose adapter is no longer fresh, reports them too."""
    path = os.path.join(out, "before.json")
    if resumed and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        return Evaluation(saved["metrics"], {int(k): v for k, v in saved["answers"].items()})
    log("evaluating the base model on the held-out examples...", True)
    t0 = time.perf_counter()
    before = evaluator(generate=True)
    log(f"  {_fmt_metrics(before.metrics)} ({format_duration(time.perf_counter() - t0)})", True)
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"metrics": before.metrics, "answers": before.answers}, fh)
    except OSError as exc:
        raise write_failure(out, "before.json", exc) from None
    metrics.write({"kind": "eval", "phase": "before", "step": 0, **before.metrics})
    return before


def _metrics(evaluation: Evaluation | None) -> dict[str, float] | None:
    return evaluation.metrics if evaluation else None


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


def _fmt_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for name, value in metrics.items():
        short = name.removeprefix("eval_")
        parts.append(f"{short} {value:.4f}" if name == "eval_loss" else f"{short} {100 * value:.1f}%")
    return ", ".join(parts)


# --- the steps ------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the steps and the end of a run share, once :func:`train` has set everything up.

    Attributes:
        model: The adapter model itself: evaluation, saving, the adapter's per-step hooks.
        wrapped: What ``accelerator.prepare`` made of ``model`` (DDP's wrapper in a multi-process run): forward and
            backward go through it so that gradients are synchronised.
        params: The trainable parameters, in the model's order: what gradient clipping measures.
        metrics: ``metrics.jsonl`` (main process only).
    """

    options: TrainOptions
    accelerator: Accelerator
    inputs: Inputs
    model: PeftModel
    wrapped: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: Optimizer
    scheduler: LRScheduler
    state: TrainerState
    metrics: MetricsLog | None
    evaluate: Evaluator

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def out(self) -> str:
        assert self.options.out is not None
        return self.options.out


class StepStats(NamedTuple):
    """What one optimizer step reports, summed over processes."""

    loss: float  # mean loss per target token of the global batch
    tokens: int  # non-padding input tokens
    grad_norm: float | None  # before clipping; None without --max-grad-norm
    lr: float  # the learning rate the step used


@dataclass
class _Clock:
    """Training time and tokens since this process started or resumed the run, evaluation excluded: what tokens/s
    and :attr:`TrainerState.elapsed` count."""

    elapsed_before: float  # seconds of the segments before a resume
    start: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def elapsed(self) -> float:
        return self.elapsed_before + self.seconds()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0


def _run_steps(run: Run) -> None:
    """Step until ``total_steps`` or early stopping, logging, evaluating and checkpointing as the options ask.

    The data position is the step count: step ``s`` takes global batch ``s mod steps_per_epoch`` of epoch
    ``s // steps_per_epoch``, whose order is a pure function of seed and epoch, so a resumed run goes on exactly
    where its checkpoint was.

    Raises:
        TrainError: interrupted (Ctrl-C), naming the checkpoint to resume from; or a failed write.
    """
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    options, inputs, state = run.options, run.inputs, run.state
    total = inputs.total_steps
    bar = tqdm(total=total, initial=state.step, disable=not (run.main and options.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    clock = _Clock(state.elapsed)
    epoch_batches = functools.lru_cache(maxsize=1)(  # one epoch's global batches at a time
        functools.partial(D.global_batches, len(inputs.train_set), inputs.global_batch, options.seed))

    def every(steps: int) -> bool:  # 0: never
        return bool(steps) and state.step % steps == 0

    stop = state.stopped_early  # a run that stopped early stays stopped when resumed
    try:
        while state.step < total and not stop:
            epoch, index = divmod(state.step, inputs.steps_per_epoch)
            stats = _step(run, epoch_batches(epoch)[index])
            state.step += 1
            state.tokens += stats.tokens
            clock.tokens += stats.tokens
            if run.main:
                _log_step(run, stats, clock, bar)
            if every(options.eval_steps) and inputs.eval_set and state.step < total:
                with clock.paused():  # tokens/s and elapsed count training only
                    stop = run.main and _eval_during_training(run, bar)
                    stop = state.stopped_early = broadcast_object_list([stop])[0]
            if stop or state.step == total or every(options.save_steps):
                _checkpoint(run, clock)
    except KeyboardInterrupt:
        bar.close()
        latest = latest_checkpoint(run.out)
        kept = f"the last checkpoint is {os.path.basename(latest)}" if latest else "no checkpoint was written yet"
        raise TrainError(f"interrupted at step {state.step}; {kept}; continue with --resume {run.out}") from None
    bar.close()
    state.elapsed = clock.elapsed()


def _step(run: Run, indices: list[int]) -> StepStats:
    """One optimizer step over the global batch ``indices`` (the module docstring says why its loss is scaled so).

    At accumulation step ``a`` this process takes micro-batch ``a x processes + rank``; gradients are synchronised
    between processes at the last one only.
    """
    options, accelerator, inputs = run.options, run.accelerator, run.inputs
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    micro = D.shard(indices, world * options.grad_accum)
    targets = sum(inputs.train_set[i].targets for i in indices)
    run.wrapped.train()
    local_sum = torch.zeros((), device=device)
    local_tokens = 0
    for a in range(options.grad_accum):
        chunk = [inputs.train_set[i] for i in micro[a * world + rank]]
        batch = {k: v.to(device) for k, v in D.collate(chunk, inputs.task, inputs.tokenizer.pad_token_id).items()}
        local_tokens += int(batch["attention_mask"].sum())
        sync = contextlib.nullcontext() if a == options.grad_accum - 1 else accelerator.no_sync(run.wrapped)
        with sync, accelerator.autocast():
            summed = _loss_sum(run, batch)
            objective = summed * (world / targets)
            extra = run.model.base_model.adapter_loss()  # e.g. AdaLoRA's regulariser, once per step
            if extra is not None:
                objective = objective + extra / options.grad_accum
            accelerator.backward(objective)
        local_sum += summed.detach().float()
    grad_norm = None
    if options.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(run.params, options.max_grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    # Methods that act on this step's gradients (AdaLoRA's budget) do it here.
    run.model.base_model.after_optimizer_step(run.state.step)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    totals = accelerator.reduce(torch.stack([local_sum, torch.tensor(float(local_tokens), device=device)]), "sum")
    return StepStats(float(totals[0]) / targets, int(totals[1]), grad_norm, lr)


def _log_step(run: Run, stats: StepStats, clock: _Clock, bar: tqdm) -> None:
    """The progress bar, and a ``train`` line in ``metrics.jsonl`` every ``--log-steps`` steps and at the last."""
    state = run.state
    seconds = clock.seconds()
    speed = clock.tokens / seconds if seconds > 0 else 0.0
    bar.update(1)
    bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", tok_s=f"{speed:.0f}")
    if state.step % run.options.log_steps == 0 or state.step == run.inputs.total_steps:
        run.metrics.write({"kind": "train", "step": state.step,
                           "epoch": round(state.step / run.inputs.steps_per_epoch, 4), "loss": stats.loss,
                           "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": state.tokens,
                           "tokens_per_s": round(speed, 1), "elapsed": round(clock.elapsed_before + seconds, 2)})


def _eval_during_training(run: Run, bar: tqdm) -> bool:
    """Evaluate (main process), keep the best adapter in ``best/``, and say whether early stopping ends the run."""
    state = run.state
    result = run.evaluate(generate=False).metrics
    run.metrics.write({"kind": "eval", "step": state.step, **result})
    bar.write(f"step {state.step}: {_fmt_metrics(result)}", file=sys.stderr)
    loss = result["eval_loss"]
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.bad_evals = loss, state.step, 0
        try:
            run.model.save_pretrained(os.path.join(run.out, "best"))
        except OSError as exc:
            raise write_failure(run.out, "the best adapter", exc) from None
    else:
        state.bad_evals += 1
    patience = run.options.early_stopping_patience
    if patience is not None and state.bad_evals >= patience:
        bar.write(f"early stopping: no better eval loss for {patience} evaluation(s); best at step "
                  f"{state.best_step} (saved in {os.path.join(run.out, 'best')})", file=sys.stderr)
        return True
    return False


def _checkpoint(run: Run, clock: _Clock) -> None:
    """Save a checkpoint: the main process writes it, with every process's RNG state."""
    from accelerate.utils import gather_object

    run.state.elapsed = clock.elapsed()
    rng_states = gather_object([capture_rng()])
    if run.main:
        model = run.model
        save_checkpoint(
            run.out, run.state, model.peft_config[ADAPTER].to_json_string(), model.adapter_state_dict(ADAPTER),
            run.optimizer.state_dict(), run.scheduler.state_dict(), rng_states, run.options.save_total_limit,
            adapter_train_state(model, ADAPTER),
        )
    run.accelerator.wait_for_everyone()


# --- the end --------------------------------------------------------------------------------------------------------

def _finish(run: Run, before: Evaluation | None) -> RunResult:
    """Save the final adapter, evaluate it, and write the loss plot, the report (stdout) and ``summary.json``.

    The main process does it all; the others wait, so that every process returns with the run directory complete.
    """
    state = run.state
    after = None
    if run.main:
        try:
            run.model.save_pretrained(os.path.join(run.out, "adapter"))
        except OSError as exc:
            raise write_failure(run.out, "the final adapter", exc) from None
        if run.inputs.eval_set:
            log("evaluating the trained adapter on the held-out examples...", True)
            after = run.evaluate(generate=True)
            run.metrics.write({"kind": "eval", "phase": "after", "step": state.step, **after.metrics})
        png = plot_losses(run.metrics.path, os.path.join(run.out, "loss.png"))
        print(_report(run, before, after, png), flush=True)
        _write_summary(run, before, after)
    run.accelerator.wait_for_everyone()
    return RunResult(run.out, state.step, _metrics(before), _metrics(after), state.elapsed, state.stopped_early)


def _write_summary(run: Run, before: Evaluation | None, after: Evaluation | None) -> None:
    """``summary.json``: the run's outcome, for scripts."""
    state = run.state
    summary = {"steps": state.step, "total_steps": run.inputs.total_steps, "elapsed": state.elapsed,
               "tokens": state.tokens, "before": _metrics(before), "after": _metrics(after),
               "stopped_early": state.stopped_early, "best_eval_loss": state.best_eval_loss,
               "best_step": state.best_step}
    if run.options.quantize is not None:
        summary["quantize"] = run.options.quantize
        summary["base_bytes"], summary["base_dense_bytes"] = quant.weight_bytes(run.model.get_base_model())
    try:
        with open(os.path.join(run.out, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    except OSError as exc:
        raise write_failure(run.out, "summary.json", exc) from None


def _report(run: Run, before: Evaluation | None, after: Evaluation | None, png: str | None) -> str:
    """The end-of-run summary printed to stdout: steps and speed, metrics before/after, example answers, paths."""
    state, out, show = run.state, run.out, run.evaluate.show
    lines = ["", f"== deltatune train: {out} =="]
    lines.append(
        f"{state.step}/{run.inputs.total_steps} steps in {format_duration(state.elapsed)} "
        f"({state.tokens / max(state.elapsed, 1e-9):.0f} tokens/s)"
        + (", stopped early" if state.stopped_early else "")
    )
    if run.options.quantize is not None:
        actual, dense = quant.weight_bytes(run.model.get_base_model())
        lines.append(f"base model quantized {run.options.quantize}: {actual / 2**20:.1f} MiB of weights in memory, "
                     f"{dense / 2**20:.1f} MiB unquantized ({dense / max(actual, 1):.1f}x less)")
    table = summary_table(_metrics(before), _metrics(after))
    if table:
        lines += ["", table]
    before_answers = before.answers if before else {}
    after_answers = after.answers if after else {}
    if show and (before_answers or after_answers):
        eval_set = run.inputs.eval_set
        rows = [{"prompt": eval_set[i].prompt_text, "reference": eval_set[i].reference,
                 "before": before_answers.get(i), "after": after_answers.get(i)} for i in show]
        lines += ["", "held-out examples:", examples_table(rows)]
    lines += ["", f"adapter:  {os.path.join(out, 'adapter')}"]
    if state.best_step is not None:
        lines.append(f"best:     {os.path.join(out, 'best')} (eval loss {state.best_eval_loss:.4f} at step "
                     f"{state.best_step})")
    lines.append(f"metrics:  {os.path.join(out, 'metrics.jsonl')}" + (f", plot: {png}" if png else ""))
    if run.options.task_id_column is None:
        lines.append(f"next:     deltatune generate {out} --prompt \"...\"   |   deltatune merge {out} --out merged/")
    else:  # a task-routed adapter does not merge
        lines.append(f"next:     deltatune generate {out} --task-id N --prompt \"...\"")
    return "\n".join(lines)

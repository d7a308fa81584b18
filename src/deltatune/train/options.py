"""Everything a training run is made of, as one flat dataclass: the CLI fills it, ``run.json`` stores it.

Two runs with the same options (ignoring :data:`NOT_IDENTITY`) compute the same thing; that is how a run directory
knows whether it holds "this" run (``--resume`` continues it) or another one (refused without ``--overwrite``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DeltatuneError
from ..fast import parse_bytes
from ..quant import CLI_QUANTIZATIONS

TASKS = ("causal-lm", "seq2seq", "seq-cls", "token-cls")
SCHEDULES = ("linear", "cosine", "constant")
QUANTIZATIONS = CLI_QUANTIZATIONS

# Options that change where or how a run reports, not what it computes.
# (memory_budget only chooses which layers recompute their activations: the numbers are the same)
NOT_IDENTITY = frozenset({"out", "resume", "overwrite", "progress", "preset", "memory_budget"})


class TrainError(DeltatuneError):
    """Bad training input (data, model path, options, run directory); the message says what to change."""


@dataclass
class TrainOptions:
    """One training run. ``None`` means "the default for this task / method / model".

    Attributes:
        model: Base model: a local transformers directory, a ``.gguf`` file, a built-in name
            (``smollm2-135m-instruct``, ``all-minilm-l6-v2``) or a hub id already in the local cache.
        data: Training data: a ``.jsonl``/``.json``/``.csv``/``.tsv`` file, a directory holding ``train.<ext>``
            (and optionally ``validation.<ext>``), a ``datasets.save_to_disk`` directory, or a built-in name
            (``polarity``).
        eval_data: Held-out data in the same forms; without it ``eval_split`` of ``data`` is held out.
        eval_split: Fraction (< 1) or number (>= 1) of examples of ``data`` held out for evaluation when there is
            no ``eval_data``; 0 disables evaluation.
        task: ``causal-lm``, ``seq2seq``, ``seq-cls`` or ``token-cls``; ``None`` infers it from the model.
        text_column: Column with the text (causal LM on raw text, sequence / token classification input).
        prompt_column: Column with the prompt (causal LM: no loss on it; seq2seq: the source).
        completion_column: Column with the completion (causal LM) or target (seq2seq).
        label_column: Column with the label (seq-cls: a string or int; token-cls: a list, one per word).
        task_id_column: Column with each example's task index (an integer from 0), passed to the model as
            ``task_ids``: what ``--method poly`` and ``multitask_prompt_tuning`` route or prompt by (their ``n_tasks``
            / ``num_tasks`` default to the largest index + 1); refused for methods that take no task ids.
        chat: Wrap each prompt as a user turn with the tokenizer's chat template (instruct models).
        max_length: Longest tokenised example; longer prompts lose their beginning, longer texts their end.
        method: The PEFT method (``lora``).
        r: LoRA rank.
        lora_alpha: LoRA scale numerator (update scaled by ``lora_alpha / r``); ``None``: ``2 * r``.
        lora_dropout: Dropout on the LoRA input.
        target: Modules to adapt: ``all-linear``, a regex, or a comma-separated list of names/suffixes.
        exclude: Modules never adapted (same forms as ``target``).
        layers: Comma-separated layer indices to adapt (``layers_to_transform``).
        modules_to_save: Comma-separated modules trained in full and saved with the adapter.
        use_dora: DoRA (weight-decomposed LoRA).
        use_rslora: rsLoRA scaling ``alpha / sqrt(r)``.
        init_lora_weights: LoRA init scheme (``true``, ``gaussian``, ``pissa``, ``olora``, ...).
        method_options: Any other field of the method's config, ``{name: value}``.
        epochs: Passes over the training data (may be fractional).
        max_steps: Optimizer steps to run; overrides ``epochs`` when set.
        batch_size: Examples per device per micro-step.
        grad_accum: Micro-steps accumulated per optimizer step. Global batch = batch_size x processes x grad_accum.
        lr: Peak learning rate.
        lr_schedule: ``linear`` (decay to 0), ``cosine`` or ``constant`` after warmup.
        warmup_ratio: Fraction of the optimizer steps spent warming up linearly from 0 (ignored if warmup_steps).
        warmup_steps: Warmup length in optimizer steps.
        weight_decay: AdamW weight decay for matrices (never for biases, norms or DoRA magnitudes).
        max_grad_norm: Clip the global gradient norm to this; 0 disables clipping.
        gradient_checkpointing: Recompute activations in backward to save memory.
        bf16: bfloat16 autocast (mixed precision); adapter weights stay float32.
        quantize: Load the base model quantized (QLoRA, ``docs/quantization.md``): ``nf4`` (bitsandbytes 4-bit NF4
            with double quantization), ``int8`` (bitsandbytes LLM.int8) or ``torchao-int8`` (torchao int8
            weight-only); ``None``: full precision.
        fast: :meth:`PeftModel.enable_fast_training` with its defaults: the chunked loss where the model supports it,
            the frozen base in bfloat16 where the hardware computes it fast (``docs/fast-training.md``).
        memory_budget: With ``fast``: the step memory (e.g. ``"6GiB"``) to fit by checkpointing the fewest decoder
            layers, measured on the longest training batch (``enable_fast_training(memory_budget=...)``).
        seed: Seeds adapter init, data order and dropout.
        eval_steps: Evaluate every N optimizer steps (plus before and after training); 0: only before and after.
        early_stopping_patience: Stop after this many evaluations without a better eval loss; ``None``: never.
        eval_generate: How many held-out examples to answer by greedy generation for the exact-match metric
            (causal LM / seq2seq with completions); 0 disables it.
        show_examples: How many held-out examples to print with the model's answers before and after training.
        log_steps: Write a metrics line every N optimizer steps.
        save_steps: Checkpoint every N optimizer steps (and at the end); 0: only at the end.
        save_total_limit: Checkpoints kept; older ones are deleted after a newer one is complete.
        out: Run directory.
        overwrite: Replace a run directory that holds a different run.
        resume: Run directory to continue from its last checkpoint.
        progress: Show a progress bar.
        preset: The preset the defaults came from (informational).
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    eval_split: float = 0.1
    task: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    label_column: str | None = None
    task_id_column: str | None = None
    chat: bool = False
    max_length: int = 512
    method: str = "lora"
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target: str | None = None
    exclude: str | None = None
    layers: str | None = None
    modules_to_save: str | None = None
    use_dora: bool | None = None
    use_rslora: bool | None = None
    init_lora_weights: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    quantize: str | None = None
    fast: bool = True
    memory_budget: str | None = None
    seed: int = 0
    eval_steps: int = 0
    early_stopping_patience: int | None = None
    eval_generate: int = 64
    show_examples: int = 3
    log_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    out: str | None = None
    overwrite: bool = False
    resume: str | None = None
    progress: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values that need no model or data; raises :class:`TrainError` with the option's CLI name."""
        def bad(name: str, why: str) -> TrainError:
            return TrainError(f"--{name.replace('_', '-')} {why}")

        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise bad("quantize", f"must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.task is not None and self.task not in TASKS:
            raise bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        for name in ("batch_size", "grad_accum", "max_length", "log_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "eval_generate", "show_examples", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be at least 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise bad("epochs", f"must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise bad("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise bad("warmup_steps", f"must not be negative, got {self.warmup_steps}")
        if self.eval_split < 0:
            raise bad("eval_split", f"must not be negative, got {self.eval_split}")
        if self.memory_budget is not None:
            if not self.fast or self.gradient_checkpointing:
                raise bad("memory_budget", "chooses the layers the fast path checkpoints; it cannot be used with "
                                           "--no-fast or --gradient-checkpointing (which checkpoints every layer)")
            try:
                parse_bytes(self.memory_budget, "--memory-budget")
            except ConfigError as exc:
                raise TrainError(str(exc)) from None
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise bad("early_stopping_patience", f"must be at least 1, got {self.early_stopping_patience}")

    # --- identity and persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """The options that decide what the run computes."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}

    def differences(self, other: TrainOptions) -> list[str]:
        """CLI names of the identity options whose values differ from ``other``'s."""
        mine, theirs = self.identity(), other.identity()
        return ["--" + k.replace("_", "-") for k in mine if mine[k] != theirs.get(k)]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainOptions)]

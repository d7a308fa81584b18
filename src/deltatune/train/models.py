"""The base model, its tokenizer and task, and the method config: everything ``train``, ``generate`` and ``merge``
build the same way from a run's options."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import TaskType
from ..errors import DeltatuneError
from ._quiet import quiet_transformers
from .options import TrainError, TrainOptions

TASK_TYPES = {
    "causal-lm": TaskType.CAUSAL_LM,
    "seq2seq": TaskType.SEQ_2_SEQ_LM,
    "seq-cls": TaskType.SEQ_CLS,
    "token-cls": TaskType.TOKEN_CLS,
}


def infer_task(model_config, records: list[dict[str, Any]], explicit: str | None) -> str:
    """The task: ``--task`` if given, else from the model's architecture, else from the data's columns."""
    if explicit:
        return explicit
    if getattr(model_config, "is_encoder_decoder", False):
        return "seq2seq"
    for arch in getattr(model_config, "architectures", None) or []:
        for suffix, task in (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                             ("ForSequenceClassification", "seq-cls"), ("ForTokenClassification", "token-cls"),
                             ("ForConditionalGeneration", "seq2seq")):
            if arch.endswith(suffix):
                return task
    first = records[0]
    if "tags" in first:
        return "token-cls"
    if "label" in first:
        return "seq-cls"
    raise TrainError(
        f"cannot tell the task from the model ({getattr(model_config, 'architectures', None)}) or the data's "
        f"columns {sorted(first)}; pass --task ({', '.join(TASK_TYPES)})"
    )


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load a tokenizer from {model_dir!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise TrainError(f"the tokenizer of {model_dir!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str, task: str, labels: list[str] | None, pad_token_id: int | None = None,
               dtype: torch.dtype = torch.float32, quantize: str | None = None, device: torch.device | None = None):
    """The base model with the head ``task`` needs (a fresh classification head sized for ``labels``); with
    ``quantize`` (a ``--quantize`` choice) loaded quantized onto ``device`` (default CPU) and prepared for training
    (``quant.prepare_model_for_kbit_training``, without gradient checkpointing, which ``--gradient-checkpointing``
    decides)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    auto = {
        "causal-lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
        "seq-cls": AutoModelForSequenceClassification, "token-cls": AutoModelForTokenClassification,
    }[task]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize is not None:
        from .. import quant

        try:
            kwargs["quantization_config"] = quant.transformers_config(quantize, dtype)
        except DeltatuneError as exc:
            raise TrainError(str(exc)) from None
        kwargs["device_map"] = {"": str(device or "cpu")}
    if labels is not None:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    try:
        with quiet_transformers():  # "newly initialized head" is expected: the head trains with the adapter
            model = auto.from_pretrained(model_dir, **kwargs)
    except ValueError as exc:
        raise TrainError(f"{model_dir!r} cannot be loaded for --task {task}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise TrainError(f"cannot load model {model_dir!r}: {str(exc).splitlines()[0]}") from None
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        # decoder models classify from the last non-padding token, which they find with pad_token_id
        model.config.pad_token_id = pad_token_id if pad_token_id is not None else 0
    if quantize is not None:
        from .. import quant

        quant.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _task_count(options: TrainOptions, values: dict[str, Any], num_tasks: int | None) -> None:
    """Fill (or check) the task count of a method that takes ``task_ids``; refuse ``--task-id-column`` for one that
    takes none, and such a method without it."""
    count_field = TASK_COUNT_FIELDS.get(options.method.upper())
    if count_field is None:
        if options.task_id_column is not None:
            raise TrainError(f"--task-id-column does not apply to --method {options.method}: it takes no task ids "
                             f"(methods that do: {', '.join(m.lower() for m in TASK_COUNT_FIELDS)})")
        return
    if options.task_id_column is None:
        raise TrainError(f"--method {options.method} needs --task-id-column: a data column with each example's task "
                         f"index (0, 1, ...), which the model takes as task_ids")
    if num_tasks is None:
        return
    given = values.setdefault(count_field, num_tasks)
    if isinstance(given, int) and given < num_tasks:
        raise TrainError(f"--method-option {count_field}={given} is too small: the data's task ids go up to "
                         f"{num_tasks - 1} (column {options.task_id_column!r})")


def _csv(value: str | None) -> list[str] | str | None:
    """``"a,b"`` -> ``["a", "b"]``; ``all-linear`` and regexes (anything with regex syntax) stay strings."""
    if value is None:
        return None
    if value == "all-linear" or any(c in value for c in "*()[]|^$\\+?"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


# CLI option -> the config fields it sets, for the method options the CLI has flags for (the first one the method's
# config has; LoHa / LoKr call LoRA's alpha ``alpha``).
METHOD_FLAGS = {
    "r": ("r",), "lora_alpha": ("lora_alpha", "alpha"), "lora_dropout": ("lora_dropout",), "use_dora": ("use_dora",),
    "use_rslora": ("use_rslora",), "init_lora_weights": ("init_lora_weights",),
}


# Methods whose training needs more than (input, labels) records: refused with the reason rather than trained wrongly.
NOT_TRAINABLE_HERE = {
    "CPT": "its loss covers the context's labels and input_type_mask, which the loop's token loss does not",
}

# Methods that take task_ids (one task index per record, from --task-id-column) -> their config's task-count field.
TASK_COUNT_FIELDS = {"POLY": "n_tasks", "MULTITASK_PROMPT_TUNING": "num_tasks"}


def build_peft_config(options: TrainOptions, task: str, total_steps: int | None = None,
                      num_tasks: int | None = None):
    """The method's config from the options; refuses options the method does not have. ``total_steps`` (the run's
    optimizer steps) fills a ``total_step`` field the options leave open (AdaLoRA's budget schedule); ``num_tasks``
    (the data's largest task index + 1) the task count of a method that takes ``task_ids``, which must cover it."""
    from ..config import PeftType
    from ..registry import config_class

    try:
        cls = config_class(PeftType(options.method.upper()))
    except (ValueError, DeltatuneError):
        from ..registry import supported_types

        names = ", ".join(t.value.lower() for t in supported_types())
        raise TrainError(f"--method {options.method!r} is not available; choose one of: {names}") from None
    reason = NOT_TRAINABLE_HERE.get(options.method.upper())
    if reason is not None:
        raise TrainError(f"deltatune train cannot train --method {options.method}: {reason}; train it in Python "
                         f"(PeftModel forward with its arguments) instead")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {"task_type": TASK_TYPES[task]}
    for option, names in METHOD_FLAGS.items():
        value = getattr(options, option)
        if value is None:
            continue
        name = next((n for n in names if n in fields), None)
        if name is None:
            raise TrainError(f"--{option.replace('_', '-')} does not apply to --method {options.method}")
        values[name] = value
    alpha = next((n for n in METHOD_FLAGS["lora_alpha"] if n in fields), None)
    if alpha is not None and alpha not in values and "r" in values:
        values[alpha] = 2 * values["r"]
    if isinstance(values.get("init_lora_weights"), str) and values["init_lora_weights"].lower() in ("true", "false"):
        values["init_lora_weights"] = values["init_lora_weights"].lower() == "true"
    for option, name in (("target", "target_modules"), ("exclude", "exclude_modules"),
                         ("modules_to_save", "modules_to_save")):
        value = getattr(options, option)
        if value is not None:
            if name not in fields:
                raise TrainError(f"--{option.replace('_', '-')} does not apply to --method {options.method}")
            values[name] = _csv(value) if name != "modules_to_save" else [v for v in value.split(",") if v]
    if options.layers is not None:
        if "layers_to_transform" not in fields:
            raise TrainError(f"--layers does not apply to --method {options.method}")
        try:
            values["layers_to_transform"] = [int(v) for v in options.layers.split(",") if v.strip()]
        except ValueError:
            raise TrainError(f"--layers must be comma-separated integers, got {options.layers!r}") from None
    for name, value in options.method_options.items():
        if name not in fields or name in ("peft_type", "task_type"):
            raise TrainError(
                f"--method-option {name}=...: {cls.__name__} has no field {name!r} "
                f"(fields: {', '.join(sorted(fields - {'peft_type', 'task_type'}))})"
            )
        values[name] = value
    if "total_step" in fields and values.get("total_step") is None and total_steps is not None:
        values["total_step"] = total_steps
    _task_count(options, values, num_tasks)
    try:
        return cls(**values)
    except DeltatuneError as exc:
        raise TrainError(f"invalid --method {options.method} options: {exc}") from None

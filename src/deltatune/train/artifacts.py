"""Find and load what a run produced, for ``deltatune generate`` and ``deltatune merge``.

Both accept a run directory (its final adapter, or its newest checkpoint while it is still training) or an adapter
directory (``runs/x/best``, ``runs/x/checkpoints/step-000040``, or any peft-format adapter), and rebuild the base
model exactly as training loaded it: same model source, task head, labels and prompt format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config import CONFIG_NAME
from .options import TrainError
from .state import latest_checkpoint, read_run


@dataclass
class Source:
    """A trained adapter and how to rebuild its base.

    Attributes:
        adapter_dir: Directory with ``adapter_config.json`` and the weights.
        model: The ``--model`` value (built-in name, path or hub id) of the base.
        task: ``causal-lm``, ``seq2seq``, ``seq-cls`` or ``token-cls``.
        labels: Class names of a classification run.
        chat: Whether prompts were wrapped in the chat template in training.
    """

    adapter_dir: str
    model: str
    task: str
    labels: list[str] | None = None
    chat: bool = False


def _run_info(directory: str) -> dict[str, Any] | None:
    """The run.json of ``directory`` or of the run it lies in (up to two levels: best/, checkpoints/step-N/)."""
    path = os.path.abspath(directory)
    for _ in range(3):
        run = read_run(path)
        if run is not None:
            return run
        path = os.path.dirname(path)
    return None


def locate(path: str, model: str | None = None) -> Source:
    """Resolve a run or adapter directory into a :class:`Source`.

    Raises:
        TrainError: the path does not exist or holds neither a run nor an adapter; or the base model is unknown.
    """
    from ..config import read_config

    if not os.path.isdir(path):
        raise TrainError(f"{path!r} does not exist or is not a directory; pass a run directory or an adapter directory")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        adapter_dir = path
    elif read_run(path) is not None:
        adapter_dir = os.path.join(path, "adapter")
        if not os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)):
            latest = latest_checkpoint(path)
            if latest is None:
                raise TrainError(f"{path!r} holds a run with no adapter and no checkpoint yet")
            adapter_dir = latest
    else:
        raise TrainError(f"{path!r} holds neither a run (run.json) nor an adapter ({CONFIG_NAME})")
    run = _run_info(adapter_dir)
    config = read_config(adapter_dir)
    if run is not None:
        options = run["options"]
        return Source(adapter_dir, model or options["model"], run["task"], run.get("labels"), bool(options.get("chat")))
    from .models import TASK_TYPES

    task = next((t for t, tt in TASK_TYPES.items() if tt == config.task_type), "causal-lm")
    base = model or config.base_model_name_or_path
    if not base:
        raise TrainError(f"{adapter_dir}: the adapter does not name its base model; pass --model")
    return Source(adapter_dir, base, task)


def load(source: Source):
    """``(peft_model, tokenizer)`` for ``source``, in eval mode."""
    from ..model import PeftModel
    from .models import load_model, load_tokenizer
    from .presets import resolve_model

    model_dir = resolve_model(source.model)
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, source.task, source.labels, tokenizer.pad_token_id)
    try:
        model = PeftModel.from_pretrained(base, source.adapter_dir)
    except ValueError as exc:
        raise TrainError(f"{source.adapter_dir}: {exc}") from None
    return model.eval(), tokenizer

"""Multitask prompt tuning: one shared prompt, modulated per task by a rank-``r`` product.

Wang et al., 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning" (arXiv:2303.02861), §3:
the prompt of task ``k`` is the shared prompt ``P* ∈ R^{T×d}`` times (elementwise) a low-rank task matrix::

    P_k = P* ∘ (u_k v_kᵀ)        u_k ∈ R^{T×r} (prefix_task_cols[k]), v_kᵀ ∈ R^{r×d} (prefix_task_rows[k])

Training on source tasks learns ``P*`` and the factors; a target task starts from them (§3.2), which is what the
``prompt_tuning_init`` values ``AVERAGE_SOURCE_TASKS`` (factors averaged over the source tasks), ``EXACT_SOURCE_TASK``
(the factors of task ``prompt_tuning_init_task``) and ``ONLY_SOURCE_SHARED`` (``P*`` only) read from
``prompt_tuning_init_state_dict_path`` (a multitask adapter's ``adapter_model.safetensors`` or ``.bin``), as in peft.

Every forward and ``generate()`` takes ``task_ids``, one task index per row; the rows' prompts go in front of the
input through the shared :data:`~deltatune.prompt.EMBEDDING_PROMPT` strategy (the encoder's ``task_prompt``), so
caching, masks, labels and positions are prompt tuning's. Saved keys, as peft: ``prompt_embeddings`` (``P*``, not a
task's prompt), ``prefix_task_cols`` ``(num_tasks, T·submodules, r)``, ``prefix_task_rows`` ``(num_tasks, r, d)``.
Differs from peft: a source init with ``num_tasks > 1`` starts every target task from the selected (or averaged)
source factors (peft fails on the shape mismatch).
"""

from __future__ import annotations

import copy
import enum
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftType
from ..errors import AdapterLoadError, ConfigError
from ..prompt import EMBEDDING_PROMPT, check_task_ids
from ..registry import PromptMethod
from .common import check_size
from .prompt_tuning import PromptEmbedding, PromptTuningConfig

__all__ = ["MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the prompt starts: ``TEXT`` / ``RANDOM`` as prompt tuning, or from a source multitask adapter:
    ``AVERAGE_SOURCE_TASKS``, ``EXACT_SOURCE_TASK``, ``ONLY_SOURCE_SHARED`` (see the module docstring)."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"

    def __str__(self) -> str:
        return self.value


_FROM_SOURCE = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Configuration of a multitask prompt-tuning adapter (peft's field names); prompt tuning's fields besides.

    Attributes:
        prompt_tuning_init: A :class:`MultitaskPromptTuningInit` (or its string value).
        prompt_tuning_init_state_dict_path: The source adapter's weights file (for the three source inits).
        prompt_tuning_init_task: The source task whose factors ``EXACT_SOURCE_TASK`` starts from.
        num_ranks: Rank ``r`` of each task's factors.
        num_tasks: Number of tasks (``task_ids`` lie in ``[0, num_tasks)``).
    """

    peft_type: PeftType = field(default=PeftType.MULTITASK_PROMPT_TUNING, init=False)
    prompt_tuning_init: MultitaskPromptTuningInit | str = MultitaskPromptTuningInit.RANDOM
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    _inits: ClassVar[type[enum.Enum]] = MultitaskPromptTuningInit

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("num_ranks", self.num_ranks)
        check_size("num_tasks", self.num_tasks)
        if self.prompt_tuning_init.value in _FROM_SOURCE and not self.inference_mode \
                and self.prompt_tuning_init_state_dict_path is None:
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init.value} needs prompt_tuning_init_state_dict_path (the "
                f"source multitask adapter's weights file)"
            )
        if self.prompt_tuning_init.value == "EXACT_SOURCE_TASK":
            check_size("prompt_tuning_init_task", self.prompt_tuning_init_task, allow_zero=True)


class MultitaskPromptEmbedding(PromptEmbedding):
    """``embedding`` (the shared ``P*``, ``(T·submodules, d)``) and the per-task factors (``N(0, 0.02)``, as peft).
    ``forward(indices)`` is ``P*`` (what ``prompt_embeddings`` saves); :meth:`task_prompt` the rows' prompts."""

    extra_keys: ClassVar[tuple[str, ...]] = ("prefix_task_cols", "prefix_task_rows")
    takes_task_ids: ClassVar[bool] = True

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__(config, word_embeddings)
        rows, width = EMBEDDING_PROMPT.table_shape(config)
        self.num_tasks = config.num_tasks
        self.prefix_task_cols = nn.Parameter(torch.randn(config.num_tasks, rows, config.num_ranks) * 0.02)
        self.prefix_task_rows = nn.Parameter(torch.randn(config.num_tasks, config.num_ranks, width) * 0.02)
        if str(config.prompt_tuning_init) in _FROM_SOURCE:
            self._init_from_source(config)

    def task_prompt(self, task_ids: Any, batch: int) -> torch.Tensor:
        """``P* ∘ (u_k v_kᵀ)`` for each row's task ``k``: ``(batch, T·submodules, d)``."""
        ids = check_task_ids(task_ids, batch, self.num_tasks, "multitask prompt tuning")
        ids = ids.to(self.prefix_task_cols.device)
        scale = self.prefix_task_cols[ids] @ self.prefix_task_rows[ids]  # (B, R, r) @ (B, r, d) -> (B, R, d)
        return self.embedding.weight.unsqueeze(0) * scale

    @torch.no_grad()
    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        path = config.prompt_tuning_init_state_dict_path
        source = _read_source(path)
        shared = source.get("prompt_embeddings")
        if shared is None or tuple(shared.shape) != tuple(self.embedding.weight.shape):
            raise AdapterLoadError(
                f"{path}: needs 'prompt_embeddings' of shape {list(self.embedding.weight.shape)} for "
                f"prompt_tuning_init={config.prompt_tuning_init.value}, got "
                f"{None if shared is None else list(shared.shape)}"
            )
        self.embedding.weight.copy_(shared)
        if str(config.prompt_tuning_init) == "ONLY_SOURCE_SHARED":
            return
        cols, rows = source.get("prefix_task_cols"), source.get("prefix_task_rows")
        if cols is None or rows is None or cols.shape[1:] != self.prefix_task_cols.shape[1:] \
                or rows.shape[1:] != self.prefix_task_rows.shape[1:] or cols.shape[0] != rows.shape[0]:
            raise AdapterLoadError(
                f"{path}: needs 'prefix_task_cols' (tasks, {', '.join(map(str, self.prefix_task_cols.shape[1:]))}) "
                f"and 'prefix_task_rows' (tasks, {', '.join(map(str, self.prefix_task_rows.shape[1:]))}) of a "
                f"multitask adapter with the same num_virtual_tokens and num_ranks"
            )
        if str(config.prompt_tuning_init) == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0), rows.mean(0)
        elif config.prompt_tuning_init_task >= cols.shape[0]:
            raise ConfigError(
                f"prompt_tuning_init_task={config.prompt_tuning_init_task} but {path} holds {cols.shape[0]} tasks"
            )
        else:
            cols, rows = cols[config.prompt_tuning_init_task], rows[config.prompt_tuning_init_task]
        self.prefix_task_cols.copy_(cols.expand_as(self.prefix_task_cols))
        self.prefix_task_rows.copy_(rows.expand_as(self.prefix_task_rows))


def _read_source(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a source adapter's weights file: safetensors, else a weights-only pickle."""
    if not os.path.isfile(path):
        raise ConfigError(f"prompt_tuning_init_state_dict_path={path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"{path}: not a weights-only pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(tensors, dict):
        raise AdapterLoadError(f"{path}: expected a dict of tensors keyed by name")
    return tensors


def _loaded(config: MultitaskPromptTuningConfig) -> MultitaskPromptEmbedding:
    """A saved adapter loads into the full encoder (its file holds ``P*`` and the factors), randomly initialised
    (no tokenizer, no source file read) until the file's tensors replace everything."""
    plain = copy.copy(config)
    plain.prompt_tuning_init = MultitaskPromptTuningInit.RANDOM
    return MultitaskPromptEmbedding(plain)


METHOD = PromptMethod(
    config_class=MultitaskPromptTuningConfig, make_encoder=MultitaskPromptEmbedding, strategy=EMBEDDING_PROMPT,
    loaded_encoder=_loaded,
)

"""Prompt tuning: ``T`` trainable virtual-token embeddings prepended to the input.

Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", §2: a prompt ``P ∈ R^{T×d}`` is
concatenated with the embedded input ``X_e ∈ R^{S×d}`` to ``[P; X_e] ∈ R^{(T+S)×d}`` and only ``P`` is trained.
§3.2 compares initialisations: random, sampled vocabulary embeddings, and (best) the embeddings of task text.

The encoder is the table ``P`` itself (:class:`~deltatune.prompt.PromptTable`); feeding it to the model is the shared
plumbing in ``prompt.py`` (:data:`~deltatune.prompt.EMBEDDING_PROMPT`). Saved as ``prompt_embeddings`` of shape
``(T × num_transformer_submodules, token_dim)``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError
from ..prompt import EMBEDDING_PROMPT, PromptTable
from ..registry import PromptMethod

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]  # exported from deltatune


class PromptTuningInit(str, enum.Enum):
    """How the prompt starts: ``TEXT`` (embeddings of ``prompt_tuning_init_text``), ``SAMPLE_VOCAB`` (embeddings of
    random vocabulary tokens) or ``RANDOM`` (``N(0, 1)``, which may lie far from the embedding manifold)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of a prompt-tuning adapter (peft's field names). Shared fields: see ``PromptLearningConfig``.

    Attributes:
        prompt_tuning_init: A :class:`PromptTuningInit` (or its string value).
        prompt_tuning_init_text: The text whose token embeddings start the prompt (``TEXT``); repeated or cut to
            fill all virtual tokens.
        tokenizer_name_or_path: Tokenizer (local directory or hub id) that turns the text into ids (``TEXT``).
        tokenizer_kwargs: Extra arguments for ``AutoTokenizer.from_pretrained`` (``TEXT``); ``trust_remote_code``
            is dropped, as a config file must not be able to run code.
    """

    peft_type: PeftType = field(default=PeftType.PROMPT_TUNING, init=False)
    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    _inits: ClassVar[type[enum.Enum]] = PromptTuningInit  # the values prompt_tuning_init takes

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.prompt_tuning_init = self._inits(str(self.prompt_tuning_init))
        except ValueError:
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init!r}; use one of {[i.value for i in self._inits]}"
            ) from None
        if self.prompt_tuning_init.value == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer of the model)")
            if self.prompt_tuning_init_text is None:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


class PromptEmbedding(PromptTable):
    """The prompt table, initialised as the config says (peft's class name)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        rows, width = EMBEDDING_PROMPT.table_shape(config)
        super().__init__(rows, width)
        init = str(config.prompt_tuning_init)  # also multitask prompt tuning's values, which share TEXT
        if init == PromptTuningInit.SAMPLE_VOCAB.value:
            ids = torch.randint(0, word_embeddings.num_embeddings, (rows,))
        elif init == PromptTuningInit.TEXT.value:
            ids = _text_ids(config, rows)
        else:
            return
        device = word_embeddings.weight.device
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids.to(device)).float())


def _text_ids(config: PromptTuningConfig, rows: int) -> torch.Tensor:
    """The init text's token ids, repeated or cut to ``rows``."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"cannot load the tokenizer {config.tokenizer_name_or_path!r} for prompt_tuning_init='TEXT': "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens with "
            f"{config.tokenizer_name_or_path!r}; use a non-empty text"
        )
    ids = (ids * math.ceil(rows / len(ids)))[:rows]
    return torch.tensor(ids, dtype=torch.long)


METHOD = PromptMethod(config_class=PromptTuningConfig, make_encoder=PromptEmbedding, strategy=EMBEDDING_PROMPT)

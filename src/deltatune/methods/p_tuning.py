"""P-tuning: virtual-token embeddings produced by a small reparameterisation network.

Liu et al., 2021, "GPT Understands, Too", §3.1–3.2: trainable continuous prompt embeddings ``h_0..h_T`` are fed
through a prompt encoder (a bidirectional LSTM followed by a two-layer ReLU MLP, or an MLP alone) before they are
inserted into the input; the encoder makes the prompt tokens depend on each other and eases optimisation.

Only the encoder's *output* is saved (``prompt_embeddings``, ``(T × num_transformer_submodules, token_dim)``), as in
peft; a loaded adapter is therefore a plain table (see ``prompt.load_prompt_embeddings``).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError
from ..prompt import EMBEDDING_PROMPT, MAX_ENCODER_HIDDEN_SIZE, MAX_ENCODER_LAYERS, check_encoder_size
from ..registry import PromptMethod
from .common import check_dropout

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]  # exported from deltatune


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The prompt encoder's network: ``MLP`` (three linear layers) or ``LSTM`` (bidirectional LSTM + MLP)."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of a P-tuning adapter (peft's field names). Shared fields: see ``PromptLearningConfig``.

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` or ``"LSTM"``.
        encoder_hidden_size: Hidden width of the encoder; ``None`` uses ``token_dim``.
        encoder_num_layers: LSTM layers. The MLP always has its fixed 3 linear layers (another value warns).
        encoder_dropout: Dropout between LSTM layers (the MLP has none, as in peft).
    """

    peft_type: PeftType = field(default=PeftType.P_TUNING, init=False)
    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                str(self.encoder_reparameterization_type)
            )
        except ValueError:
            raise ConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r}; use 'MLP' or 'LSTM'"
            ) from None
        check_encoder_size("encoder_hidden_size", self.encoder_hidden_size, MAX_ENCODER_HIDDEN_SIZE)
        if self.encoder_num_layers is None:
            raise ConfigError("encoder_num_layers must be a positive integer, got None")
        check_encoder_size("encoder_num_layers", self.encoder_num_layers, MAX_ENCODER_LAYERS)
        check_dropout("encoder_dropout", self.encoder_dropout)


class PromptEncoder(nn.Module):
    """``embedding`` (the trainable input table) -> optional bidirectional ``lstm_head`` -> ``mlp_head``.

    ``forward(indices (B, R)) -> (B, R, token_dim)``.
    """

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        rows, d = EMBEDDING_PROMPT.table_shape(config)
        h = config.encoder_hidden_size
        self.embedding = nn.Embedding(rows, d)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=d, hidden_size=h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("encoder_num_layers is ignored for the MLP prompt encoder, which has 3 fixed layers",
                              stacklevel=2)
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)  # (B, R, d)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]  # (B, R, 2h)
        return self.mlp_head(x)  # (B, R, d)


METHOD = PromptMethod(config_class=PromptEncoderConfig, make_encoder=PromptEncoder, strategy=EMBEDDING_PROMPT)

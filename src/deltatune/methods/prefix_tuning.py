"""Prefix tuning: a trainable key/value prefix of ``T`` positions in every attention layer.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", §4.2: activations at prefix
positions are free parameters ``P_θ[i,:]`` for every layer; §4.3 reparameterises ``P_θ[i,:] = MLP_θ(P'_θ[i,:])``
with a smaller matrix ``P'_θ`` for stable training (``prefix_projection=True``).

The prefix reaches the model as a KV cache that already holds ``T`` tokens (:data:`~deltatune.prefix.PREFIX`), so
attention, masks and positions stay the model's own. Saved as ``prompt_embeddings`` of shape
``(T, num_layers × 2 × token_dim)``, laid out ``[layer][key|value][head][head_dim]``;
``token_dim = head_dim × num_key_value_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError
from ..prefix import PREFIX
from ..prompt import MAX_ENCODER_HIDDEN_SIZE, PromptTable, check_encoder_size
from ..registry import PromptMethod

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]  # exported from deltatune


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of a prefix-tuning adapter (peft's field names). Shared fields: see ``PromptLearningConfig``.

    Attributes:
        encoder_hidden_size: Hidden width of the projection MLP; ``None`` uses ``token_dim``.
        prefix_projection: Reparameterise the prefix through ``Linear -> tanh -> Linear`` (§4.3).
        init_weights: ``None`` (random) or ``"zero"``: the prefix (or the projection's last layer) starts at zero.
    """

    peft_type: PeftType = field(default=PeftType.PREFIX_TUNING, init=False)
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        check_encoder_size("encoder_hidden_size", self.encoder_hidden_size, MAX_ENCODER_HIDDEN_SIZE)


class PrefixEncoder(nn.Module):
    """The projected prefix: ``embedding`` ``(T, token_dim)`` -> ``transform`` -> ``(T, num_layers·2·token_dim)``."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        rows, width = PREFIX.table_shape(config)
        self.embedding = nn.Embedding(rows, config.token_dim)
        self.transform = nn.Sequential(
            nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
            nn.Linear(config.encoder_hidden_size, width),
        )
        if config.init_weights == "zero":
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.transform(self.embedding(indices))  # (B, T, L·2·token_dim)


def make_encoder(config: PrefixTuningConfig, word_embeddings: nn.Module | None = None) -> nn.Module:
    """:class:`PrefixEncoder` with ``prefix_projection``, else the prefix itself as a plain table."""
    if config.prefix_projection:
        return PrefixEncoder(config)
    table = PromptTable(*PREFIX.table_shape(config))
    if config.init_weights == "zero":
        nn.init.zeros_(table.embedding.weight)
    return table


METHOD = PromptMethod(config_class=PrefixTuningConfig, make_encoder=make_encoder, strategy=PREFIX)

"""Context-aware prompt tuning (CPT): in-context examples as the prompt, refined by small projected deltas.

Blau et al., 2024, "Context-aware Prompt Tuning: Advancing In-Context Learning with Adversarial Methods"
(arXiv:2410.17222), §3: the virtual tokens are the embeddings of real in-context examples (``cpt_token_ids``, frozen)
plus a trainable delta per token; a token-type mask marks each token as input template (``type % 4 == 1``), input
(``2``), output template (``3``) or label (``0``, types ``> 0``), with one type number per example:

* only template and input tokens train (label tokens keep their embeddings; §3.2);
* each token's delta is projected onto a ball: its L2 norm is clipped to ``ε·√(d/2048)``, ``ε`` being
  ``opt_projection_format_epsilon`` for templates and ``opt_projection_epsilon`` for inputs (§3.3). As in peft the
  projection is applied to the stored delta at every forward, so the optimizer's next step starts from the
  projected point (projected gradient descent);
* the loss covers the context's label tokens too (the virtual tokens' own ids as targets), optionally weighted by
  ``opt_loss_decay_factor ** k`` for the ``k``-th example counted from the last (``opt_weighted_loss_type="decay"``,
  §3.4). ``input_type_mask`` (forward argument, per input token; default ``4``: every token a label) marks the
  input's own tokens; its types are shifted past the context's.

The prompt reaches the model through :data:`~deltatune.prompt.EMBEDDING_PROMPT`; :class:`ContextPrompt` only adds the
labels and the loss. Saved as peft does: ``prompt_embeddings``, the encoder's output ``(T, token_dim)``; a loaded
adapter is that table (trainable: the table becomes the frozen base and a fresh delta trains around it, as peft).
``cpt_mask`` is stored (peft keeps it too) but, as in peft, has no effect. Causal LM only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftType, PromptLearningConfig, TaskType
from ..errors import ConfigError
from ..prompt import EmbeddingPrompt, PromptTable
from ..registry import PromptMethod
from .common import check_scale

__all__ = ["CPTConfig", "CPTEmbedding"]  # exported from deltatune

_MIN_EPSILON = 1e-10  # the "ball" of tokens that never train (labels, type 0)


@dataclass
class CPTConfig(PromptLearningConfig):
    """Configuration of a CPT adapter (peft's field names). ``num_virtual_tokens`` is ``len(cpt_token_ids)``.

    Attributes:
        cpt_token_ids: Token ids of the in-context examples that start the prompt (default ``[0]``).
        cpt_mask: A mask over them, stored for peft's files; no effect (as in peft).
        cpt_tokens_type_mask: One type per context token (see the module docstring); default all ``1``.
        opt_weighted_loss_type: ``"none"`` or ``"decay"`` (label weights decay towards earlier examples).
        opt_loss_decay_factor: The decay factor per example.
        opt_projection_epsilon: Radius factor of the input tokens' deltas.
        opt_projection_format_epsilon: Radius factor of the template tokens' deltas.
        tokenizer_name_or_path: Recorded as peft records it; not read.
    """

    peft_type: PeftType = field(default=PeftType.CPT, init=False)
    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: Literal["none", "decay"] | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None
    num_virtual_tokens: int | None = None

    def __post_init__(self) -> None:
        self.cpt_token_ids = list(self.cpt_token_ids) if self.cpt_token_ids is not None else [0]
        n = len(self.cpt_token_ids)
        if self.num_virtual_tokens not in (None, n):
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens} but cpt_token_ids has {n} tokens; "
                              f"leave num_virtual_tokens unset (it is len(cpt_token_ids))")
        self.num_virtual_tokens = n
        super().__post_init__()
        self.num_transformer_submodules = 1
        self.cpt_mask = list(self.cpt_mask) if self.cpt_mask is not None else [1] * n
        self.cpt_tokens_type_mask = (list(self.cpt_tokens_type_mask) if self.cpt_tokens_type_mask is not None
                                     else [1] * n)
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == n:
            raise ConfigError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.cpt_token_ids):
            raise ConfigError(f"cpt_token_ids must be token ids (non-negative integers), got {self.cpt_token_ids}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.cpt_tokens_type_mask):
            raise ConfigError("cpt_tokens_type_mask must hold non-negative integer types")
        if self.task_type != TaskType.CAUSAL_LM:
            raise ConfigError(f"CPTConfig only supports task_type='CAUSAL_LM', got {self.task_type!r}")
        if self.opt_weighted_loss_type not in ("none", "decay"):
            raise ConfigError(f"opt_weighted_loss_type must be 'none' or 'decay', got {self.opt_weighted_loss_type!r}")
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            check_scale(name, getattr(self, name))


class CPTEmbedding(PromptTable):
    """``embedding`` (the context's token embeddings, frozen) plus ``delta_embedding`` (zero-init, trained where the
    type mask allows, projected onto each token's ball at every forward). ``forward`` is their sum ``(…, T, d)``."""

    def __init__(self, config: CPTConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__(config.num_virtual_tokens, config.token_dim)
        if word_embeddings is not None:
            ids = torch.tensor(config.cpt_token_ids, device=word_embeddings.weight.device)
            if int(ids.max()) >= word_embeddings.num_embeddings:
                raise ConfigError(
                    f"cpt_token_ids holds {int(ids.max())}, beyond the vocabulary of {word_embeddings.num_embeddings}"
                )
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings(ids).float())
        self.delta_embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        nn.init.zeros_(self.delta_embedding.weight)
        types = torch.tensor(config.cpt_tokens_type_mask) % 4
        self.register_buffer("trains", ((types >= 1) & (types <= 3)).unsqueeze(-1), persistent=False)  # (T, 1)
        scale = math.sqrt(config.token_dim / 2048)
        raw = torch.tensor(config.cpt_tokens_type_mask)
        epsilon = torch.full((config.num_virtual_tokens,), _MIN_EPSILON)
        epsilon[(raw > 0) & ((types == 1) | (types == 3))] = config.opt_projection_format_epsilon * scale
        epsilon[(raw > 0) & (types == 2)] = config.opt_projection_epsilon * scale
        self.register_buffer("epsilon", epsilon, persistent=False)  # (T,)
        self.embedding.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> CPTEmbedding:
        """Only the delta trains; the context's embeddings stay frozen whatever the caller asks."""
        super().requires_grad_(requires_grad)
        self.embedding.requires_grad_(False)
        return self

    @torch.no_grad()
    def project(self) -> None:
        """Clip every delta row's L2 norm to its token's ``epsilon`` (in place)."""
        delta = self.delta_embedding.weight
        norm = delta.norm(dim=1)  # (T,)
        eps = self.epsilon.to(delta)
        delta.mul_(torch.where(norm > 0, eps / norm.clamp(min=eps), torch.ones_like(norm)).unsqueeze(-1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        self.project()
        delta = self.delta_embedding(indices)
        trains = self.trains[indices]  # (…, T, 1): label tokens keep their embedding (no gradient to their delta)
        delta = torch.where(trains, delta, delta.detach())
        return self.embedding(indices).detach() + delta


class ContextPrompt(EmbeddingPrompt):
    """:data:`~deltatune.prompt.EMBEDDING_PROMPT` with CPT's labels and loss: the context's label tokens are targets
    as well, and the loss weights examples by ``opt_loss_decay_factor``."""

    def __repr__(self) -> str:
        return "CPT_PROMPT"

    def forward(self, model, config, encoder, task, kwargs, task_ids=None):
        labels, types = kwargs.pop("labels", None), kwargs.pop("input_type_mask", None)
        if labels is None and types is not None:
            raise ConfigError("input_type_mask only shapes CPT's loss; pass labels with it")
        output = super().forward(model, config, encoder, task, kwargs, task_ids)
        if labels is None:
            return output
        full_labels, full_types = _context_labels(config, labels, types)
        output.loss = cpt_loss(output.logits, full_labels, full_types, config)
        return output


def _context_labels(config: CPTConfig, labels: torch.Tensor, types: torch.Tensor | None):
    """Labels and types over ``[context; input]``, ``(B, T + S)``: the context's own ids as targets, input types
    shifted past the context's largest, and ``-100`` wherever the type is not a label (``> 0``, ``% 4 == 0``)."""
    batch, device = labels.shape[0], labels.device
    if types is None:
        types = torch.full(labels.shape, 4, dtype=torch.long, device=device)
    elif tuple(types.shape) != tuple(labels.shape):
        raise ConfigError(f"input_type_mask must have the labels' shape {list(labels.shape)}, got {list(types.shape)}")
    context_types = torch.tensor(config.cpt_tokens_type_mask, device=device).expand(batch, -1)
    types = torch.where(types > 0, types.long() + context_types.max(), types.long())
    full_types = torch.cat([context_types, types], dim=1)
    context = torch.tensor(config.cpt_token_ids, device=device).expand(batch, -1)
    full_labels = torch.cat([context, labels.long()], dim=1)
    is_label = (full_types > 0) & (full_types % 4 == 0)
    return full_labels.masked_fill(~is_label, -100), full_types


def cpt_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, config: CPTConfig) -> torch.Tensor:
    """Mean next-token cross-entropy over label positions, each weighted by ``decay ** k`` for the ``k``-th label
    type counted from the last (``"decay"``), else 1. ``logits`` ``(B, L, V)``, ``labels`` / ``types`` ``(B, L)``."""
    logits, labels, types = logits[:, :-1], labels[:, 1:].to(logits.device), types[:, 1:].to(logits.device)
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    weights = torch.ones_like(per_token)
    if config.opt_weighted_loss_type == "decay":
        for row in range(types.shape[0]):
            groups = types[row][(types[row] > 0) & (types[row] % 4 == 0)].unique()  # ascending
            for k, group in enumerate(groups.flip(0)):
                weights[row][types[row] == group] = config.opt_loss_decay_factor ** k
    return (per_token[valid] * weights[valid]).mean()


CPT_PROMPT = ContextPrompt()

METHOD = PromptMethod(config_class=CPTConfig, make_encoder=CPTEmbedding, strategy=CPT_PROMPT)

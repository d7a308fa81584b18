"""Trainable tokens: train only a few rows of an embedding table (new tokens, or re-trained ones).

The listed rows ``token_indices`` of the target embedding are replaced by a trainable ``(k, dim)`` table
``trainable_tokens_delta``, initialised to those rows' current values (a fresh adapter is the base model; with
``init_weights=False``, N(0, 1), for tests). Every other row stays frozen, so training a handful of added tokens costs
``k · dim`` parameters and optimizer state instead of the whole ``vocab · dim`` table.

The rows *replace* the base rows rather than add to them (as peft does): after a vocabulary resize the new rows of the
base are random, and an adapter that stored differences would depend on those draws.

* Forward: token ids among ``token_indices`` read their row from the table (times the embedding's ``embed_scale``
  where the model scales embeddings, as Gemma does; ``common.embed_scale``, peft's rule); the others keep the base
  output.
* Tied weights: a module whose weight *is* the embedding's weight (an LM head tied to the input embedding, T5's
  encoder/decoder ``embed_tokens`` beside ``shared``) is its tied twin: it gets a delta that holds the same parameter
  (``LayerMethod.make_tied_delta``), so the pair stays tied while unmerged. On a head, logit ``j`` of each listed
  token ``j`` becomes ``x · row_j`` (plus the head's bias, if any).
* Merge writes the rows into the weight (``index_copy``); unmerge writes back the original rows, kept aside at
  creation as the non-saved buffer ``trainable_tokens_original``. Both are idempotent, so the twin merging the same
  shared weight again changes nothing.

Saved keys (peft's): ``<embedding path>.trainable_tokens_delta``, and the same tensor again under each twin's path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from .common import adapter_dtype, embed_scale

__all__ = ["TrainableTokensConfig"]  # exported from deltatune


@dataclass
class TrainableTokensConfig(LayerConfig):
    """Configuration of a trainable-tokens adapter (peft's field names).

    Attributes:
        token_indices: Ids of the tokens whose embedding rows train (distinct, non-negative, below the vocabulary
            size).
        target_modules: The embedding layer(s); ``None`` means the model's input embedding
            (``get_input_embeddings()``), else a module named ``embed_tokens``.
        init_weights: ``True``: the rows start as the base rows (no-op until trained); ``False``: N(0, 1).
    """

    peft_type: PeftType = field(default=PeftType.TRAINABLE_TOKENS, init=False)
    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    # peft's class lacks these; without modules_to_save a task's head (a classifier) is not trained either, as in peft
    _not_in_peft: ClassVar[tuple[str, ...]] = (
        "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.token_indices = check_token_indices("token_indices", self.token_indices)


def check_token_indices(field_name: str, indices: object) -> list[int]:
    """``indices`` as a list, checked: non-empty, distinct, non-negative integers.

    Raises:
        ConfigError: naming ``field_name``.
    """
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ConfigError(f"{field_name} must be a non-empty list of token ids, got {indices!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ConfigError(f"{field_name} must hold non-negative integers, got {list(indices)!r}")
    if len(set(indices)) != len(indices):
        twice = sorted(i for i in set(indices) if indices.count(i) > 1)
        raise ConfigError(f"{field_name} lists a token twice: {twice}")
    return list(indices)


class TrainableTokensDelta(Delta):
    """The ``(k, dim)`` rows of ``k`` listed tokens, replacing those rows of an embedding (or, as a tied twin, those
    rows of a tied head's weight ``(vocab, dim)``)."""

    saves_base_embedding = False  # the file holds the changed rows themselves; not the whole table

    def __init__(self, rows: nn.Parameter, original: torch.Tensor, indices: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.trainable_tokens_delta = rows  # (k, dim)
        self.register_buffer("trainable_tokens_original", original, persistent=False)  # (k, dim), the base's dtype
        self.register_buffer("token_indices", indices, persistent=False)  # (k,) long
        slots = torch.full((vocab,), -1, dtype=torch.long, device=indices.device)
        slots[indices] = torch.arange(len(indices), device=indices.device)
        self.register_buffer("slots", slots, persistent=False)  # (vocab,): token id -> its row in the table, or -1

    @classmethod
    def tied_to(cls, source: TrainableTokensDelta, base_layer: nn.Module) -> TrainableTokensDelta:
        """A twin holding ``source``'s parameter and buffers, for a module that shares its weight. Its merge rewrites
        the rows its source's merge writes into the shared table (``Delta.follows_source``)."""
        twin = cls(source.trainable_tokens_delta, source.trainable_tokens_original, source.token_indices,
                   source.slots.numel())
        twin.follows_source = True
        return twin

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Token ids ``x`` ``(...)``: the listed ones read their trained row, the rest keep ``base_out``
        ``(..., dim)`` (no copy of the table)."""
        slot = self.slots[x]  # (...,) row of each token id, -1 for the others
        new = self.trainable_tokens_delta[slot.clamp(min=0)].to(base_out.dtype)  # (..., dim)
        scale = embed_scale(base_layer)  # a scaled embedding (Gemma) scales every row, the trained ones too
        if scale is not None:
            new = new * scale.to(new.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, base_out)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight
        change = (self.trainable_tokens_delta - self.trainable_tokens_original).to(weight.dtype)
        return torch.zeros_like(weight).index_copy(0, self.token_indices, change)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_original.to(weight.dtype))


class TiedHeadTokens(TrainableTokensDelta):
    """The twin on an ``nn.Linear`` head tied to the embedding: logit ``j`` of each listed token ``j`` is ``x · row_j``
    (plus the head's bias)."""

    @classmethod
    def run_layer(cls, deltas: list[TiedHeadTokens], base_layer: nn.Module, x: torch.Tensor, *args,
                  **kwargs) -> torch.Tensor:
        """The head run once on its weight with the rows written in (``Delta.run_layer``): the same single matmul
        as the base, so a fresh adapter gives the base logits bit for bit (adding corrected columns to the base
        logits would round differently); costs a copy of the ``(vocab, dim)`` weight per call, as peft's forward."""
        weight = base_layer.weight
        for delta in deltas:
            weight = weight.index_copy(0, delta.token_indices, delta.trainable_tokens_delta.to(weight.dtype))
        return torch.func.functional_call(base_layer, {"weight": weight}, (x, *args), kwargs)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Only in a mixed-adapter batch (the layer runs :meth:`run_layer` otherwise): the listed logits of the
        group's rows replaced, ``base_out`` ``(..., vocab)``."""
        rows = self.trainable_tokens_delta
        logits = x.to(rows.dtype) @ rows.T  # (..., k)
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            logits = logits + bias[self.token_indices].to(rows.dtype)
        return base_out.index_copy(base_out.ndim - 1, self.token_indices, logits.to(base_out.dtype))


def input_embedding_name(model: nn.Module) -> list[str]:
    """The default target: the module ``get_input_embeddings()`` returns (by its full name), else ``embed_tokens``."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = None
    try:
        embedding = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        pass
    name = next((n for n, m in model.named_modules() if m is embedding and n), None)
    return [name or "embed_tokens"]


def check_target(config: TrainableTokensConfig, base_layer: nn.Module, name: str) -> None:
    """Raises:
    TargetError: a token index beyond the embedding's vocabulary."""
    check_rows(config.token_indices, base_layer, name)


def check_rows(indices: list[int], base_layer: nn.Module, name: str, field_name: str = "token_indices") -> None:
    """Refuse ``indices`` that are not rows of the embedding ``base_layer`` (module ``name``).

    Raises:
        TargetError: ``base_layer`` is no ``nn.Embedding``, or an index is beyond its vocabulary.
    """
    if not isinstance(base_layer, nn.Embedding):
        raise TargetError(f"{name}: {field_name} trains rows of an nn.Embedding, not of a {type(base_layer).__name__}")
    too_big = [i for i in indices if i >= base_layer.num_embeddings]
    if too_big:
        raise TargetError(f"{name}: {field_name} {too_big} are beyond its {base_layer.num_embeddings} embeddings")


def make_delta(config: TrainableTokensConfig, base_layer: nn.Embedding, name: str) -> TrainableTokensDelta:
    return make_rows(base_layer, config.token_indices, config.init_weights)


def make_rows(base_layer: nn.Embedding, token_indices: list[int], init_weights: bool = True) -> TrainableTokensDelta:
    """The delta training rows ``token_indices`` of ``base_layer``: the base rows (or N(0, 1) without
    ``init_weights``)."""
    weight = base_layer.weight  # (vocab, dim)
    indices = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
    original = weight.detach()[indices].clone()  # (k, dim)
    dtype = adapter_dtype(weight.dtype)
    if init_weights or weight.device.type == "meta":
        values = original.to(dtype)
    else:
        values = torch.randn(original.shape, dtype=dtype, device=weight.device)
    return TrainableTokensDelta(nn.Parameter(values), original, indices, base_layer.num_embeddings)


def make_tied_delta(source: TrainableTokensDelta, base_layer: nn.Module, name: str) -> TrainableTokensDelta:
    """The twin of ``source`` for ``base_layer``, whose weight is the embedding's (a tied head or embedding)."""
    if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
        raise TargetError(
            f"{name} shares its weight with a trainable-tokens target but is a {type(base_layer).__name__}; only "
            f"tied nn.Embedding and nn.Linear modules can follow the trained rows"
        )
    cls = TrainableTokensDelta if isinstance(base_layer, nn.Embedding) else TiedHeadTokens
    return cls.tied_to(source, base_layer)


class TokenAdapter(Delta):
    """Trainable tokens inside another method's adapter (LoRA's ``trainable_token_indices``): the rows delta held
    as ``token_adapter``, which puts it where peft's saved key has it (``<path>.token_adapter.trainable_tokens_delta``,
    peft's ``TrainableTokensWrapper``). A tied twin's copy is not saved (peft writes only the source's), and loads
    through the shared parameter."""

    saves_base_embedding = False

    def __init__(self, token_adapter: TrainableTokensDelta, saved: bool = True) -> None:
        super().__init__()
        self.token_adapter = token_adapter
        self.saved = saved
        self.follows_source = token_adapter.follows_source

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.token_adapter(x, base_out, base_layer)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.token_adapter.delta_weight(base_layer)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.token_adapter.merge_weight(weight, base_layer)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.token_adapter.unmerge_weight(weight, base_layer)

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        return super().saved_state_dict() if self.saved else {}


class TiedHeadTokenAdapter(TokenAdapter):
    """:class:`TokenAdapter` on a head tied to the embedding (runs the head as :class:`TiedHeadTokens` does)."""

    @classmethod
    def run_layer(cls, deltas: list[TiedHeadTokenAdapter], base_layer: nn.Module, x: torch.Tensor, *args,
                  **kwargs) -> torch.Tensor:
        return TiedHeadTokens.run_layer([d.token_adapter for d in deltas], base_layer, x, *args, **kwargs)


def make_token_adapter(
    base_layer: nn.Module, name: str, token_indices: list[int], source: TokenAdapter | None
) -> TokenAdapter:
    """The :class:`TokenAdapter` for an embedding whose rows ``token_indices`` train, or (``source`` given) for a
    module tied to such an embedding, sharing ``source``'s rows."""
    if source is None:
        return TokenAdapter(make_rows(base_layer, token_indices))
    twin = make_tied_delta(source.token_adapter, base_layer, name)
    cls = TiedHeadTokenAdapter if isinstance(twin, TiedHeadTokens) else TokenAdapter
    return cls(twin, saved=False)


METHOD = LayerMethod(
    config_class=TrainableTokensConfig,
    make_delta=make_delta,
    layer_types=(nn.Embedding,),
    default_targets=input_embedding_name,
    check_target=check_target,
    make_tied_delta=make_tied_delta,
)

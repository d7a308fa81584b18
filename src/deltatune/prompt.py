"""Everything the prompt methods (prompt tuning, P-tuning, prefix tuning, multitask prompt tuning, CPT, cartridges)
share, written once.

A prompt method never touches the model's layers. Its *encoder* produces a table of virtual tokens and a
:class:`PromptStrategy` (the method's :attr:`PromptMethod.strategy`) feeds that table to the unchanged model:

* :data:`EMBEDDING_PROMPT` (prompt tuning, P-tuning, multitask prompt tuning; CPT adds its loss on top): ``T``
  virtual-token embeddings are prepended to ``inputs_embeds`` (the encoder's input for encoder-decoder models). The
  attention mask, per-token labels (``-100`` over virtual tokens), ``token_type_ids``, explicit ``position_ids`` and
  span labels are extended to match. An encoder may give each row its own prompt from a task index (``task_ids``).
* :data:`deltatune.prefix.PREFIX` (prefix tuning, cartridges): the table holds one key and one value of ``T``
  positions for every layer, handed to the model as a KV cache that already contains them (:mod:`deltatune.prefix`).

Both line the inputs indexed by token position up with the ``T`` prompt positions through one helper,
:func:`prepend_positions`, in forward and in ``generate()`` alike. The model's own heads and losses do the rest, so
there is no per-task forward: what differs by task is data (:class:`PromptTask`, a class attribute of each task
wrapper).

Generation goes through the model's own ``generate()`` with the KV cache on; virtual-token embeddings travel as
``inputs_embeds`` next to ``input_ids``. The invariant the tests check: tokens from cached generation equal tokens
from re-running the full forward at every step. Nothing is kept between calls.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import PromptLearningConfig, TaskType  # PromptLearningConfig also importable from here, as before
from .errors import AdapterLoadError, ConfigError
from .registry import PromptMethod

# The forward argument that takes a KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache``. A model's
# own name is read from its forward signature (:func:`cache_argument`); callers may pass either.
CACHE_ARGUMENTS = ("cache", "past_key_values")

PROMPT_KEY = "prompt_embeddings"  # the one tensor peft saves for every prompt method


@dataclass(frozen=True)
class PromptTask:
    """What a task wrapper's inputs need when virtual tokens are prepended (only for the embedding prompt, whose
    outputs then have ``T`` extra leading positions; a prefix adds no positions to the output).

    Attributes:
        token_labels: ``labels`` has one entry per input token (causal LM, token classification): prepend ``-100``.
        span_keys: Inputs holding token indices (extractive QA's start/end positions): shift them by ``T``.
        positions_from_mask: Derive ``position_ids`` from the attention mask as ``generate()`` does
            (``cumsum - 1``), so that a left-padded batch gets the same positions in a plain forward as in cached
            generation. Decoder-only language models only.
    """

    token_labels: bool = False
    span_keys: tuple[str, ...] = ()
    positions_from_mask: bool = False


# --- the encoder's table --------------------------------------------------------------------------------------------

class PromptTable(nn.Module):
    """A plain table of virtual tokens: ``forward(indices)`` looks rows up. Every prompt encoder keeps its input
    table as ``embedding`` (peft's name); this class is the encoder when the table *is* the prompt (prompt tuning,
    prefix tuning without projection, and any adapter loaded from a file, which stores only the encoder's output).

    Two optional traits of an encoder, read by the plumbing (defaults here; any encoder may set them):

    * ``extra_keys``: names of its own parameters that peft's file holds beside ``prompt_embeddings``, under the same
      top-level key (multitask prompt tuning's per-task factors);
    * ``task_prompt(task_ids, batch) -> (B, rows, width)``: the prompt differs per row by a task index; the encoder
      then sets ``takes_task_ids`` and ``forward(indices)`` stays the shared table that ``prompt_embeddings`` saves.
    """

    extra_keys: ClassVar[tuple[str, ...]] = ()
    takes_task_ids: ClassVar[bool] = False

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def check_task_ids(task_ids: Any, batch: int | None, num_tasks: int, what: str) -> torch.Tensor:
    """``task_ids`` as a ``(batch,)`` long tensor of indices in ``[0, num_tasks)`` (``batch=None``: any length, for
    callers that leave matching the batch to the layers, which also accept whole multiples of it).

    Raises:
        TypeError: ``task_ids`` is missing.
        ConfigError: not one integer index per row, or an index out of range.
    """
    if task_ids is None:
        raise TypeError(f"{what} needs task_ids: one task index per row, e.g. task_ids=torch.tensor([0, 2])")
    ids = torch.as_tensor(task_ids)
    shape_ok = ids.dim() == 1 if batch is None else tuple(ids.shape) == (batch,)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or not shape_ok:
        raise ConfigError(
            f"task_ids must hold one integer task index per row, shape ({'batch' if batch is None else batch},); got "
            f"{ids.dtype} of shape {list(ids.shape)}"
        )
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_tasks):
        raise ConfigError(f"task_ids must lie in [0, {num_tasks}) (num_tasks={num_tasks}); got {ids.tolist()}")
    return ids.long()


def refuse_task_ids(encoder: nn.Module | None, task_ids: Any) -> None:
    """Raise ``TypeError`` for ``task_ids`` given to an adapter (``encoder``; ``None``: a layer adapter) that takes
    none, rather than ignore them."""
    if task_ids is not None and not getattr(encoder, "takes_task_ids", False):
        raise TypeError(
            "task_ids selects the task of a multitask prompt or Poly adapter; the active adapter takes none"
        )


def batch_prompt(encoder: nn.Module, batch: int, task_ids: Any) -> torch.Tensor:
    """The prompt for a batch: ``(batch, rows, width)`` per task for an encoder with ``takes_task_ids``, else the
    one table ``(1, rows, width)``; differentiable."""
    if getattr(encoder, "takes_task_ids", False):
        return encoder.task_prompt(task_ids, batch)
    return prompt_table(encoder).unsqueeze(0)


def extra_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors saved beside ``prompt_embeddings`` (its ``extra_keys``), detached."""
    return {key: getattr(encoder, key).detach() for key in getattr(encoder, "extra_keys", ())}


def prompt_table(encoder: nn.Module) -> torch.Tensor:
    """The encoder's output for all its virtual tokens, ``(rows, width)``; differentiable. An encoder whose rows
    live in several tensors (a cartridge's frozen and trainable tokens) gives them through its own ``table()``."""
    own = getattr(encoder, "table", None)
    if callable(own):
        return own()
    rows = encoder.embedding.num_embeddings
    indices = torch.arange(rows, device=encoder.embedding.weight.device).unsqueeze(0)  # (1, rows)
    return encoder(indices)[0]


@torch.no_grad()
def saved_table(encoder: nn.Module) -> torch.Tensor:
    """What peft's files hold for a prompt adapter: the encoder's output table ``(rows, width)``, detached."""
    return prompt_table(encoder).detach()


# Bounds on a reparameterisation encoder's size fields, far above any real model's hidden size / depth: they stop a
# config file from asking for an encoder that cannot even be sized (``encoder_hidden_size ** 2`` past 2**63).
MAX_ENCODER_HIDDEN_SIZE = 2**20
MAX_ENCODER_LAYERS = 1024


def check_encoder_size(name: str, value: object, limit: int) -> None:
    """Refuse an encoder size field that is not ``None`` or an integer in ``[1, limit]``."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit):
        raise ConfigError(f"{name} must be a positive integer of at most {limit} (or None), got {value!r}")


# --- what the base model offers ---------------------------------------------------------------------------------------

def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels for a seq2seq model (BART's rule, as peft exports it): ``input_ids`` ``[batch, T]``
    moved one position right, ``decoder_start_token_id`` first, ignored positions (``-100``) set to ``pad_token_id``.

    Raises:
        ValueError: ``pad_token_id`` is ``None``.
    """
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _first(config, *names: str):
    for name in names:
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def _signature(fn) -> tuple[frozenset[str], bool]:
    params = inspect.signature(fn).parameters
    return frozenset(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def cache_argument(model: nn.Module) -> str | None:
    """The forward argument of :data:`CACHE_ARGUMENTS` that takes a KV cache; for a task head without one that
    forwards ``**kwargs`` to its backbone (``BertForSequenceClassification``), the backbone's name. ``None`` when
    the model cannot take a cache."""
    names, var_kw = _signature(model.forward)
    backbone = getattr(model, "base_model", None)
    if not names & set(CACHE_ARGUMENTS) and var_kw and isinstance(backbone, nn.Module) and backbone is not model:
        names, _ = _signature(backbone.forward)
    return next((name for name in CACHE_ARGUMENTS if name in names), None)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's word-embedding module (``get_input_embeddings()``), or ``None``."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None


def _max_positions(model: nn.Module) -> int | None:
    mc = _model_config(model)
    value = _first(mc, "max_position_embeddings", "n_positions")
    return value if isinstance(value, int) else None


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


# --- lining inputs up with the prompt ---------------------------------------------------------------------------------

def _bind(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional forward arguments as keywords (by the model's forward signature)."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments, expected at most {len(names)}")
    bound = dict(zip(names, args))
    clash = sorted(set(bound) & set(kwargs))
    if clash:
        raise TypeError(f"{type(model).__name__}.forward got multiple values for {clash}")
    return {**bound, **kwargs}


def _pop_cache(kwargs: dict[str, Any]):
    """The cache passed under either name of :data:`CACHE_ARGUMENTS` (removed from ``kwargs``), or ``None``."""
    cache = None
    for name in CACHE_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None:
            cache = value
    return cache


def _cache_length(cache) -> int:
    return cache.get_seq_length() if cache is not None else 0


def _extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ConfigError(
            f"with a prompt adapter the attention mask must be 2-D (batch, length), got shape {list(mask.shape)}"
        )
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, T + S)


def _positions_from_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the last ``length`` tokens, counted over unmasked tokens (as ``generate()`` does)."""
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 0)
    return positions[:, -length:]


def _check_length(model: nn.Module, config: PromptLearningConfig, total: int, what: str) -> None:
    limit = _max_positions(model)
    if limit is not None and total > limit:
        raise ConfigError(
            f"num_virtual_tokens={config.num_virtual_tokens} plus {what} needs {total} positions but "
            f"{type(model).__name__} has {limit} (max_position_embeddings); shorten the input or use fewer virtual "
            f"tokens"
        )


def _batch_and_length(kwargs: dict[str, Any], *keys: str) -> tuple[int, int]:
    """Batch size and length of the first of ``keys`` present (``input_ids``, ``inputs_embeds``, ...)."""
    source = next((kwargs[k] for k in keys if kwargs.get(k) is not None), None)
    if source is None:
        raise ConfigError(f"pass one of {list(keys)}")
    return source.shape[0], source.shape[1] if source.dim() > 1 else 1


def prepend_positions(
    kwargs: dict[str, Any], n: int, *, in_input: bool, mask_key: str = "attention_mask",
    position_key: str | None = "position_ids", token_labels: bool = False, span_keys: tuple[str, ...] = (),
) -> None:
    """Line the inputs indexed by token position up with ``n`` prompt positions in front of the sequence, in place.

    The attention mask ``(B, S)`` gets ``n`` ones in front: the model attends to the whole prompt.

    Args:
        kwargs: The forward (or ``generate()``) keyword arguments.
        n: Number of prompt positions ``T``.
        in_input: The ``n`` positions are part of this call's input (virtual tokens at the front of
            ``inputs_embeds``): ``token_type_ids`` get ``n`` zeros and ``position_ids`` the ids ``0..n-1`` in front,
            per-token ``labels`` get ``-100``, ``span_keys`` shift by ``n``. Otherwise they are already in the KV
            cache (a prefix, or the virtual tokens of an earlier call): only the positions shift by ``n``.
        mask_key: The mask of the sequence the prompt precedes (``decoder_attention_mask`` for a prefix on an
            encoder-decoder model).
        position_key: Its explicit position ids, or ``None`` when the prompt does not move them.
        token_labels: ``labels`` has one entry per input token.
        span_keys: Inputs holding token indices into the sequence.
    """
    mask = _extend_mask(kwargs.pop(mask_key, None), n)
    if mask is not None:
        kwargs[mask_key] = mask
    positions = kwargs.get(position_key) if position_key is not None else None
    if positions is not None:
        positions = positions + n
        if in_input:
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            positions = torch.cat([virtual, positions], dim=1)  # (B, n + S)
        kwargs[position_key] = positions
    if not in_input:
        return
    if kwargs.get("token_type_ids") is not None:
        types_ = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types_.new_zeros(types_.shape[0], n), types_], dim=1)
    if token_labels and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    for key in span_keys:
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + n


def _run(model: nn.Module, kwargs: dict[str, Any], cache, task: PromptTask):
    """``model(**kwargs)`` with ``cache`` under the model's own argument name and, if the task asks, positions
    derived from the (already extended) attention mask."""
    if task.positions_from_mask and not _is_encoder_decoder(model) and kwargs.get("position_ids") is None \
            and kwargs.get("attention_mask") is not None and "position_ids" in _signature(model.forward)[0]:
        _, length = _batch_and_length(kwargs, "input_ids", "inputs_embeds")
        kwargs["position_ids"] = _positions_from_mask(kwargs["attention_mask"], length)
    if cache is not None:
        cache_name = cache_argument(model)
        if cache_name is None:
            raise ConfigError(f"{type(model).__name__}.forward takes no KV cache")
        kwargs[cache_name] = cache
    return model(**kwargs)


# --- the two strategies -----------------------------------------------------------------------------------------------

class PromptStrategy:
    """How a prompt method's table reaches the model; one instance per way (:data:`EMBEDDING_PROMPT`,
    :data:`deltatune.prefix.PREFIX`), named by each method's :attr:`PromptMethod.strategy`."""

    def table_shape(self, config: PromptLearningConfig) -> tuple[int, int]:
        """``(rows, width)`` of the saved ``prompt_embeddings``."""
        raise NotImplementedError

    def check_model(self, model: nn.Module, config: PromptLearningConfig) -> None:
        """Refuse a model whose forward cannot take this prompt (before any dimension is read)."""
        raise NotImplementedError

    def fit_dimensions(self, config: PromptLearningConfig, model_config: dict[str, Any], filled: set[str]) -> None:
        """Adjust the dimensions just read from the model (``filled``), in place. Nothing by default."""

    def check_dimensions(self, config: PromptLearningConfig, model: nn.Module) -> None:
        """Refuse filled-in dimensions that do not fit the model."""
        raise NotImplementedError

    def forward(self, model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, task: PromptTask,
                kwargs: dict[str, Any], task_ids: Any = None):
        """Run ``model`` on ``kwargs`` (keywords only) with the prompt fed in; ``task_ids`` for an encoder that
        takes them (checked before)."""
        raise NotImplementedError

    def generate(self, model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, kwargs: dict[str, Any],
                 task_ids: Any = None):
        """``model.generate(**kwargs)`` with the prompt fed in; ``kwargs`` has an ``attention_mask``."""
        raise NotImplementedError


class EmbeddingPrompt(PromptStrategy):
    """Virtual tokens prepended to ``inputs_embeds`` (Lester et al., 2021, §2: ``[P; X_e]``)."""

    def __repr__(self) -> str:
        return "EMBEDDING_PROMPT"

    def table_shape(self, config: PromptLearningConfig) -> tuple[int, int]:
        return config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim

    def check_model(self, model: nn.Module, config: PromptLearningConfig) -> None:
        name = type(model).__name__
        if "inputs_embeds" not in _signature(model.forward)[0]:
            raise ConfigError(
                f"{name}.forward takes no 'inputs_embeds', so {config.peft_type.value} cannot prepend virtual "
                f"tokens; use a model whose forward accepts inputs_embeds"
            )
        if input_embeddings(model) is None:
            raise ConfigError(
                f"{name} has no get_input_embeddings(); {config.peft_type.value} needs the word embeddings"
            )

    def check_dimensions(self, config: PromptLearningConfig, model: nn.Module) -> None:
        width = getattr(getattr(input_embeddings(model), "weight", None), "shape", (None,))[-1]
        if isinstance(width, int) and config.token_dim != width:
            raise ConfigError(
                f"token_dim={config.token_dim} differs from the width {width} of {type(model).__name__}'s word "
                f"embeddings, which the virtual tokens are prepended to; set token_dim={width} (or leave it unset)"
            )

    @staticmethod
    def _prompted(model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, ids: torch.Tensor | None,
                  embeds: torch.Tensor | None, task_ids: Any = None) -> torch.Tensor:
        """``[P; X_e]``: the first ``T`` virtual-token embeddings in front of the embedded input, ``(B, T + S, d)``
        (per row for an encoder that takes ``task_ids``).

        Encoder-decoder configs keep ``2T`` rows (``num_transformer_submodules=2``); as in peft, only the first
        ``T`` are fed (to the encoder), the others are saved but unused."""
        if embeds is None:
            if ids is None:
                raise ConfigError("pass input_ids or inputs_embeds")
            embeds = input_embeddings(model)(ids)  # (B, S, d)
        table = batch_prompt(encoder, embeds.shape[0], task_ids)[:, : config.num_virtual_tokens]  # (B or 1, T, d)
        table = table.to(dtype=embeds.dtype, device=embeds.device)
        return torch.cat([table.expand(embeds.shape[0], -1, -1), embeds], dim=1)

    def forward(self, model, config, encoder, task, kwargs, task_ids=None):
        """A call that passes a non-empty cache (decoder-only) or ``encoder_outputs`` (encoder-decoder) continues
        from an earlier call whose virtual tokens (of the rows' tasks) are already in it."""
        cache = _pop_cache(kwargs)
        encoder_decoder = _is_encoder_decoder(model)
        fed = kwargs.get("encoder_outputs") is not None if encoder_decoder else _cache_length(cache) > 0
        if fed:
            prepend_positions(kwargs, config.num_virtual_tokens, in_input=False)
            return _run(model, kwargs, cache, task)
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        kwargs["inputs_embeds"] = self._prompted(model, config, encoder, ids, embeds, task_ids)
        batch, total = kwargs["inputs_embeds"].shape[:2]
        length = total - config.num_virtual_tokens
        _check_length(model, config, total, f"an input of {length} tokens")
        labels = kwargs.get("labels")
        # Per-token labels: the task says so, or (the generic wrapper, no task_type) they are shaped like the input.
        # An encoder-decoder model's labels are the decoder's, which has no virtual tokens.
        per_token = task.token_labels or (labels is not None and tuple(labels.shape[:2]) == (batch, length))
        prepend_positions(kwargs, config.num_virtual_tokens, in_input=True,
                          token_labels=per_token and not encoder_decoder, span_keys=task.span_keys)
        return _run(model, kwargs, cache, task)

    def generate(self, model, config, encoder, kwargs, task_ids=None):
        """Decoder-only ``generate()`` takes ``input_ids`` beside the prompted ``inputs_embeds`` (and returns the ids
        followed by the new tokens); encoder-decoder ``generate()`` takes one of the two. The rows' task prompts are
        in ``inputs_embeds``, which ``generate()`` expands with the rows for beams and ``num_return_sequences``."""
        ids = kwargs.pop("input_ids", None) if _is_encoder_decoder(model) else kwargs.get("input_ids")
        kwargs["inputs_embeds"] = self._prompted(model, config, encoder, ids, kwargs.pop("inputs_embeds", None),
                                                 task_ids)
        prepend_positions(kwargs, config.num_virtual_tokens, in_input=True)
        return model.generate(**kwargs)


EMBEDDING_PROMPT = EmbeddingPrompt()


# --- adding an adapter: checks, dimensions, encoder ------------------------------------------------------------------

def fill_dimensions(config: PromptLearningConfig, model: nn.Module, strategy: PromptStrategy) -> None:
    """Fill the config's ``None`` dimensions from the model's config, as peft does (so files agree), in place."""
    mc = _model_config(model)
    needed = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    filled = set()
    for field_name, names in needed.items():
        if getattr(config, field_name) is None:
            value = _first(mc, *names)
            if value is None:
                raise ConfigError(
                    f"cannot read {field_name} from {type(model).__name__}'s config; set {field_name} in the "
                    f"{type(config).__name__}"
                )
            setattr(config, field_name, value)
            filled.add(field_name)
    strategy.fit_dimensions(config, mc.to_dict() if hasattr(mc, "to_dict") else {}, filled)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


def make_prompt_encoder(model: nn.Module, config: PromptLearningConfig, method: PromptMethod) -> nn.Module:
    """Check that ``model`` can take the method's prompt, fill the config's dimensions and build the encoder.

    A config in inference mode (a saved adapter being loaded) gets a plain :class:`PromptTable` of the saved shape:
    peft's files hold the encoder's output, not its parameters.

    Raises:
        ConfigError: the model's forward cannot take ``inputs_embeds`` (embedding prompt) or a KV cache (prefix),
            the dimensions cannot be read or do not fit, or gradient checkpointing is on for prefix tuning.
    """
    if not isinstance(config, PromptLearningConfig):
        raise ConfigError(f"{type(config).__name__} is not a prompt-learning config")
    strategy = method.strategy
    strategy.check_model(model, config)
    fill_dimensions(config, model, strategy)
    strategy.check_dimensions(config, model)
    limit = _max_positions(model)
    if limit is not None and config.num_virtual_tokens >= limit:
        raise ConfigError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for input in {type(model).__name__}, "
            f"which has {limit} positions"
        )
    if config.inference_mode:
        encoder = (method.loaded_encoder or (lambda c: PromptTable(*strategy.table_shape(c))))(config)
    else:
        encoder = method.make_encoder(config, input_embeddings(model))
    reference = next(iter(model.parameters()), None)
    return encoder.to(reference.device) if reference is not None else encoder


# --- files ----------------------------------------------------------------------------------------------------------

def load_prompt_embeddings(
    encoder: nn.Module, table: torch.Tensor, source: str, extra: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Put a saved ``prompt_embeddings`` table (and the encoder's ``extra_keys`` tensors, ``extra``) into
    ``encoder``; returns the encoder to keep.

    A :class:`PromptTable` takes the values directly. A reparameterised encoder (P-tuning's MLP/LSTM, prefix
    projection) cannot be inverted from its output, so it is replaced by a trainable table holding that output:
    the outputs are exactly the saved adapter's and training continues on the table (peft refuses
    ``is_trainable=True`` for prompt adapters).

    Raises:
        AdapterLoadError: the table's shape differs from the adapter's (different model or config), or the file
            lacks or has unknown extra tensors.
    """
    current = encoder.embedding.weight if isinstance(encoder, PromptTable) else prompt_table(encoder)
    want = tuple(current.shape)
    load_table = getattr(encoder, "load_table", None)  # an encoder that holds its output table in parts
    if tuple(table.shape) != want:
        raise AdapterLoadError(
            f"{source}: shape mismatch for {PROMPT_KEY!r}: saved {list(table.shape)}, adapter has {list(want)}. "
            f"The adapter was saved for another base model or with another num_virtual_tokens/token_dim/num_layers."
        )
    extra, expected = dict(extra or {}), extra_state(encoder)
    if set(extra) != set(expected):
        missing, unknown = sorted(set(expected) - set(extra)), sorted(set(extra) - set(expected))
        raise AdapterLoadError(f"{source}: missing tensors {missing} / unexpected keys {unknown} for this adapter")
    for key, value in extra.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterLoadError(
                f"{source}: shape mismatch for {key!r}: saved {list(value.shape)}, adapter has "
                f"{list(expected[key].shape)} (another num_tasks / num_ranks / num_virtual_tokens?)"
            )
    if callable(load_table):
        load_table(table)
        return encoder
    if not isinstance(encoder, PromptTable):
        warnings.warn(
            f"{source}: a saved {type(encoder).__name__} holds only its output; continuing training on that output "
            f"as a plain table (the reparameterisation network is not part of peft's file format)",
            stacklevel=3,
        )
        weight = encoder.embedding.weight
        encoder = PromptTable(*want).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        encoder.embedding.weight.copy_(table.to(encoder.embedding.weight))
        for key, value in extra.items():
            getattr(encoder, key).copy_(value.to(getattr(encoder, key)))
    return encoder


# --- running: what PeftModel.forward / generate call ---------------------------------------------------------------

def prompt_forward(
    model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, strategy: PromptStrategy, task: PromptTask,
    args: tuple, kwargs: dict[str, Any], task_ids: Any = None,
):
    """Run ``model`` (the base transformers model) with the prompt fed in; returns the model's own output.
    ``task_ids``: one task index per row, for an encoder that takes them (multitask prompt tuning)."""
    refuse_task_ids(encoder, task_ids)
    return strategy.forward(model, config, encoder, task, _bind(model, args, kwargs), task_ids)


def prompt_generate(
    model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, strategy: PromptStrategy, args: tuple,
    kwargs: dict[str, Any], task_ids: Any = None,
):
    """``model.generate()`` with the prompt fed in and the KV cache on (unless the caller turns it off).

    Returns exactly what the base model's ``generate()`` returns for the same call: decoder-only models give the
    input ids followed by the new tokens (virtual tokens never appear in the output).
    """
    refuse_task_ids(encoder, task_ids)
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "inputs" in kwargs or "input_ids" in kwargs:
            raise TypeError("generate() takes the input ids as its only positional argument")
        kwargs["input_ids"] = args[0]
    if "inputs" in kwargs:
        kwargs["input_ids"] = kwargs.pop("inputs")
    if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
        raise ConfigError(
            "generate() with a prompt adapter builds its own cache (the prompt must be in it); do not pass cache / "
            "past_key_values"
        )
    batch, length = _batch_and_length(kwargs, "input_ids", "inputs_embeds")
    if not _is_encoder_decoder(model):
        new = kwargs.get("max_new_tokens")
        T = config.num_virtual_tokens
        total = T + length + new if new is not None else T + max(length, kwargs.get("max_length") or 0)
        _check_length(model, config, total, f"an input of {length} tokens and the tokens to generate")
    if kwargs.get("attention_mask") is None:
        source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=source.device)
    return strategy.generate(model, config, encoder, kwargs, task_ids)

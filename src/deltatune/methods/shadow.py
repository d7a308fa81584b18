"""ShadowPEFT: a small trainable *shadow* network that rides the frozen model's block loop.

ShadowPEFT (peft 0.21's ``ShadowConfig``; Figure 2 and §3.2–3.5 of its paper) does not change any weight. A shadow
backbone — by default a one-layer model of the base model's own architecture ("mirror") reading the base model's
frozen input embeddings — turns the inputs into a shadow state ``s⁽⁰⁾ = P(backbone(x))`` of the base width ``d``
(``P`` a projection when the backbone is narrower). Each adapted block ``l`` (whole decoder blocks, contiguous) then

* injects the discrepancy into its input (Eq. 2–4): ``h⁽ˡ⁾ = h + α · W_up(Dropout(h − s⁽ˡ⁻¹⁾) W_down)``, with
  ``W_down: d → r``, ``W_up: r → d`` (zero at init: a fresh adapter is the base model),
* runs the frozen block on it, and advances the state from the block's output ``o`` by a gated residual update
  (Eq. 5–7): ``s⁽ˡ⁾ = (1 − g) ⊙ s⁽ˡ⁻¹⁾ + g ⊙ T(o)``, ``g = σ(G(o))``, with ``T`` and ``G`` two-layer GELU MLPs
  ``d → update_hidden_size → d``.

With ``labels``, an auxiliary loss trains the shadow path on its own (Eq. 8–9): ``λ · CE(head(s⁽⁰⁾), labels)`` is added
to the task loss (``auxiliary_loss_weight = λ``; the base LM head for causal LMs, a copy of the classifier for sequence
classification), which is what makes ``unload_shadow()`` — the shadow network alone, ``head(P(backbone(x)))`` — a
usable small model (§3.5). The adaptation is an input-dependent trajectory, not a weight delta, so it cannot merge.

How it fits the core: each adapted block is an ``AdapterLayer`` whose :class:`ShadowBlock` runs the block
(``Delta.run_layer``); the backbone, projection and head are the adapter's *network*
(``LayerMethod.make_network``), kept in ``base_model.shared_state``. The state travels beside the model rather than
through it: :func:`run_scope` (``LayerMethod.run_scope``, opened by ``base_model``'s forward and ``generate``) seeds
``s⁽⁰⁾`` from the model's raw inputs in a forward pre-hook and keeps ``states[i]``, the state entering the ``i``-th
adapted block, which that block reads and whose successor it writes (so a block recomputed under checkpointing reads
the same state again). In cached generation the backbone's key/value layers ride in the model's own cache object,
appended after the base model's layers, so beam reordering, cropping and batch expansion apply to both.

Saved keys are peft's, which keep the literal slot ``default`` whatever the adapter's name:
``<block>.shadow_down.default.weight``, ``<block>.shadow_update_gate.default.0.weight`` ...,
``base_model.shadow_backbone.default.<backbone keys>``, ``base_model.shadow_projection.default.weight`` (a narrower
backbone), ``base_model.shadow_head.default.<head keys>`` (sequence classification).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType, TaskType
from ..errors import AdapterStateError, ConfigError, NotMergeableError, TargetError
from ..layers import Delta, unwrap
from ..prompt import CACHE_ARGUMENTS, cache_argument
from ..registry import LayerMethod
from ..rows import current_row_plan
from .common import check_dropout, check_scale, check_size

__all__ = ["ShadowConfig"]  # exported from deltatune

_BLOCK_LISTS = ("layers", "h", "layer", "block")  # names transformers gives a model's list of blocks


@dataclass
class ShadowConfig(LayerConfig):
    """Configuration of a ShadowPEFT adapter (peft's field names and defaults). ``target_modules`` names whole
    blocks (``None``: every block of the model's block list); the adapted blocks must be contiguous.

    Attributes:
        r: Rank of the injection bottleneck ``W_down`` / ``W_up``.
        shadow_alpha: Strength ``α`` of the injected correction (Eq. 4).
        shadow_dropout: Dropout on the discrepancy ``h − s`` before the bottleneck, in training (Eq. 3).
        init_weights: Zero ``W_up`` so that a fresh adapter is the base model; ``False`` keeps it random (tests).
        shadow_model: ``"mirror"`` builds the backbone from the base model's own config (see the ``shadow_*``
            overrides); anything else is a model id or local directory loaded with ``AutoModel`` (a
            ``causal_lm_with_hidden_projection`` checkpoint also brings its trained projection to the base width).
        shadow_num_hidden_layers: Depth of the mirror backbone (``None``: 1).
        shadow_hidden_size: Width of the mirror backbone (``None``: the base width); a different width adds the
            projection ``P``.
        shadow_num_attention_heads: Attention heads of the mirror backbone (``None``: the base model's).
        shadow_intermediate_size: Feed-forward width of the mirror backbone (``None``: the base model's).
        share_embeddings: Feed the backbone the base model's frozen input embeddings (``inputs_embeds``) instead of
            a table of its own; only for a mirror backbone of the base width.
        update_hidden_size: Hidden width of the update MLPs ``T`` and ``G`` (``None``: ``r``).
        auxiliary_loss_weight: ``λ`` of the auxiliary shadow loss added to ``outputs.loss`` when ``labels`` are
            given (Eq. 8–9); 0 disables it.
    """

    peft_type: PeftType = field(default=PeftType.SHADOW, init=False)
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_scale("shadow_alpha", self.shadow_alpha)
        check_dropout("shadow_dropout", self.shadow_dropout)
        check_scale("auxiliary_loss_weight", self.auxiliary_loss_weight)
        if self.auxiliary_loss_weight < 0:
            raise ConfigError(f"auxiliary_loss_weight must be >= 0, got {self.auxiliary_loss_weight!r}")
        for name in ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                     "shadow_intermediate_size", "update_hidden_size"):
            if getattr(self, name) is not None:
                check_size(name, getattr(self, name))
        if not isinstance(self.shadow_model, str) or not self.shadow_model:
            raise ConfigError(f"shadow_model must be 'mirror' or a model id / directory, got {self.shadow_model!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be combined with a regex target_modules; list the blocks")
        overrides = [n for n in ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                                 "shadow_intermediate_size") if getattr(self, n) is not None]
        if self.shadow_model != "mirror" and overrides:
            raise ConfigError(
                f"shadow_model={self.shadow_model!r} brings its own architecture; {', '.join(overrides)} only "
                f"shape a 'mirror' backbone: unset them"
            )


def _slot(module: nn.Module) -> nn.ModuleDict:
    """``module`` under peft's adapter slot: peft keeps these modules in per-adapter dicts and writes the slot as
    ``default`` into every file, so deltatune holds them the same way and its keys are peft's unchanged."""
    return nn.ModuleDict({"default": module})


def _mlp(width: int, hidden: int) -> nn.Sequential:
    """``T`` / ``G`` of Eq. 5–6: ``d → hidden → d`` with a GELU between (keys ``0.*`` and ``2.*``, as peft's)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


# --- the per-block part ------------------------------------------------------------------------------------------

class ShadowBlock(Delta):
    """One adapted block: the injection (Eq. 2–4) into its input and the gated update (Eq. 5–7) of the shadow state
    from its output. Runs the block itself (``run_layer``); ``position`` is the block's index among the adapter's
    blocks, where it finds its state in the current :class:`_Run`."""

    def __init__(self, width: int, config: ShadowConfig, position: int) -> None:
        super().__init__()
        hidden = config.update_hidden_size or config.r
        self.alpha = config.shadow_alpha
        self.position = position
        self.shadow_down = _slot(nn.Linear(width, config.r, bias=False))
        self.shadow_up = _slot(nn.Linear(config.r, width, bias=False))
        self.shadow_dropout = nn.Dropout(config.shadow_dropout) if config.shadow_dropout else nn.Identity()
        self.shadow_update_transform = _slot(_mlp(width, hidden))
        self.shadow_update_gate = _slot(_mlp(width, hidden))
        if config.init_weights:
            nn.init.zeros_(self.shadow_up["default"].weight)

    def inject(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Eq. 2–4: ``h + α · W_up(Dropout(h − s) W_down)``, computed in the adapter's dtype, added in ``h``'s."""
        down = self.shadow_down["default"]
        gap = self.shadow_dropout((hidden - state).to(down.weight.dtype))
        return hidden + (self.alpha * self.shadow_up["default"](down(gap))).to(hidden.dtype)

    def update(self, out: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Eq. 5–7: ``(1 − g) ⊙ s + g ⊙ T(o)`` with ``g = σ(G(o))``, in the adapter's dtype, returned in ``s``'s."""
        transform = self.shadow_update_transform["default"]
        o = out.to(transform[0].weight.dtype)
        gate = torch.sigmoid(self.shadow_update_gate["default"](o))
        return ((1 - gate) * state.to(o.dtype) + gate * transform(o)).to(state.dtype)

    @classmethod
    def run_layer(cls, deltas: Sequence[ShadowBlock], base_layer: nn.Module, *args, **kwargs):
        run = _RUN.get()
        if run is None:
            raise AdapterStateError(
                "a Shadow adapter's blocks need the shadow state that the PeftModel's forward / generate() computes "
                "from the inputs: call the PeftModel rather than its base model"
            )
        if len(deltas) != 1:
            raise AdapterStateError("ShadowPEFT runs exactly one active adapter per block")
        block = deltas[0]
        hidden = args[0] if args else kwargs["hidden_states"]
        state = run.states[block.position]
        if state is None or state.shape[:-1] != hidden.shape[:-1]:
            raise AdapterStateError(
                f"the shadow state {None if state is None else tuple(state.shape[:-1])} does not line up with the "
                f"block's input {tuple(hidden.shape[:-1])}: the adapted blocks must run in order, once per forward"
            )
        injected = block.inject(hidden, state)
        if args:
            args = (injected, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": injected}
        out = base_layer(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            new_hidden = out
        elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            new_hidden = out[0]
        else:
            raise TypeError(f"{type(base_layer).__name__} returned {type(out).__name__}; ShadowPEFT adapts blocks "
                            f"that return their hidden states (a tensor, or a tuple starting with it)")
        run.states[block.position + 1] = block.update(new_hidden, state)
        return out

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise AdapterStateError("adapter_names (one adapter per row) is not supported with a Shadow adapter")

    def check_mergeable(self, base_layer: nn.Module) -> None:
        raise NotMergeableError(
            "ShadowPEFT cannot be merged into the base weights: its change is an input-dependent shadow state carried "
            "through the blocks, not a weight update. Keep the adapter unmerged, or take the shadow network alone "
            "with base_model.unload_shadow()"
        )


# --- the model-level part: backbone, projection, head ------------------------------------------------------------

class ShadowNetwork(nn.Module):
    """The adapter's shadow backbone, projection to the base width and (sequence classification) head, under
    peft's keys. ``blocks`` are the adapted blocks in order, ``width`` the base width ``d``, ``share_embeddings``
    whether the backbone reads the base model's input embeddings, ``lm_head`` whether the auxiliary loss uses the
    base model's output head."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, head: nn.Module | None, *, blocks: Sequence[str],
                 width: int, share_embeddings: bool, lm_head: bool, frozen: Sequence[str] = ()) -> None:
        super().__init__()
        self.width = width  # the base model's hidden size d, where the shadow state lives
        self.shadow_backbone = _slot(backbone)
        self.shadow_projection = _slot(projection)
        if head is not None:
            self.shadow_head = _slot(head)
        self.blocks = tuple(blocks)
        self.share_embeddings = share_embeddings
        self.lm_head = lm_head
        self.frozen = tuple(frozen)  # parameter names that never train (a pretrained backbone's embeddings)

    @property
    def backbone(self) -> nn.Module:
        return self.shadow_backbone["default"]

    @property
    def projection(self) -> nn.Module:
        return self.shadow_projection["default"]

    @property
    def head(self) -> nn.Module | None:
        return self.shadow_head["default"] if hasattr(self, "shadow_head") else None

    def requires_grad_(self, requires_grad: bool = True) -> ShadowNetwork:
        """As ``nn.Module``'s, but a pretrained backbone's embedding tables stay frozen (peft: training them is not
        parameter-efficient)."""
        super().requires_grad_(requires_grad)
        for name in self.frozen:
            self.get_parameter(name).requires_grad_(False)
        return self

    def seed(self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
             attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             cache: Any | None) -> torch.Tensor:
        """``s⁽⁰⁾ = P(backbone(x))``: ``(batch, tokens, d)`` for the tokens of this call; ``cache`` is the backbone's
        own cache (tokens of earlier calls), or ``None``."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "return_dict": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs[cache_argument(self.backbone)] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        if self.share_embeddings and inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        if inputs_embeds is not None:
            out = self.backbone(inputs_embeds=inputs_embeds, **kwargs)
        else:
            out = self.backbone(input_ids=input_ids, **kwargs)
        return self.projection(out.last_hidden_state)


def _backbone_of(model: nn.Module, blocks: Sequence[str]) -> tuple[str, nn.Module]:
    """The innermost transformers model holding the adapted blocks (``LlamaModel`` in ``LlamaForCausalLM``): what a
    mirror backbone copies the architecture of."""
    from transformers import PreTrainedModel

    owner = blocks[0].rpartition(".")[0]
    parts = owner.split(".")
    for end in range(len(parts), -1, -1):
        name = ".".join(parts[:end])
        module = model.get_submodule(name)
        if isinstance(module, PreTrainedModel):
            return name, module
    raise TargetError(f"{type(model).__name__} is not a transformers model; ShadowPEFT mirrors a transformers "
                      f"backbone (or loads one from shadow_model)")


def _mirror(backbone: nn.Module, config: ShadowConfig) -> nn.Module:
    """A fresh backbone of ``backbone``'s class from a copy of its config, shrunk as the ``shadow_*`` fields say."""
    cfg = copy.deepcopy(backbone.config)
    if hasattr(cfg, "quantization_config"):  # the mirror is built in full precision, not quantized
        del cfg.quantization_config
    overrides = {
        ("num_hidden_layers", "n_layer", "num_layers"): config.shadow_num_hidden_layers or 1,
        ("hidden_size", "n_embd", "d_model"): config.shadow_hidden_size,
        ("intermediate_size", "ffn_dim", "n_inner"): config.shadow_intermediate_size,
        ("num_attention_heads", "n_head", "num_heads"): config.shadow_num_attention_heads,
    }
    for names, value in overrides.items():
        if value is None:
            continue
        name = next((n for n in names if hasattr(cfg, n)), None)
        if name is None:
            raise ConfigError(f"{type(cfg).__name__} has none of {list(names)}, so a mirror backbone cannot be "
                              f"shaped; set shadow_model to a pretrained backbone instead")
        setattr(cfg, name, value)
    layers = cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else None
    if isinstance(getattr(cfg, "layer_types", None), list) and layers is not None:  # per-layer lists follow the depth
        types = cfg.layer_types or ["full_attention"]
        cfg.layer_types = (types + [types[-1]] * layers)[:layers]
    if isinstance(getattr(cfg, "max_window_layers", None), int) and layers is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, layers)
    return type(backbone)(cfg)


def _pretrained(source: str) -> tuple[nn.Module, nn.Module | None]:
    """``(backbone, trained projection or None)`` from ``shadow_model``: an ``AutoModel`` checkpoint, or a
    ``causal_lm_with_hidden_projection`` one (config ``shadow_model_config``, weights ``shadow_model.*`` and
    ``shadow_hidden_projection.weight`` in ``model.safetensors``)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file

    from safetensors.torch import load_file

    from ..files import read_json_file, read_safetensors_header

    raw = read_json_file(cached_file(source, "config.json"))
    if not isinstance(raw, dict) or raw.get("model_type") != "causal_lm_with_hidden_projection":
        return AutoModel.from_pretrained(source), None
    inner = dict(raw["shadow_model_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
    path = cached_file(source, "model.safetensors")
    read_safetensors_header(path)  # a corrupt header is refused before anything is allocated
    weights = load_file(path)
    prefix = "shadow_model."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    weight = weights.get("shadow_hidden_projection.weight")
    if weight is None:
        raise ConfigError(f"shadow_model {source!r} is a projected shadow checkpoint without "
                          f"'shadow_hidden_projection.weight'")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return backbone, projection


def _width(config: Any) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ConfigError(f"cannot read the hidden size of {type(config).__name__} (no hidden_size / n_embd / d_model)")


def make_network(config: ShadowConfig, model: nn.Module, targets: Mapping[str, nn.Module]) -> ShadowNetwork:
    """The adapter's :class:`ShadowNetwork`, in the base model's dtype and device (as peft places it)."""
    blocks = list(targets)
    _, base_backbone = _backbone_of(model, blocks)
    width = _width(model.config)
    projection = None
    if config.shadow_model == "mirror":
        backbone = _mirror(base_backbone, config)
    else:
        backbone, projection = _pretrained(config.shadow_model)
    shadow_width = _width(backbone.config)
    if projection is not None and (projection.in_features, projection.out_features) != (shadow_width, width):
        raise ConfigError(f"shadow_model {config.shadow_model!r}: its projection maps {projection.in_features} -> "
                          f"{projection.out_features}, the widths are {shadow_width} -> {width}")
    if projection is None:
        projection = nn.Linear(shadow_width, width, bias=False) if shadow_width != width else nn.Identity()
    share = (config.share_embeddings and config.shadow_model == "mirror" and shadow_width == width
             and "inputs_embeds" in inspect.signature(backbone.forward).parameters)
    if share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
        del backbone.embed_tokens  # read from the base model instead (other tables stay, as in peft)
    head = None
    if config.task_type == TaskType.SEQ_CLS:
        source = next((getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None),
                                                                                      nn.Module)), None)
        head = copy.deepcopy(_unwrapped(source)) if source is not None else None
    frozen: list[str] = []
    if config.shadow_model != "mirror":
        tables = {id(m) for m in (backbone.get_input_embeddings(), _output_embeddings(backbone)) if m is not None}
        frozen = [f"shadow_backbone.default.{n}" for n, p in backbone.named_parameters(remove_duplicate=False)
                  if id(backbone.get_submodule(n.rpartition(".")[0])) in tables]
    network = ShadowNetwork(backbone, projection, head, blocks=blocks, width=width, share_embeddings=share,
                            lm_head=config.task_type == TaskType.CAUSAL_LM, frozen=frozen)
    # the block's device (a meta-device copy in the loading dry run) and compute dtype (a float parameter: a quantized
    # block's weights are packed integers)
    reference = next(p for p in targets[blocks[0]].parameters() if p.is_floating_point())
    return network.to(device=reference.device, dtype=reference.dtype)


def _unwrapped(module: nn.Module) -> nn.Module:
    original = getattr(module, "original_module", None)  # a modules_to_save wrapper of an earlier adapter
    return original if isinstance(original, nn.Module) else module


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def make_block(config: ShadowConfig, base_layer: nn.Module, name: str, network: ShadowNetwork) -> ShadowBlock:
    block = ShadowBlock(network.width, config, network.blocks.index(name))
    return block.to(device=next(base_layer.parameters()).device)


# --- targets ------------------------------------------------------------------------------------------------------

def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and n.rpartition(".")[2] in _BLOCK_LISTS and len(m)]


def default_blocks(model: nn.Module) -> list[str]:
    """Every block of the model's first block list (``model.layers``, ``transformer.h``, ``bert.encoder.layer``)."""
    lists = _block_lists(model)
    if not lists:
        raise TargetError(f"{type(model).__name__} has no list of blocks named one of {list(_BLOCK_LISTS)}; set "
                          f"target_modules to the blocks to adapt, e.g. r'.*\\.layers\\.\\d+$'")
    name, blocks = lists[0]
    return [f"{name}.{i}" for i in range(len(blocks))]


def resolve_config(config: ShadowConfig, model: nn.Module, targets: Mapping[str, nn.Module]) -> ShadowConfig:
    """Check the targets: whole blocks of one block list, contiguous, in a decoder-only or encoder-only model."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise TargetError(f"{type(model).__name__} is an encoder-decoder model; ShadowPEFT rides one stack of blocks "
                          f"(decoder-only or encoder-only models)")
    lists = dict(_block_lists(model))
    owners = {name.rpartition(".")[0] for name in targets}
    indices = [int(name.rpartition(".")[2]) if name.rpartition(".")[2].isdigit() else -1 for name in targets]
    if len(owners) != 1 or next(iter(owners)) not in lists or -1 in indices:
        raise TargetError(
            f"ShadowPEFT adapts whole blocks of one block list; target_modules selected {list(targets)[:6]}. Blocks "
            f"of this model: {[f'{n}.{i}' for n, m in lists.items() for i in range(len(m))][:12]}"
        )
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise TargetError(f"the adapted blocks must be contiguous (the shadow state rides the blocks in order); "
                          f"got blocks {indices}")
    if config.task_type == TaskType.SEQ_CLS and not any(isinstance(getattr(model, n, None), nn.Module)
                                                        for n in ("score", "classifier")):
        raise TargetError(f"{type(model).__name__} has no 'score' or 'classifier' head for the shadow head to copy")
    return config


# --- running: the state beside the model ------------------------------------------------------------------------

@dataclass
class _Run:
    """One forward's (or one generate()'s) shadow bookkeeping: ``states[i]`` enters the ``i``-th adapted block."""

    network: ShadowNetwork
    states: list[torch.Tensor | None]
    attention_mask: torch.Tensor | None = None


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("deltatune_shadow_run", default=None)
# the backbone's cache riding in each model cache (see _riding_cache), dropped with the model's cache
_RIDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _riding_cache(cache: Any, backbone: nn.Module) -> Any:
    """The backbone's cache for the model's ``cache``: its layers are appended to ``cache.layers``, so whatever
    generation does to the model's cache (beam reordering, cropping, batch expansion or selection) happens to the
    backbone's too; it is built at the first call with an empty cache."""
    from transformers.cache_utils import Cache, DynamicCache

    rider = _RIDERS.get(cache)
    if rider is not None:
        return rider
    if not isinstance(cache, Cache):
        raise ConfigError(f"ShadowPEFT needs a transformers Cache object as the KV cache, got {type(cache).__name__}")
    if cache.get_seq_length() > 0:
        raise AdapterStateError(
            f"the KV cache already holds {cache.get_seq_length()} tokens that the Shadow adapter's backbone has not "
            f"seen (it was filled without this adapter); start from an empty cache"
        )
    rider = DynamicCache(config=backbone.config)
    cache.layers.extend(rider.layers)
    _RIDERS[cache] = rider
    return rider


def _seed_hook(run: _Run, model: nn.Module, forward_cache_name: str | None):
    """The model's forward pre-hook: ``s⁽⁰⁾`` from the raw inputs (only the top of the forward has them: inside, the
    mask is 4-D and the inputs are embedded), with the backbone's cache riding in the model's."""

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            raise ConfigError("a Shadow adapter's backbone reads input_ids or inputs_embeds; neither was given")
        # the cache as passed, under the forward's name or the other one (transformers 5.24+ still takes
        # past_key_values, deprecated), whose name is kept
        cache_name = next((n for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), forward_cache_name)
        cache = kwargs.get(cache_name) if cache_name is not None else None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(model.config, "use_cache", False))
        # a cache built here carries the backbone's layers; training caches are never reused (and would be
        # appended to twice under checkpointing), so only eval builds one
        if cache is None and use_cache and cache_name is not None and not model.training:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=model.config)
            kwargs = {**kwargs, cache_name: cache}
        rider = _riding_cache(cache, run.network.backbone) if cache is not None and use_cache else None
        run.attention_mask = kwargs.get("attention_mask")
        run.states = [None] * (len(run.network.blocks) + 1)
        run.states[0] = run.network.seed(model, input_ids, inputs_embeds, run.attention_mask,
                                         kwargs.get("position_ids"), rider)
        return args, kwargs

    return hook


@contextlib.contextmanager
def run_scope(base_model: nn.Module, adapter_name: str, config: ShadowConfig) -> Iterator[Any]:
    """``LayerMethod.run_scope``: while open, every forward of the model seeds the shadow state; yields the
    function that adds the auxiliary loss to a forward's outputs. Nothing while the adapter is not in effect (not
    active in its blocks, or adapters disabled)."""
    base_model.last_shadow_loss = None
    network = base_model.shared_state[adapter_name]
    entry = base_model.model.get_submodule(network.blocks[0])
    if entry.disabled or adapter_name not in entry.active_adapters:
        yield None
        return
    if current_row_plan() is not None:
        raise AdapterStateError("adapter_names (one adapter per row) is not supported with a Shadow adapter")
    if len(entry.active_adapters) != 1:
        raise AdapterStateError(f"ShadowPEFT runs with exactly one active adapter; active: {entry.active_adapters}")
    model = base_model.model
    run = _Run(network, [])
    handle = model.register_forward_pre_hook(_seed_hook(run, model, cache_argument(model)), with_kwargs=True)
    token = _RUN.set(run)
    try:
        yield lambda outputs, kwargs: _add_auxiliary_loss(base_model, config, run, outputs, kwargs.get("labels"))
    finally:
        _RUN.reset(token)
        handle.remove()


def _add_auxiliary_loss(base_model: nn.Module, config: ShadowConfig, run: _Run, outputs: Any,
                        labels: torch.Tensor | None) -> Any:
    """Eq. 8–9: with ``labels`` and a task loss, ``outputs.loss += λ · shadow loss``; the unweighted shadow loss is
    kept, detached, as ``outputs.shadow_loss`` and ``base_model.last_shadow_loss`` (peft's names)."""
    loss = shadow_loss(base_model.model, run, labels) if getattr(outputs, "loss", None) is not None else None
    if loss is None:
        return outputs
    base_model.last_shadow_loss = outputs.shadow_loss = loss.detach()
    if config.auxiliary_loss_weight > 0:
        outputs.loss = outputs.loss + config.auxiliary_loss_weight * loss
    return outputs


def shadow_loss(model: nn.Module, run: _Run, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The shadow path's own task loss on ``s⁽⁰⁾``: next-token cross-entropy through the base LM head (computed in
    chunks, without the full logits), or the classification loss of the shadow head on the last real token."""
    from ..fast import linear_cross_entropy

    state = run.states[0] if run.states else None
    if labels is None or state is None:
        return None
    if run.network.lm_head:
        return linear_cross_entropy(model.get_output_embeddings(), state, labels, shift=True)
    if run.network.head is None:
        return None
    return classification_loss(run.network.head(last_token(state, run.attention_mask)), labels)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``(batch, d)``: each row's state at its last attended position (left or right padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (attention_mask.ne(0) * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' sequence-classification loss chosen from the shapes, as peft's shadow loss does: regression for
    one label, cross-entropy for integer labels, binary cross-entropy (multi-label) otherwise."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# --- unload_shadow: the shadow network alone ------------------------------------------------------------------------

def _standalone_class():
    """Built on first use so that importing the method does not import transformers' generation stack."""
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

    class DetachedShadowModel(PreTrainedModel, GenerationMixin):
        """The shadow network without the base model (§3.5): ``head(P(backbone(x)))``, a causal LM that generates
        with a KV cache, or a sequence classifier. Returned by ``base_model.unload_shadow()``."""

        main_input_name = "input_ids"
        base_model_prefix = "backbone"
        _supports_sdpa = True
        _supports_attention_backend = True

        def __init__(self, network: ShadowNetwork, embeddings: nn.Module | None, head: nn.Module | None,
                     classifies: bool) -> None:
            super().__init__(network.backbone.config)
            self.backbone = network.backbone
            self.shadow_hidden_projection = network.projection
            self.head = head
            self.is_classification = classifies
            self._embeddings = [embeddings]  # a shared table is not a submodule: it belongs to the base model
            self.generation_config = getattr(self.backbone, "generation_config", None) or \
                GenerationConfig.from_model_config(self.config)

        def can_generate(self) -> bool:
            return getattr(self, "head", None) is not None and not getattr(self, "is_classification", True)

        def get_input_embeddings(self) -> nn.Module:
            return self._embeddings[0] if self._embeddings[0] is not None else self.backbone.get_input_embeddings()

        def get_output_embeddings(self) -> nn.Module | None:
            return None if self.is_classification else self.head

        def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
            for name in ("logits_to_keep", "num_logits_to_keep", "return_dict"):  # a causal LM's, not a backbone's
                kwargs.pop(name, None)
            if self._embeddings[0] is not None and inputs_embeds is None:
                inputs_embeds, input_ids = self._embeddings[0](input_ids), None
            out = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                return_dict=True, **kwargs)
            hidden = self.shadow_hidden_projection(out.last_hidden_state)
            if self.head is None:
                return hidden
            if self.is_classification:
                logits = self.head(last_token(hidden, attention_mask))
                loss = None if labels is None else classification_loss(logits, labels)
                return SequenceClassifierOutput(loss=loss, logits=logits)
            logits = self.head(hidden)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(),
                                       ignore_index=-100)
            cache = getattr(out, cache_field, None)
            return CausalLMOutputWithPast(loss=loss, logits=logits, **{cache_field: cache})

    return DetachedShadowModel


def unload_shadow(base_model: nn.Module, adapter_name: str | None = None, copy: bool = False) -> nn.Module:
    """peft's ``unload_shadow``: the shadow network of ``adapter_name`` (default: the active Shadow adapter) as a
    model of its own, sharing modules with this one (``copy=True``: independent copies, with a private copy of a
    shared embedding table, which is what to save)."""
    model = base_model.model
    shadow = [n for n, c in base_model.peft_config.items() if c.peft_type == PeftType.SHADOW]
    if adapter_name is None:
        active = [n for n in shadow if n in model.get_submodule(base_model.shared_state[n].blocks[0]).active_adapters]
        if not active:
            raise AdapterStateError(f"no Shadow adapter is active; pass adapter_name (Shadow adapters: {shadow})")
        adapter_name = active[0]
    if adapter_name not in shadow:
        raise AdapterStateError(f"{adapter_name!r} is not a Shadow adapter; Shadow adapters: {shadow}")
    network = base_model.shared_state[adapter_name]
    config = base_model.peft_config[adapter_name]
    if copy:
        network = _copy_module(network)
    embeddings = model.get_input_embeddings() if network.share_embeddings else None
    if embeddings is not None and copy:  # the backbone's own table slot (wte, ...) gets a copy
        table = _copy_module(embeddings)
        try:
            network.backbone.set_input_embeddings(table)
        except NotImplementedError:  # transformers finds no slot once make_network removed embed_tokens
            network.backbone.embed_tokens = table
        embeddings = None
    head = network.head if not network.lm_head else _output_embeddings(model)
    if network.lm_head and copy and head is not None:
        head = _copy_module(head)
    return _standalone_class()(network, embeddings, head, config.task_type == TaskType.SEQ_CLS)


def _copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of the module an adapted LM head or embedding wraps (``layers.unwrap``), or of ``module``."""
    return copy.deepcopy(unwrap(module))


def _per_adapter(part: str) -> property:
    """``base_model.shadow_<part>``: ``{adapter: module}`` over the Shadow adapters, as peft's tuner holds them."""

    def read(base_model: nn.Module) -> dict[str, nn.Module]:
        networks = {n: base_model.shared_state[n] for n, c in base_model.peft_config.items()
                    if c.peft_type == PeftType.SHADOW and n in base_model.shared_state}
        return {n: getattr(net, part) for n, net in networks.items() if getattr(net, part) is not None}

    return property(read)


METHOD = LayerMethod(
    config_class=ShadowConfig,
    make_delta=make_block,
    layer_types=(nn.Module,),
    default_targets=default_blocks,
    resolve_config=resolve_config,
    make_network=make_network,
    run_scope=run_scope,
    mixed_batches=False,
    single_active=True,
    mergeable=False,
    model_functions={"unload_shadow": unload_shadow, "shadow_backbone": _per_adapter("backbone"),
                     "shadow_projection": _per_adapter("projection"), "shadow_head": _per_adapter("head")},
)


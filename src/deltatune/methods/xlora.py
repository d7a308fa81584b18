"""X-LoRA: a mixture of LoRA experts, gated token by token by a small classifier over the base model's hidden states.

Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts" (arXiv:2402.07148), §2. ``n`` trained LoRA
adapters (the experts, loaded from ``adapters``: name -> saved LoRA) stay as they are; what trains is a classifier
``c`` that reads the hidden states and says, per token and optionally per adapted layer, how much of each expert to
use. Every forward runs the model twice, as peft does:

1. *scaling pass* (no gradients): every expert weighted by ``scaling_pass_value`` (``0``: the base model); the last
   hidden states ``h`` ``(B, T, H)`` of the backbone (the task head is skipped: peft runs it and drops it) go through ``c`` (``xlora_depth`` linear layers, ReLU and dropout between):
   logits ``(B, T, n)`` broadcast to every layer, or ``(B, T, L·n)`` with ``layerwise_scalings``, reshaped to
   ``(B, T, L, n)`` (``L``: the adapted layers in module order); ``s = softmax(logits / softmax_temperature)`` over
   the experts when ``enable_softmax``;
2. *real pass*: adapted layer ``l`` adds ``Σᵢ g · s̃ₗᵢ · (αᵢ/rᵢ) Bᵢ Aᵢ x`` per token, where ``s̃ₗ`` keeps the
   ``top_k_lora`` largest of ``sₗ`` (the others 0), renormalised by a softmax over the kept ones with
   ``enable_softmax_topk``, and ``g = global_scaling_weight``. peft scales the input, ``Bᵢ Aᵢ (s x)``: the same.

The experts are ordinary LoRA adapters of the ``PeftModel`` (named by the keys of ``adapters``; peft needs the keys
``"0"``, ``"1"``, ...), each loaded with deltatune's checked loading; the layers weigh them through the core's
per-token hook (``AdapterLayer.token_weights``, ``Delta.weighted_forward``), so LoRA is not written again here. Plain
LoRA on Linear / Conv1D / Embedding layers only (peft converts Conv2d too, but a per-token weight has no meaning on
an image); DoRA and ``lora_bias`` experts are refused (their update is not ``B A x``).

Files, as peft: the adapter's own file holds the classifier, ``base_model.internal_xlora_classifier.layers.<i>.
{weight,bias}`` (``i`` counts ReLU and dropout modules too); ``save_pretrained`` writes each expert as a LoRA adapter
in a sub-folder named by its key. Loading reads an expert from that sub-folder when it is there (the trained
experts of ``use_trainable_adapters``; peft's documented intent), else from the path in ``adapters``. peft 0.21.2
drops from the file every classifier key containing ``.<expert name>.`` (always ``layers.0``), so its files cannot
be loaded without the weights peft lost; deltatune refuses them, naming the missing keys.

Cached generation: the scaling pass of the token being generated needs the scaling pass's own keys and values of
the earlier tokens, so a second KV cache runs beside the model's (created with it, reordered and cropped with it).
peft instead refuses ``use_cache`` and recomputes the whole sequence twice per token.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftConfig, PeftType, read_config_file
from ..errors import AdapterStateError, ConfigError
from ..files import CONFIG_NAME, validate_adapter_name
from ..layers import AdapterLayer, adapter_layers
from ..registry import RouterMethod
from ..rows import current_row_plan
from .common import check_dropout, check_scale, check_size
from .lora import LoraConfig, LoraEmbedding, LoraLinear

__all__ = ["XLoraConfig"]  # exported from deltatune

_CACHE_ARGUMENTS = ("cache", "past_key_values")  # the forward's KV-cache argument: from transformers 5.24, before
# A task model's arguments for its head, which its backbone does not take.
_HEAD_ARGUMENTS = ("labels", "logits_to_keep", "num_logits_to_keep")
# Cache operations of generate() (beam search, assisted decoding, batch expansion) that the scaling pass's cache must
# follow; each is applied to both caches.
_CACHE_OPERATIONS = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices")


@dataclass
class XLoraConfig(PeftConfig):
    """Configuration of an X-LoRA adapter (peft's field names and defaults).

    Attributes:
        hidden_size: The base model's hidden size (the classifier's input); ``None``: read from the model.
        adapters: Expert name -> saved LoRA adapter (directory or hub id), loaded as adapters of that name.
        enable_softmax: Softmax over the experts of the classifier's logits.
        enable_softmax_topk: Softmax over the ``top_k_lora`` kept scalings of each layer (peft: meant instead of
            ``enable_softmax``; both may be on, as in peft).
        layerwise_scalings: One scaling per expert and adapted layer (the classifier outputs ``L·n``), not one per
            expert shared by all layers.
        xlora_depth: Linear layers of the classifier (1: a single linear map).
        xlora_size: Hidden width of the classifier (unused with depth 1).
        xlora_dropout_p: Dropout after each hidden ReLU of the classifier (unused with depth 1).
        use_trainable_adapters: The experts train too (else only the classifier).
        softmax_temperature: ``τ`` of ``softmax(logits / τ)``; lower is sharper.
        top_k_lora: Keep only the ``k`` largest scalings per token and layer (``None``: all).
        scaling_pass_value: The experts' weight in the scaling pass (``0``: the scaling pass is the base model).
        global_scaling_weight: ``g``, multiplying every expert's output.
    """

    hidden_size: int | None = None
    adapters: dict[str, str] | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    peft_type: PeftType = field(default=PeftType.XLORA, init=False)

    _not_in_peft: ClassVar[tuple[str, ...]] = ("modules_to_save",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modules_to_save is not None:
            raise ConfigError("XLoraConfig has no modules_to_save (peft's XLoraConfig lacks the field)")
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ConfigError(f"adapters must name at least one LoRA expert (name -> saved adapter), got "
                              f"{self.adapters!r}")
        for name, path in self.adapters.items():
            validate_adapter_name(name)
            if not isinstance(path, (str, os.PathLike)):
                raise ConfigError(f"adapters[{name!r}] must be a path or hub id, got {path!r}")
        if self.hidden_size is not None:
            check_size("hidden_size", self.hidden_size)
        check_size("xlora_depth", self.xlora_depth)
        check_size("xlora_size", self.xlora_size)
        check_dropout("xlora_dropout_p", self.xlora_dropout_p)
        check_scale("softmax_temperature", self.softmax_temperature)
        if not self.softmax_temperature > 0:
            raise ConfigError(f"softmax_temperature must be positive, got {self.softmax_temperature!r}")
        if self.top_k_lora is not None:
            check_size("top_k_lora", self.top_k_lora)
        check_scale("scaling_pass_value", self.scaling_pass_value)
        check_scale("global_scaling_weight", self.global_scaling_weight)
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("enable_softmax_topk without top_k_lora renormalises all scalings (as in peft)", stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("enable_softmax_topk and enable_softmax are both on: two softmaxes (as in peft)",
                          stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in self._not_in_peft:
            del out[name]
        return out


def _check_top_k(config: XLoraConfig) -> None:
    if config.top_k_lora is not None and config.top_k_lora > len(config.adapters):
        raise ConfigError(f"top_k_lora={config.top_k_lora} is more than the {len(config.adapters)} experts")


def _classifier(config: XLoraConfig, n_experts: int, n_layers: int) -> nn.Sequential:
    """peft's module layout (so the saved indices match): ``Linear(H, size), ReLU, [Dropout], ...,
    Linear(·, n·[L])``."""
    out = n_experts * n_layers if config.layerwise_scalings else n_experts
    width = config.hidden_size
    layers: list[nn.Module] = []
    for _ in range(config.xlora_depth - 1):
        layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
        if config.xlora_dropout_p > 0:
            layers.append(nn.Dropout(config.xlora_dropout_p))
        width = config.xlora_size
    return nn.Sequential(*layers, nn.Linear(width, out))


def planned_size(config: XLoraConfig) -> int:
    """Parameters of the classifier, for the loading guard; ``L`` (unknown before the experts load) counts as 1."""
    hidden = config.hidden_size or 1
    depth, size, n = config.xlora_depth, config.xlora_size, len(config.adapters)
    if depth == 1:
        return (hidden + 1) * n
    return (hidden + 1) * size + (depth - 2) * (size + 1) * size + (size + 1) * n


class _Classifier(nn.Module):
    """Holds the ``layers`` ``Sequential`` under peft's key ``internal_xlora_classifier.layers``."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers


class XLoraRouter(nn.Module):
    """The classifier and the per-forward state of one X-LoRA adapter (``base_model.shared_state[name]``).

    A forward pre-hook on the base model runs the scaling pass and the classifier before each forward (also each step
    of ``generate()``), a forward hook pairs the caches; each adapted layer asks :meth:`layer_weights` for its
    experts' per-token weights.
    """

    def __init__(self, config: XLoraConfig, experts: list[str], layers: list[AdapterLayer], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.internal_xlora_classifier = _Classifier(_classifier(config, len(experts), len(layers))).to(device, dtype)
        self.config = config  # the adapter's own config: set_topk_lora & co. change it, as in peft
        self.experts = experts
        self.n_layers = len(layers)
        self.scaling_pass_value = config.scaling_pass_value
        self.scalings: torch.Tensor | None = None  # (B, T, L, n): what the layers weigh the experts by now
        self.latest: torch.Tensor | None = None  # the classifier's last prediction (get_latest_scalings)
        self.log: list[torch.Tensor] = []
        self.logging = False
        self.active = False
        self._in_scaling_pass = False
        self._pending_cache: Any = None  # the scaling pass's new cache, to pair with the model's
        self._layers = layers
        self._hooks: list[Any] = []

    # --- RouterMethod protocol ---------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        for index, layer in enumerate(self._layers):
            layer.token_weights = functools.partial(self.layer_weights, index)
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                       model.register_forward_hook(self._after, with_kwargs=True)]

    def set_active(self, active: bool) -> None:
        self.active = active

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for layer in self._layers:
            layer.token_weights = None
        self._hooks, self.scalings = [], None

    # --- the two passes ----------------------------------------------------------------------------------------
    def _running(self) -> bool:
        return self.active and not any(layer.disabled for layer in self._layers)

    def _before(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The scaling pass (no gradients) and the classifier: sets :attr:`scalings` for the real pass."""
        if self._in_scaling_pass or not self._running():
            return
        if current_row_plan() is not None:
            raise AdapterStateError("adapter_names (one adapter per row) cannot be used with an X-LoRA adapter, "
                                    "which weighs its experts per token")
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise AdapterStateError("X-LoRA needs input_ids or inputs_embeds to size its scalings")
        batch, length = tokens.shape[:2]
        dtype = self.internal_xlora_classifier.layers[-1].weight.dtype
        self.scalings = torch.full((batch, length, self.n_layers, len(self.experts)), float(self.scaling_pass_value),
                                   dtype=dtype, device=tokens.device)
        # The hidden states are the backbone's (what the task model returns as its hidden_states), so the task head
        # (an LM head over the whole vocabulary) need not run in the scaling pass.
        backbone = getattr(model, "base_model", None)
        backbone = backbone if isinstance(backbone, nn.Module) else model
        scaling_kwargs = {k: v for k, v in kwargs.items() if backbone is model or k not in _HEAD_ARGUMENTS}
        scaling_kwargs.update(output_hidden_states=True, return_dict=True)
        name = next((n for n in _CACHE_ARGUMENTS if kwargs.get(n) is not None), None)
        if name is not None:
            scaling_kwargs[name] = _scaling_cache(kwargs[name])
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                out = backbone(*args, **scaling_kwargs)
        finally:
            self._in_scaling_pass = False
        self._pending_cache = _output_cache(out) if name is None else None
        self.scalings = self.classify(out.hidden_states[-1])

    def _after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """A cache the model created in this forward gets the scaling pass's new cache as its partner."""
        if self._in_scaling_pass:
            return
        pending, self._pending_cache = self._pending_cache, None
        cache = _output_cache(output)
        if pending is not None and cache is not None:
            _pair(cache, pending)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` last hidden states -> scalings ``(B, T, L, n)`` (softmax over the experts if enabled)."""
        batch, length = hidden.shape[:2]
        logits = self.internal_xlora_classifier.layers(hidden.to(self.internal_xlora_classifier.layers[0].weight.dtype))
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)  # (B, T, L, n)
        scalings = logits.reshape(batch, length, self.n_layers, len(self.experts))
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        self.latest = scalings
        if self.logging:
            self.log.append(scalings)
        return scalings

    def layer_weights(self, index: int, layer: AdapterLayer) -> Mapping[str, torch.Tensor] | None:
        """``{expert: (B, T, 1)}`` for adapted layer ``index``: its scalings after top-k (and the softmax over the
        kept ones), times ``global_scaling_weight``."""
        if self.scalings is None or not self.active:
            return None
        scalings = select_top_k(self.scalings[:, :, index, :], self.config.top_k_lora, self.config.enable_softmax_topk)
        scalings = scalings * self.config.global_scaling_weight  # (B, T, n)
        return {e: scalings[..., i:i + 1] for i, e in enumerate(self.experts) if e in layer.deltas}


def select_top_k(scalings: torch.Tensor, k: int | None, softmax: bool) -> torch.Tensor:
    """``(..., n)`` scalings with all but the ``k`` largest per token set to 0 (``k=None``: all kept); ``softmax``
    then renormalises the non-zero ones by a softmax over them (zeros stay zero), as peft does."""
    if k is not None:
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, scalings.topk(k, dim=-1).indices, True)
        scalings = scalings * keep.to(scalings.dtype)
    if softmax:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings


# --- the scaling pass's own KV cache ------------------------------------------------------------------------------

def _output_cache(output: Any) -> Any:
    """The KV cache a model output returns (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    if not isinstance(output, Mapping):
        return None
    return next((output[n] for n in _CACHE_ARGUMENTS if output.get(n) is not None), None)


def _scaling_cache(cache: Any) -> Any:
    """The scaling pass's cache paired with the model's ``cache``: found, or made empty beside an empty one."""
    partner = cache.__dict__.get("_xlora_scaling_cache")
    if partner is not None:
        return partner
    if cache.get_seq_length() > 0:
        raise AdapterStateError(
            "this KV cache holds tokens that X-LoRA's scaling pass did not see (it was not made by a forward through "
            "this X-LoRA model); start from an empty cache or none"
        )
    partner = copy.deepcopy(cache)
    _pair(cache, partner)
    return partner


def _pair(cache: Any, partner: Any) -> None:
    """Make ``partner`` follow ``cache`` through generate()'s cache operations."""
    cache.__dict__["_xlora_scaling_cache"] = partner
    for op in _CACHE_OPERATIONS:
        if hasattr(cache, op) and hasattr(partner, op):
            setattr(cache, op, functools.partial(_both, getattr(cache, op), getattr(partner, op)))


def _both(first: Any, second: Any, *args: Any, **kwargs: Any) -> Any:
    second(*args, **kwargs)
    return first(*args, **kwargs)


# --- building ------------------------------------------------------------------------------------------------------

def _model_hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def _check_expert(name: str, config: LoraConfig, source: str) -> None:
    """Only plain LoRA can be weighted per token."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"X-LoRA expert {name!r} ({source}) is {config.peft_type.value}, not a LoRA adapter")
    for option in ("use_dora", "lora_bias"):
        if getattr(config, option):
            raise ConfigError(f"X-LoRA expert {name!r} ({source}) has {option}=True; X-LoRA weighs plain LoRA "
                              f"updates (B A x) per token, which {option} is not (peft raises as well)")
    for option in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        if getattr(config, option, None):
            raise ConfigError(f"X-LoRA expert {name!r} ({source}) sets {option}, which X-LoRA cannot weigh per "
                              f"token; use LoRA adapters of Linear / Embedding layers")


def attach(peft_model: nn.Module, adapter_name: str, config: XLoraConfig, directory: str | None) -> XLoraRouter:
    """Load the experts (``RouterMethod.attach``), build the classifier over their layers and hook it into the
    model; on any error the experts already loaded are removed again. ``config`` is the adapter's own copy."""
    model = peft_model.get_base_model()
    hidden = _model_hidden_size(model)
    if config.hidden_size is None:
        if hidden is None:
            raise ConfigError("hidden_size is None and the model's config has none; pass the base model's hidden size")
        config.hidden_size = hidden
    elif hidden is not None and config.hidden_size != hidden:
        raise ConfigError(f"hidden_size={config.hidden_size} but the model's hidden size is {hidden}")
    _check_top_k(config)
    taken = [n for n in [adapter_name, *config.adapters] if n in peft_model.peft_config]
    if adapter_name in config.adapters or taken:
        raise AdapterStateError(f"X-LoRA adapter {adapter_name!r}: names already in use: {taken or [adapter_name]}")
    loaded: list[str] = []
    try:
        for name, path in config.adapters.items():
            saved = os.path.join(directory, name) if directory else None
            source = saved if saved and os.path.isfile(os.path.join(saved, CONFIG_NAME)) else os.fspath(path)
            expert_config, config_file = read_config_file(source)
            _check_expert(name, expert_config, config_file)
            trainable = config.use_trainable_adapters and not config.inference_mode
            peft_model.load_adapter(source, name, is_trainable=trainable)
            loaded.append(name)
        layers = [layer for _, layer in adapter_layers(model) if any(e in layer.deltas for e in loaded)]
        for layer in layers:
            for name in loaded:
                if name in layer.deltas and type(layer.deltas[name]) not in (LoraLinear, LoraEmbedding):
                    variant = getattr(layer.deltas[name], "variant", None)
                    what = f"the LoRA variant {variant.field}" if variant is not None else \
                        f"LoRA on a {type(layer.base_layer).__name__}"
                    raise ConfigError(f"X-LoRA expert {name!r} uses {what}; X-LoRA weighs plain LoRA on Linear, "
                                      f"Conv1D and Embedding layers only (as peft, which reads A and B directly)")
        weight = next(p for p in model.parameters() if p.is_floating_point())
        router = XLoraRouter(config, loaded, layers, weight.dtype, weight.device)
    except BaseException:
        for name in reversed(loaded):
            peft_model.delete_adapter(name)
        raise
    router.install(model)
    return router


# --- peft's X-LoRA functions (``model.<name>(...)``, as on peft's XLoraModel) ---------------------------------------

def _router(base_model: nn.Module) -> XLoraRouter:
    routers = [m for m in base_model.shared_state.values() if isinstance(m, XLoraRouter)]
    active = [r for r in routers if r.active] or routers
    if not active:
        raise AdapterStateError("this model has no X-LoRA adapter")
    return active[0]


def get_latest_scalings(base_model: nn.Module) -> torch.Tensor | None:
    """The last scalings the classifier predicted, ``(B, T, L, n)`` (``None`` before the first forward)."""
    return _router(base_model).latest


def set_topk_lora(base_model: nn.Module, value: int | None) -> None:
    """Keep the ``value`` largest scalings per token and layer (``None``: all); recorded in the config."""
    router = _router(base_model)
    if value is not None:
        check_size("top_k_lora", value)
        if value > len(router.experts):
            raise ConfigError(f"top_k_lora={value} is more than the {len(router.experts)} experts")
    router.config.top_k_lora = value


def set_global_scaling_weight(base_model: nn.Module, weight: float) -> None:
    """Multiply every expert's output by ``weight``; recorded in the config."""
    check_scale("global_scaling_weight", weight)
    _router(base_model).config.global_scaling_weight = weight


def get_global_scaling_weight(base_model: nn.Module) -> float:
    return _router(base_model).config.global_scaling_weight


def set_scaling_pass_value(base_model: nn.Module, value: float | None) -> None:
    """The experts' weight in the scaling pass; ``None``: ``1/n``. Recorded in the config (as in peft)."""
    router = _router(base_model)
    value = 1 / len(router.experts) if value is None else value
    check_scale("scaling_pass_value", value)
    router.scaling_pass_value = router.config.scaling_pass_value = value


def enable_scalings_logging(base_model: nn.Module) -> None:
    _router(base_model).logging = True


def disable_scalings_logging(base_model: nn.Module) -> None:
    """Stop logging; the log is kept."""
    _router(base_model).logging = False


def clear_scalings_log(base_model: nn.Module) -> None:
    _router(base_model).log.clear()


def get_scalings_log(base_model: nn.Module) -> list[torch.Tensor]:
    """A copy of the list of logged scalings, each ``(B, T, L, n)``."""
    return list(_router(base_model).log)


def get_bucketed_scalings_log(base_model: nn.Module) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
    """The log grouped by sequence length: ``T -> (positions in the log, scalings)``."""
    buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for i, scalings in enumerate(_router(base_model).log):
        positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
        positions.append(i)
        tensors.append(scalings)
    return buckets


METHOD = RouterMethod(
    config_class=XLoraConfig,
    attach=attach,
    planned_size=planned_size,
    model_functions={f.__name__: f for f in (
        get_latest_scalings, set_topk_lora, set_global_scaling_weight, get_global_scaling_weight,
        set_scaling_pass_value, enable_scalings_logging, disable_scalings_logging, clear_scalings_log,
        get_scalings_log, get_bucketed_scalings_log,
    )},
)

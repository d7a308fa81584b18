"""The one place a method is registered: its ``peft_type`` -> the module that implements it.

Each method module defines a module-level ``METHOD`` (a :class:`LayerMethod`, :class:`PromptMethod` or
:class:`RouterMethod`) and lists its public names (its config, ...) in ``__all__``, which ``deltatune`` exports.
Modules are imported lazily so that importing deltatune stays cheap and a broken optional method cannot break the
others. Adding a method is one file in ``methods/`` plus one line in ``_METHOD_MODULES``; :data:`PeftType` takes its
members from those lines. This module imports no config (configs import it), so it names methods by string.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from .errors import ConfigError

# The registry sits below the modules that define configs (``config``), deltas (``layers``) and prompt strategies
# (``prompt``), all of which import it; so it names those types in docstrings and annotates them loosely, rather than
# importing them even for type checking, which would draw an import cycle.

# peft_type, spelled as peft writes it into adapter_config.json -> the module implementing the method.
_METHOD_MODULES: dict[str, str] = {
    "LORA": "deltatune.methods.lora",
    "ADALORA": "deltatune.methods.adalora",
    "LOHA": "deltatune.methods.loha",
    "LOKR": "deltatune.methods.lokr",
    "IA3": "deltatune.methods.ia3",
    "PROMPT_TUNING": "deltatune.methods.prompt_tuning",
    "P_TUNING": "deltatune.methods.p_tuning",
    "PREFIX_TUNING": "deltatune.methods.prefix_tuning",
    "LN_TUNING": "deltatune.methods.ln_tuning",
    "BITFIT": "deltatune.methods.bitfit",
    "BOTTLENECK": "deltatune.methods.bottleneck",
    "OFT": "deltatune.methods.oft",
    "VERA": "deltatune.methods.vera",
    "TRAINABLE_TOKENS": "deltatune.methods.trainable_tokens",
    "HRA": "deltatune.methods.hra",
    "MISS": "deltatune.methods.miss",
    "FOURIERFT": "deltatune.methods.fourierft",
    "WAVEFT": "deltatune.methods.waveft",
    "BOFT": "deltatune.methods.boft",
    "ADAPTION_PROMPT": "deltatune.methods.adaption_prompt",
    "MULTITASK_PROMPT_TUNING": "deltatune.methods.multitask_prompt_tuning",
    "CPT": "deltatune.methods.cpt",
    "CARTRIDGE": "deltatune.methods.cartridge",
    "VBLORA": "deltatune.methods.vblora",
    "RANDLORA": "deltatune.methods.randlora",
    "PVERA": "deltatune.methods.pvera",
    "GRALORA": "deltatune.methods.gralora",
    "ROAD": "deltatune.methods.road",
    "C3A": "deltatune.methods.c3a",
    "SHIRA": "deltatune.methods.shira",
    "BEFT": "deltatune.methods.beft",
    "DELORA": "deltatune.methods.delora",
    "SUPERTUNING": "deltatune.methods.supertuning",
    "LILY": "deltatune.methods.lily",
    "GLORA": "deltatune.methods.glora",
    "DEFT": "deltatune.methods.deft",
    "XLORA": "deltatune.methods.xlora",
    "POLY": "deltatune.methods.poly",
    "HIRA": "deltatune.methods.hira",
    "OSF": "deltatune.methods.osf",
    "UNILORA": "deltatune.methods.unilora",
    "PEANUT": "deltatune.methods.peanut",
    "PSOFT": "deltatune.methods.psoft",
    "TINYLORA": "deltatune.methods.tinylora",
    "ADAMSS": "deltatune.methods.adamss",
    "FROD": "deltatune.methods.frod",
    "SHADOW": "deltatune.methods.shadow",
}


class _Name(str, enum.Enum):
    """A string enum whose members print as their value, as peft's do (``str(PeftType.LORA) == "LORA"``)."""

    def __str__(self) -> str:
        return self.value


PeftType = _Name("PeftType", [(name, name) for name in _METHOD_MODULES], module=__name__, qualname="PeftType")
PeftType.__doc__ = """Method identifiers, spelled as peft writes them into ``adapter_config.json``: one member per
registered method (``PeftType.LORA``, ...)."""


@dataclass(frozen=True)
class LayerMethod:
    """A method that wraps target modules and adds a per-layer delta.

    Attributes:
        config_class: The method's config dataclass.
        make_delta: ``(config, base_layer, module_name) -> Delta``, called with the resolved config (see
            :mod:`deltatune.resolve`) for each target, once all are checked; it only reads the config.
        layer_types: The module types the method can wrap; anything else is refused before the model is touched.
        default_targets: ``model_type -> module names`` used when the config gives no ``target_modules``, or
            ``(model) -> module names`` where the default is found on the model itself (trainable tokens: the input
            embedding); ``None`` falls back to :data:`deltatune.targeting.DEFAULT_ATTENTION_TARGETS`.
        check_target: ``(config, base_layer, module_name) -> None``, raising :class:`~deltatune.errors.TargetError`
            for a module of ``layer_types`` that this (resolved) config still cannot adapt. Runs for every target
            before the first ``make_delta``, which may change the base layer (e.g. PiSSA initialisation).
        resolve_config: ``(config, model, {module name: base layer}) -> config``: a new config (``dataclasses.
            replace``) with the fields whose value depends on the model filled in and checked, such as IA3's
            ``feedforward_modules`` per model type. Gets the config with ``target_modules`` resolved and the
            targets of ``layer_types``; must not modify its input.
        rewrites_base_weights: ``(config) -> bool``: whether building this config's deltas writes to the base
            weights (LoRA's PiSSA / OLoRA keep the residual there), so that a failed load must restore them.
        make_shared: ``(config, {module name: base layer}, {adapter: shared module}) -> nn.Module``: the module
            holding tensors that all of one adapter's deltas share (VeRA's random projections), given the targets
            and the shared modules of the model's other adapters (which it may reuse). Built once per adapter after
            the targets are checked; ``make_delta`` then takes it as a fourth argument and keeps a reference to it.
            It lives in ``PeftModel.base_model.shared_state[adapter]``, so it follows the model's ``.to()``, and its
            ``state_dict()`` is saved once per adapter under ``base_model.<key>`` (peft's model-level keys).
        loss_term: ``(model, adapter_name, config) -> Tensor | None``: a training-time term (AdaLoRA's
            orthogonality regulariser) that ``PeftModel.base_model`` adds to ``outputs.loss`` in train mode, for
            every adapter of the method; ``None`` adds nothing (e.g. for an adapter that is not being trained).
        model_functions: ``{name: fn}``: functions callable as ``peft_model.base_model.<name>(*args)`` and run as
            ``fn(base_model, *args)``, like peft's tuner-specific methods (AdaLoRA's ``update_and_allocate``);
            ``base_model.peft_config`` and ``base_model.model`` give them the configs and the adapted model. A
            ``property`` entry is read as an attribute, ``fn(base_model)`` (Shadow's ``base_model.shadow_backbone``).
        after_step: ``(base_model, step) -> None``: run once per training step after ``optimizer.step()`` and before
            ``zero_grad()``, by ``base_model.after_optimizer_step(step)`` (AdaLoRA's rank allocation).
        make_tied_delta: ``(source delta, base_layer, module_name) -> Delta`` for a method whose delta must follow
            the weight itself: a module whose ``weight`` is the same tensor as a target's (an LM head tied to the
            input embedding) is that target's tied twin and gets this delta, built from the target's (sharing its
            parameters), so the two modules stay tied while unmerged. ``None``: tied modules are left alone.
        ties_weights: ``(config) -> bool``: whether this config's adapter ties twins through ``make_tied_delta``
            (LoRA: only with ``ensure_weight_tying``, else each tied module trains apart, as in peft); ``None``:
            always.
        find_targets: ``(model, config) -> (target_modules as the resolved config records it, full module names)``
            for a method whose peft config selects modules by a rule of its own (adaption prompt: the last
            ``adapter_layers`` modules named ``target_modules``); ``None`` uses the shared rules of
            :func:`deltatune.targeting.find_targets`.
        mixed_batches: Its adapters work in mixed-adapter batches (``adapter_names``, one adapter per row), which
            ``deltatune serve`` needs; ``False`` where the layer refuses them (adaption prompts).
        make_parameter_delta: ``(config, module, parameter_name, full_name) -> Delta`` for a method that adapts
            parameters directly (LoRA's ``target_parameters``, for MoE experts stored as 3-D tensors): the delta sets
            ``Delta.parameter_name``. ``None``: the method has no parameter targets.
        extra_targets: ``(config, model) -> module names`` an adapter wraps besides its ``target_modules``, with a
            delta of another kind (LoRA's ``trainable_token_indices``: trainable rows of embeddings); they may not
            also be targets, and modules tied to them (by weight identity) follow them.
        make_extra_delta: ``(config, base_layer, module_name, source) -> Delta`` for an extra target (``source`` is
            ``None``) or for a module tied to one (``source``: that target's delta, whose parameters it shares).
        num_tasks: ``(config) -> int`` for a method whose layers route each row by its task (Poly): the number of
            tasks. ``PeftModel.forward`` / ``generate`` then require ``task_ids`` (one index below it per row) while
            such an adapter is in use and hand them to the layers (``deltatune.rows.row_tasks``); ``None``: the
            method takes no ``task_ids`` (they are refused).
        make_network: ``(config, model, {module name: base layer}) -> nn.Module``: a network of the adapter's own
            that runs beside the model rather than in its layers (Shadow's backbone), built from the model; kept,
            saved and trained like ``make_shared``'s module (which a method has instead), and handed to
            ``make_delta`` the same way.
        run_scope: ``(base_model, adapter_name, config) -> context manager`` opened around the model by the adapter
            model's forward (``peft_model.base_model``, the tuner level, as in peft) and by ``PeftModel.generate()``,
            for every adapter of the method, for layers that need state computed from the model's inputs (Shadow: the
            shadow backbone's state, which the adapted blocks read and advance). It does nothing and yields ``None``
            unless its adapter is in effect (active, adapters enabled); else it may yield ``finish(outputs, kwargs)
            -> outputs``, which the forward applies to its outputs (Shadow's auxiliary loss).
        mergeable: ``False`` for a method whose adapters never fold into the weights (its deltas' ``check_mergeable``
            always refuses, with ``NotMergeableError``), so that tools deciding from the files alone (``deltatune
            inspect --check vllm``) do not advise merging.
        single_active: Its adapters are only used alone: ``set_adapter`` refuses one together with other adapters
            (Shadow: the blocks carry one shadow state).
        prepare_model: ``(config, model) -> undo`` run before an adapter is resolved and built, for a config that
            changes the model's structure first (LoRA's ``layer_replication``); the returned callable (or ``None``)
            undoes it when adding the adapter fails.
        restore_model: ``(model, {name: config} of the adapters left) -> undo``: ``prepare_model``'s change put back
            once no adapter left needs it (``None``: nothing to undo yet), run by ``delete_adapter`` and ``unload()``
            after the adapter's modules are gone; raises ``AdapterStateError``, before anything changes, where an
            adapter left lives inside the change.
    """

    config_class: type  # a PeftConfig subclass
    make_delta: Callable[..., nn.Module]  # returns a deltatune.layers.Delta
    layer_types: tuple[type[nn.Module], ...]
    default_targets: dict[str, list[str]] | Callable[[nn.Module], list[str]] | None = None
    check_target: Callable[[Any, nn.Module, str], None] | None = None
    resolve_config: Callable[[Any, nn.Module, Mapping[str, nn.Module]], Any] | None = None
    rewrites_base_weights: Callable[[Any], bool] | None = None
    make_shared: Callable[[Any, dict[str, nn.Module], dict[str, nn.Module]], nn.Module] | None = None
    loss_term: Callable[[nn.Module, str, Any], Any] | None = None
    model_functions: dict[str, Callable[..., Any]] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    make_tied_delta: Callable[[nn.Module, nn.Module, str], nn.Module] | None = None
    ties_weights: Callable[[Any], bool] | None = None
    find_targets: Callable[[nn.Module, Any], tuple[Any, list[str]]] | None = None
    mixed_batches: bool = True
    make_parameter_delta: Callable[[Any, nn.Module, str, str], nn.Module] | None = None
    extra_targets: Callable[[Any, nn.Module], list[str]] | None = None
    make_extra_delta: Callable[[Any, nn.Module, str, Any], nn.Module] | None = None
    prepare_model: Callable[[Any, nn.Module], Callable[[], None] | None] | None = None
    restore_model: Callable[[nn.Module, Mapping[str, Any]], Callable[[], None] | None] | None = None
    num_tasks: Callable[[Any], int] | None = None
    make_network: Callable[[Any, nn.Module, Mapping[str, nn.Module]], nn.Module] | None = None
    run_scope: Callable[[nn.Module, str, Any], Any] | None = None
    single_active: bool = False
    mergeable: bool = True


@dataclass(frozen=True)
class PromptMethod:
    """A method that leaves the layers alone and feeds the model virtual tokens or key/value prefixes.

    Attributes:
        config_class: The method's config dataclass.
        make_encoder: ``(config, word_embeddings) -> nn.Module`` whose ``forward(indices)`` returns the prompt;
            it keeps its input table as ``embedding`` (an ``nn.Embedding``).
        strategy: How the prompt reaches the model: ``deltatune.prompt.EMBEDDING_PROMPT`` (virtual tokens
            prepended to ``inputs_embeds``) or ``deltatune.prefix.PREFIX`` (per-layer key/value prefix in the KV
            cache).
        loaded_encoder: ``(config) -> nn.Module``: what a saved adapter loads into when its file holds more than
            the encoder's output table (multitask prompt tuning's per-task factors); ``None``: a plain
            ``deltatune.prompt.PromptTable``.
        mixed_batches: Always ``False``: a prompt adapter is used one at a time (no ``adapter_names`` rows).
    """

    config_class: type  # a PromptLearningConfig subclass
    make_encoder: Callable[[Any, nn.Module], nn.Module]
    strategy: Any  # a deltatune.prompt.PromptStrategy
    loaded_encoder: Callable[[Any], nn.Module] | None = None
    mixed_batches: bool = False


@dataclass(frozen=True)
class RouterMethod:
    """A method whose adapter routes between adapters of another method, each loaded from files of its own, with a
    small module of its own (X-LoRA: a classifier that weighs LoRA experts per token).

    Attributes:
        config_class: The method's config dataclass.
        attach: ``(peft_model, adapter_name, config, directory) -> router``: load the experts into ``peft_model`` as
            adapters of their own (``router.experts`` names them; ``directory``: where a saved router adapter was read
            from, ``None`` for a new one), install what routing needs and return the router module, which the
            ``PeftModel`` keeps in ``base_model.shared_state[adapter_name]``: its ``state_dict()`` is the adapter's
            file (``base_model.<key>``). The router also has ``set_active(active: bool)``, called whenever the active
            adapters change (an active router's experts are active in the layers and train with it), and
            ``detach()``, called before it is removed, which undoes what ``attach`` installed.
        planned_size: ``(config) -> int``: the parameters of the router's own module, which the loading guard
            compares with the file before anything is allocated.
        model_functions: As :attr:`LayerMethod.model_functions` (X-LoRA's ``get_latest_scalings``, ...).
        mixed_batches: Always ``False``: routing weighs the experts per token, not per row.
    """

    config_class: type
    attach: Callable[..., nn.Module]
    planned_size: Callable[[Any], int]
    model_functions: dict[str, Callable[..., Any]] | None = None
    mixed_batches: bool = False


def get_method(peft_type: PeftType | str, *, source: str = "config") -> LayerMethod | PromptMethod | RouterMethod:
    """The implementation registered for ``peft_type``.

    Raises:
        ConfigError: ``peft_type`` is unknown or not implemented in this version.
    """
    module_name = _METHOD_MODULES.get(str(peft_type))
    if module_name is None:
        raise ConfigError(
            f"{source}: peft_type {str(peft_type)!r} is not supported by this version of deltatune; "
            f"supported: {sorted(_METHOD_MODULES)}"
        )
    return importlib.import_module(module_name).METHOD


def config_class(peft_type: PeftType | str, *, source: str = "config") -> type:
    """The config dataclass registered for ``peft_type``."""
    return get_method(peft_type, source=source).config_class


def supported_types() -> list[PeftType]:
    return list(PeftType)


def method_modules() -> Iterator[ModuleType]:
    """Every registered method's module, imported on demand, in registration order."""
    for module_name in _METHOD_MODULES.values():
        yield importlib.import_module(module_name)

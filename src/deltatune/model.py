"""``PeftModel`` and its task wrappers: the user-facing object around a base model and its adapters.

Names and behaviour follow peft, so switching is one import. The wrapper owns the adapter bookkeeping (configs, the
active adapter, trainability) and delegates the mechanics to ``inject`` (module surgery), ``layers`` (per-layer
state), ``checkpoint`` (which tensors an adapter file holds, and the load guards), ``files`` (disk and hub) and
``prompt`` (prompt methods' inputs). Task wrappers only add what differs by task, as data: default
``modules_to_save`` heads and how inputs line up with virtual tokens (``prompt_task``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from . import checkpoint, fast, inject, prompt, quant, status
from .checkpoint import check_planned_size, naming_source, restore_base_on_error
from .config import PeftConfig, TaskType, read_config_file
from .errors import AdapterStateError, ConfigError
from .files import (
    BASE_ADAPTER,
    adapter_directory,
    adapter_files,
    directory_version,
    read_safetensors_header,
    read_weights,
    validate_adapter_name,
    write_adapters,
)
from .fingerprint import METADATA_KEY, base_fingerprint, check_base
from .layers import adapter_layers, batch_adapters
from .registry import LayerMethod, PromptMethod, RouterMethod, get_method
from .rows import batch_tasks, keep_row_context
from .resolve import resolve
from .targeting import trained_biases

_HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only")


def _hub_kwargs(entry: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The hub-addressing keywords of ``kwargs``; any other keyword is a ``TypeError`` naming it (peft swallows some
    silently; deltatune never drops an argument)."""
    unknown = sorted(set(kwargs) - set(_HUB_KWARGS))
    if unknown:
        raise TypeError(
            f"{entry}() got unexpected keyword argument(s) {unknown}; besides its named parameters it takes only "
            f"the hub keywords {list(_HUB_KWARGS)}"
        )
    return kwargs


def _check_load_options(entry: str, ephemeral_gpu_offload: bool, torch_device: str | torch.device | None) -> None:
    """peft's load options that change where work happens, never the result.

    ``torch_device`` is where peft reads the file's tensors before copying them into the adapter, whose parameters
    live beside their base layers either way; it is checked and the tensors are copied straight to each parameter's
    device. ``ephemeral_gpu_offload`` moves DoRA's initial weight-norm computation to a GPU; without a GPU peft does
    nothing with it, and deltatune refuses it where a GPU exists rather than ignore it.

    Raises:
        ConfigError: ``ephemeral_gpu_offload=True`` while a GPU is available.
        TypeError: ``torch_device`` is not a device.
    """
    if torch_device is not None:
        try:
            torch.device(torch_device)
        except (RuntimeError, TypeError) as exc:
            raise TypeError(f"{entry}(): torch_device={torch_device!r} is not a torch device: {exc}") from None
    if ephemeral_gpu_offload and torch.cuda.is_available():
        raise ConfigError(
            f"{entry}(): ephemeral_gpu_offload=True is not implemented by deltatune (it computes DoRA's initial "
            f"weight norm where the base weight lives); load without it, or move the model to the GPU first"
        )


def _keep_base_dtype(base: nn.Module, adapter_name: str, shared: nn.Module | None) -> None:
    """peft's ``autocast_adapter_dtype=False``: the new adapter's weights take their base layer's half-precision
    dtype instead of the float32 they are built in beside a float16/bfloat16 base (``methods.common.adapter_dtype``);
    tensors shared by all layers (VeRA's projections) follow the first adapted layer."""
    half = (torch.float16, torch.bfloat16)
    dtypes = []
    for _, layer in adapter_layers(base):
        if adapter_name not in layer.deltas:
            continue
        dtype = next((p.dtype for p in layer.base_layer.parameters() if p.is_floating_point()), None)
        if dtype in half:
            layer.deltas[adapter_name].to(dtype)
            dtypes.append(dtype)
    if shared is not None and dtypes:
        shared.to(dtypes[0])


class AdapterModel(nn.Module):
    """Holds the base model as ``.model`` so saved keys read ``base_model.model.<path>`` as in peft, and in
    ``shared_state`` each adapter's tensors shared by all its layers (``LayerMethod.make_shared``: VeRA's projections),
    saved as ``base_model.<name>`` as peft saves them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.shared_state = nn.ModuleDict()

    def _layer_methods(self) -> Iterator[tuple[str, PeftConfig, LayerMethod]]:
        for name, config in getattr(self, "peft_config", {}).items():
            method = get_method(config.peft_type)
            if isinstance(method, LayerMethod):
                yield name, config, method

    def adapter_loss(self) -> torch.Tensor | None:
        """The sum of the adapters' training-time ``LayerMethod.loss_term`` s (AdaLoRA's orthogonality
        regulariser), or ``None`` when no method has one."""
        terms = [
            method.loss_term(self.model, name, config)
            for name, config, method in self._layer_methods() if method.loss_term is not None
        ]
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_optimizer_step(self, step: int) -> None:
        """Run each method's ``LayerMethod.after_step`` (AdaLoRA's rank allocation) once; a training loop calls this
        after ``optimizer.step()`` and before ``zero_grad()``, whatever the methods."""
        methods = {config.peft_type: method for _, config, method in self._layer_methods()}
        for method in methods.values():
            if method.after_step is not None:
                method.after_step(self, step)

    def forward(self, *args, **kwargs):
        """The model's forward; in train mode :meth:`adapter_loss` joins ``outputs.loss``, where peft's tuner model
        adds it (a loop that computes its own loss from the logits adds ``adapter_loss()`` itself), and each method's
        :meth:`run_scopes` is open around it. With :meth:`PeftModel.enable_fast_training` on,
        :func:`deltatune.fast.forward` runs it."""
        state = self.__dict__.get("_fast_training")
        with self.run_scopes() as finishers:
            outputs = self.model(*args, **kwargs) if state is None else fast.forward(state, self.model, args, kwargs)
            for finish in finishers:
                outputs = finish(outputs, kwargs)
        loss = getattr(outputs, "loss", None)
        if self.training and isinstance(loss, torch.Tensor):
            term = self.adapter_loss()
            if term is not None:
                outputs.loss = loss + term
        return outputs

    @contextlib.contextmanager
    def run_scopes(self) -> Iterator[list[Callable[[Any, dict[str, Any]], Any]]]:
        """Open the ``LayerMethod.run_scope`` of every adapter whose method has one (Shadow; each scope does
        nothing unless its adapter is in effect); yields their ``finish`` functions for a forward's outputs."""
        with contextlib.ExitStack() as stack:
            finishers = []
            for name, config, method in list(self._layer_methods()):
                if method.run_scope is not None:
                    finish = stack.enter_context(method.run_scope(self, name, config))
                    if finish is not None:
                        finishers.append(finish)
            yield finishers

    def __getattr__(self, name: str):
        """Besides the model's attributes: the adapters' ``LayerMethod.model_functions`` as methods, like peft's
        tuner-specific ones (AdaLoRA's ``base_model.update_and_allocate(step)``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "peft_config"):
                raise
            methods = [get_method(c.peft_type) for c in getattr(self, "peft_config", {}).values()]
            for method in methods:
                if not isinstance(method, PromptMethod) and name in (method.model_functions or {}):
                    function = method.model_functions[name]
                    if isinstance(function, property):
                        return function.fget(self)
                    return functools.partial(function, self)
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A base model with one or more adapters; the entry point is :func:`get_peft_model` or :meth:`from_pretrained`.

    Attributes:
        peft_config: Adapter name -> config.
        base_model: The adapted model's holder; ``base_model.model`` is the original (now wrapped) model.
    """

    # Heads trained in full with the adapter for this task (peft's defaults), added to ``modules_to_save``.
    default_modules_to_save: ClassVar[tuple[str, ...]] = ()
    # How this task's inputs line up with prepended virtual tokens (prompt methods); data, not a forward per task.
    prompt_task: ClassVar[prompt.PromptTask] = prompt.PromptTask()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Wrap ``model`` with a new adapter ``adapter_name`` (see :meth:`add_adapter` for both options)."""
        super().__init__()
        if isinstance(model, PeftModel):
            raise AdapterStateError("the model is already a PeftModel; use add_adapter() to add another adapter")
        if isinstance(model, AdapterModel) and getattr(model, "peft_config", None):
            raise AdapterStateError("the model already holds adapters; use add_adapter() to add another adapter")
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self.prompt_encoder = nn.ModuleDict()  # prompt adapters' encoders (peft's attribute name)
        self._prompt_disabled = False
        # a fresh holder becomes base_model itself: a tuner (deltatune.tuners: LoraModel(model, config)) is one
        self.base_model = model if isinstance(model, AdapterModel) else AdapterModel(model)
        self.base_model.peft_config = self.peft_config  # peft's ``model.base_model.peft_config`` is the same dict
        self._active = [adapter_name]  # the first adapter is active; add_adapter's refresh applies that
        self.training = model.training  # a model loaded for inference stays in eval mode (no adapter dropout)
        self.add_adapter(
            adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "_active"):
                raise
            return getattr(self.base_model, name)

    # --- adapters -------------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add an adapter (not made active; see :meth:`set_adapter`). All checks run before the model changes.

        Args:
            adapter_name: The new adapter's name.
            peft_config: What to build (copied).
            low_cpu_mem_usage: peft builds the adapter on the meta device, to be filled by a load; deltatune always
                builds real, initialised weights, so ``True`` is refused rather than ignored.
            autocast_adapter_dtype: As in peft: adapter weights beside a float16/bfloat16 base are kept in float32.
                ``False`` keeps them in the base layer's dtype.

        Raises:
            AdapterStateError: invalid or duplicate name.
            ConfigError: ``low_cpu_mem_usage=True``; a second adapter that trains biases (``bias``).
            TargetError: the config's targets match nothing or something the method cannot adapt.
        """
        validate_adapter_name(adapter_name)
        if low_cpu_mem_usage:
            raise ConfigError(
                "low_cpu_mem_usage=True (adapter weights on the meta device, filled by a later load) is not "
                "supported when creating an adapter; PeftModel.from_pretrained / load_adapter accept it"
            )
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"an adapter named {adapter_name!r} already exists; choose another name")
        biased = [n for n, c in self.peft_config.items() if trained_biases(c) != "none"]
        if biased and trained_biases(peft_config) != "none":  # one bias tensor per layer, shared by all adapters
            raise ConfigError(
                f"bias={peft_config.bias!r}: adapter {biased[0]!r} already trains the model's biases, which every "
                "adapter shares; only one adapter may train them (bias='none' for the others), as in peft"
            )
        config = copy.deepcopy(peft_config)  # the adapter's own: the caller's object is never modified
        method = get_method(config.peft_type)
        base = self.get_base_model()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
        names = list(config.modules_to_save or [])
        # a config whose peft class lacks modules_to_save (trainable tokens) trains no task head, as in peft
        if self.default_modules_to_save and "modules_to_save" not in getattr(config, "_not_in_peft", ()):
            config.modules_to_save = names = names + [n for n in self.default_modules_to_save if n not in names]
        with inject.undo_scope():  # a refused modules_to_save also undoes layer_replication
            if isinstance(method, PromptMethod):
                self.prompt_encoder[adapter_name] = prompt.make_prompt_encoder(base, config, method)
            elif isinstance(method, RouterMethod):  # loads its experts as adapters of their own first
                directory = config.__dict__.pop("_read_from", None)
                self.base_model.shared_state[adapter_name] = method.attach(self, adapter_name, config, directory)
            else:
                with inject.prepared_model(base, config, method):
                    resolved = resolve(base, config, method)
                    inject.add_layer_adapter(base, resolved, adapter_name, self.base_model.shared_state)
                config = resolved.config
            try:
                if names:
                    tie = getattr(config, "ties_modules_to_save", False)
                    inject.add_modules_to_save(base, names, adapter_name, tie)
            except Exception:
                self._remove_adapter_modules(adapter_name)
                raise
        if not autocast_adapter_dtype:
            _keep_base_dtype(base, adapter_name, self._shared_state(adapter_name))
        self.peft_config[adapter_name] = config
        self.train(self.training)  # new adapter modules follow the wrapper's train/eval mode
        self._refresh()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or several, applied in order) the active adapter(s); as in peft, they train unless
        ``inference_mode`` (recorded in their configs), and only they do."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_exists(name)
        if len(names) > 1 and any(n in self.prompt_encoder for n in names):
            raise AdapterStateError(f"a prompt adapter cannot be combined with other active adapters: {names}")
        alone = [n for n in names if getattr(get_method(self.peft_config[n].peft_type), "single_active", False)]
        if len(names) > 1 and alone:
            kind = self.peft_config[alone[0]].peft_type.value
            raise AdapterStateError(f"{kind} adapters run with exactly one active adapter; got {names}")
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._active = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; a router adapter (X-LoRA) takes its experts with it, and an expert cannot be deleted
        while its router exists. The last adapter that needs a structural change of the model
        (``layer_replication``) takes it with it. Deleting an active adapter leaves the other active ones active,
        or else the first remaining adapter (none if it was the last), as peft does."""
        self._check_exists(adapter_name)
        owner = next((n for n, router in self._routers() if adapter_name in router.experts), None)
        if owner is not None:
            raise AdapterStateError(f"adapter {adapter_name!r} is an expert of {owner!r}; delete {owner!r} instead")
        gone = {adapter_name, *getattr(dict(self._routers()).get(adapter_name), "experts", ())}
        undos = self._structure_undos([self.peft_config[n] for n in gone if n in self.peft_config],
                                      {n: c for n, c in self.peft_config.items() if n not in gone})
        self._remove_adapter_modules(adapter_name)
        del self.peft_config[adapter_name]
        for undo in undos:
            undo()
        if adapter_name in self._active:
            remaining = [n for n in self._active if n not in gone]
            self._active = remaining or list(self.peft_config)[:1]
        self._refresh()

    def _structure_undos(self, configs: Iterable[PeftConfig],
                         remaining: Mapping[str, PeftConfig]) -> list[Callable[[], None]]:
        """The undos of the structural changes the methods of ``configs`` made (``LayerMethod.restore_model``) that
        no adapter of ``remaining`` needs; raises, before anything changes, where one cannot be undone."""
        methods = {id(m): m for m in map(get_method, {c.peft_type for c in configs})}
        undos = [m.restore_model(self.get_base_model(), remaining) for m in methods.values()
                 if getattr(m, "restore_model", None) is not None]
        return [undo for undo in undos if undo is not None]

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        router = dict(self._routers()).get(adapter_name)
        if router is not None:
            router.detach()
            for expert in router.experts:
                if expert in self.peft_config:
                    inject.remove_adapter(self.get_base_model(), expert)
                    del self.peft_config[expert]
        inject.remove_adapter(self.get_base_model(), adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        if adapter_name in self.base_model.shared_state:
            del self.base_model.shared_state[adapter_name]

    def _routers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(adapter name, router module)`` of each router adapter (``registry.RouterMethod``: X-LoRA)."""
        for name, config in self.peft_config.items():
            if isinstance(get_method(config.peft_type), RouterMethod) and name in self.base_model.shared_state:
                yield name, self.base_model.shared_state[name]

    def _check_exists(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterStateError(f"no adapter named {name!r}; adapters: {list(self.peft_config)}")

    def _refresh(self) -> None:
        """Re-derive per-layer active sets and ``requires_grad`` from the active adapters and their configs."""
        base = self.get_base_model()
        routers = dict(self._routers())
        # an active router's experts are active too (weighted by the router; they train when it trains them)
        active = [e for n in self._active for e in (n, *(routers[n].experts if n in routers else ()))]
        active = [n for n in active if n in self.peft_config]  # a router's experts load before its own config
        inject.set_active(base, active)
        for name, router in routers.items():
            router.set_active(name in self._active)
        trainable = [n for n in active if not self.peft_config[n].inference_mode]
        biases = next((trained_biases(self.peft_config[n]) for n in trainable), "none")
        inject.mark_trainable(base, trainable, biases)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name in trainable)
        for name, shared in self.base_model.shared_state.items():  # trainable shared tensors: VB-LoRA's bank
            shared.requires_grad_(name in trainable)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model (merged adapters are unmerged first)."""
        base = self.get_base_model()
        inject.set_disabled(base, True)
        was_disabled, self._prompt_disabled = self._prompt_disabled, True  # also set by disable_adapter_layers()
        try:
            yield
        finally:
            inject.set_disabled(base, was_disabled)
            self._prompt_disabled = was_disabled

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add LoRA adapter ``adapter_name``, a weighted combination of LoRA ``adapters`` (negative weights
        subtract); not made active. ``combination_type``: ``"svd"``, ``"linear"``, ``"cat"``, ``"ties"``,
        ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` or an ``*_svd`` form of the last four; see
        :mod:`deltatune.combine` for each one's math and for ``density`` / ``majority_sign_method`` / ``svd_*``.
        All checks run before the model changes; unlike peft, an existing ``adapter_name`` is an error, not a no-op.

        Raises:
            AdapterStateError: an unknown or prompt-learning adapter, or ``adapter_name`` already in use.
            ConfigError: an unknown ``combination_type``, not one weight per adapter, different ranks for a type that
                merges factors, DoRA, a missing ``density``, or adapters whose targets cannot be united.
        """
        from . import combine

        config, combination = combine.resolve_request(
            self.get_base_model(), self.peft_config, adapters, weights, combination_type, svd_rank=svd_rank,
            svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
            majority_sign_method=majority_sign_method,
        )
        self.add_adapter(adapter_name, config)
        try:
            combine.fill(self.get_base_model(), adapter_name, list(adapters), combination)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def disable_adapter_layers(self) -> None:
        """Compute as the base model until :meth:`enable_adapter_layers` (the lasting form of
        :meth:`disable_adapter`; merged adapters are unmerged on the next forward)."""
        inject.set_disabled(self.get_base_model(), True)
        self._prompt_disabled = True

    def enable_adapter_layers(self) -> None:
        inject.set_disabled(self.get_base_model(), False)
        self._prompt_disabled = False

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """Per adapter layer: which adapters it holds, which are active, merged, trainable, and where they live."""
        return status.get_layer_status(self.get_base_model(), checkpoint.LAYER_KEY_PREFIX)

    def get_model_status(self) -> status.ModelStatus:
        """The same, summarised for the whole model (``"irregular"`` where layers disagree)."""
        return status.get_model_status(
            self, self.get_base_model(), adapter_model_type=type(self).__name__,
            peft_types={name: config.peft_type.value for name, config in self.peft_config.items()},
        )

    # --- merging --------------------------------------------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False, *,
        max_merge_error: float | None = None,
    ) -> None:
        """Fold adapters (default: the active ones) into the base weights; all layers or none.

        On a quantized base (``docs/quantization.md``) each adapted layer is dequantized, merged and requantized; the
        measured error of each layer's merge (the share of the adapter's effect on the layer's outputs that
        requantization lost) is warned about and kept in :attr:`quantized_merge_errors`. ``max_merge_error`` (e.g.
        ``0.1``) refuses, before any weight changes, a merge that would lose more than that on any layer.
        """
        self._merge(adapter_names, safe_merge, max_merge_error, dequantize=False)

    def _merge(self, adapter_names: Sequence[str] | None, safe_merge: bool, max_merge_error: float | None,
               dequantize: bool) -> None:
        """:meth:`merge_adapter`; ``dequantize`` first replaces quantized bases by dense copies (exact)."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        if max_merge_error is not None and (isinstance(max_merge_error, bool) or not isinstance(
                max_merge_error, (int, float)) or not max_merge_error >= 0):
            raise ConfigError(f"max_merge_error must be a non-negative number or None, got {max_merge_error!r}")
        for name in names:
            self._check_exists(name)
            if name in self.prompt_encoder:
                raise AdapterStateError(
                    f"adapter {name!r} is {self.peft_config[name].peft_type.value}: prompt methods have no weights to "
                    f"merge (they feed the model inputs); keep using the PeftModel, or merge a layer adapter instead"
                )
            routed = [n for n, router in self._routers() if n == name or n in self._active and name in router.experts]
            if routed:
                raise AdapterStateError(
                    f"adapter {name!r} cannot be merged: {routed[0]!r} ({self.peft_config[routed[0]].peft_type.value}) "
                    f"weighs its experts per token, which no merged weight can express; keep it unmerged"
                )
        errors = inject.merge(self.get_base_model(), names, safe_merge=safe_merge,
                              max_quantized_error=max_merge_error, dequantize=dequantize)
        self.quantized_merge_errors = errors
        if errors:
            worst = max(errors, key=errors.__getitem__)
            warnings.warn(
                f"merged into {len(errors)} quantized layers by requantizing: up to {errors[worst]:.1%} of the "
                f"adapter's effect on a layer's outputs was lost ({worst}); see quantized_merge_errors, or merge "
                f"with merge_and_unload(quantized_base='dequantize') for an exact merge",
                quant.QuantizedMergeWarning, stacklevel=3,
            )

    def unmerge_adapter(self) -> None:
        inject.unmerge(self.get_base_model())

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None, *,
        quantized_base: str = "requantize", max_merge_error: float | None = None,
    ) -> nn.Module:
        """Merge adapters into the weights and return the plain base model (``modules_to_save`` heads replaced by
        their trained copies). The returned model no longer depends on deltatune.

        Args:
            quantized_base: For adapted layers with a quantized base (``docs/quantization.md``): ``"requantize"``
                keeps them quantized (the merge is lossy; the measured error per layer is warned about and left on
                the returned model as ``quantized_merge_errors``), ``"dequantize"`` replaces them by dense
                ``nn.Linear`` layers in the weight's original dtype holding ``W + ΔW`` (exact).
            max_merge_error: With ``"requantize"``: refuse (nothing changes) when any layer would lose more than
                this share of the adapter's effect; see :meth:`merge_adapter`.
        """
        if quantized_base not in ("requantize", "dequantize"):
            raise ConfigError(f"quantized_base must be 'requantize' or 'dequantize', got {quantized_base!r}")
        if quantized_base == "dequantize" and max_merge_error is not None:
            raise ConfigError("max_merge_error applies to quantized_base='requantize'; a dequantized merge is exact")
        self._merge(adapter_names, safe_merge, max_merge_error, dequantize=quantized_base == "dequantize")
        model = inject.unload(self.get_base_model(), keep_trained_copies=True)
        if self.quantized_merge_errors:
            model.quantized_merge_errors = self.quantized_merge_errors
        return model

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the base model exactly as it was."""
        base = self.get_base_model()
        for _, router in self._routers():
            router.detach()
        inject.unmerge(base)
        undos = self._structure_undos(self.peft_config.values(), {})
        inject.unload(base, keep_trained_copies=False)
        for undo in undos:  # layer_replication: the original layers again
            undo()
        return base

    # --- running --------------------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str] | None = None, task_ids: Any = None, **kwargs):
        """The base model's forward; ``adapter_names`` gives one adapter name per row (``"__base__"``: none; a
        :class:`~deltatune.rows.RowPlan` to share its groups across calls), ``task_ids`` one task index per row for a
        multitask prompt or Poly adapter."""
        self._check_row_adapters(adapter_names)
        scope = self._alora_scope(args, kwargs, "input_ids")
        call = self._prompt_call(adapter_names)
        if call is not None:
            return prompt.prompt_forward(self.get_base_model(), *call, self.prompt_task, args, kwargs, task_ids)
        with batch_adapters(adapter_names), batch_tasks(self._layer_task_ids(adapter_names, task_ids)), scope:
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, task_ids: Any = None, **kwargs):
        """The base model's ``generate()`` (KV cache on), optionally with one adapter (``adapter_names``) or one
        task (``task_ids``: multitask prompt tuning, Poly) per input row."""
        self._check_row_adapters(adapter_names)
        scope = self._alora_scope(args, kwargs, "input_ids", "inputs")
        call = self._prompt_call(adapter_names)
        if call is not None:
            return prompt.prompt_generate(self.get_base_model(), *call, args, kwargs, task_ids)
        # aLoRA's offsets from the prompt, for every step (methods/alora.py)
        with batch_adapters(adapter_names), batch_tasks(self._layer_task_ids(adapter_names, task_ids)), scope, \
                self.base_model.run_scopes():
            return self.get_base_model().generate(*args, **kwargs)

    def _alora_scope(self, args: tuple, kwargs: dict[str, Any], *id_keys: str) -> contextlib.AbstractContextManager:
        """Where aLoRA adapters find their invocation in this call (:func:`~deltatune.methods.alora.invocation_scope`:
        the token ids, or peft's ``alora_offsets`` popped from ``kwargs``); nothing for a model without one.

        Raises:
            ConfigError: ``alora_offsets`` for a model with no aLoRA adapter (it would change nothing).
        """
        offsets = kwargs.pop("alora_offsets", None)
        if not any(getattr(c, "alora_invocation_tokens", None) for c in self.peft_config.values()):
            if offsets is not None:
                raise ConfigError("alora_offsets given, but no adapter of this model has alora_invocation_tokens")
            return contextlib.nullcontext()
        from .methods.alora import invocation_scope  # loaded already with LoRA; `import deltatune` loads no method

        ids = next((kwargs[k] for k in id_keys if kwargs.get(k) is not None), None)
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        return invocation_scope(ids, offsets)

    def _prompt_call(self, adapter_names: Sequence[str] | None) -> tuple | None:
        """``(config, encoder, strategy)`` of the active prompt adapter, or ``None`` when a layer adapter (or none, or
        ``disable_adapter()``) is in effect."""
        name = self._active[0] if self._active else None
        if name not in self.prompt_encoder or self._prompt_disabled:
            return None
        if adapter_names is not None:
            raise AdapterStateError("adapter_names (one adapter per row) is not supported with a prompt adapter")
        config = self.peft_config[name]
        return config, self.prompt_encoder[name], get_method(config.peft_type).strategy

    def _layer_task_ids(self, adapter_names: Sequence[str] | None, task_ids: Any) -> torch.Tensor | None:
        """``task_ids`` checked for the layer adapters this call uses (the rows' ``adapter_names``, else the active
        ones) whose method routes by task (``LayerMethod.num_tasks``: Poly), which then require them; ``None`` where
        no such adapter is in use. Given to adapters that take none, they are refused (``TypeError``); while
        adapters are disabled the base model computes and they are not read."""
        if self._prompt_disabled:
            return None
        counts = {}
        for name in dict.fromkeys(adapter_names if adapter_names is not None else self._active):
            method = get_method(self.peft_config[name].peft_type) if name in self.peft_config else None
            if isinstance(method, LayerMethod) and method.num_tasks is not None:
                counts[name] = method.num_tasks(self.peft_config[name])
        if not counts:
            prompt.refuse_task_ids(None, task_ids)
            return None
        name = min(counts, key=counts.__getitem__)
        what = f"adapter {name!r} ({self.peft_config[name].peft_type.value})"
        return prompt.check_task_ids(task_ids, None, counts[name], what)

    def _check_row_adapters(self, adapter_names: Sequence[str] | None) -> None:
        if adapter_names is None:
            return
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise AdapterStateError(f"adapter_names mentions unknown adapters {unknown}; have {list(self.peft_config)}")
        # A merged layer refuses mixed rows itself (AdapterLayer._mixed_forward), before computing anything, so the
        # whole model is not walked here on every call.

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Turn on the base model's gradient checkpointing so that it works with a frozen base.

        With reentrant checkpointing, a segment whose inputs do not require grad produces no gradients; making the
        input embeddings' output require grad fixes that without the user having to know. A segment recomputed in
        backward keeps the forward's ``adapter_names`` and ``task_ids`` rows (:func:`deltatune.rows.keep_row_context`).
        """
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24's name for it
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        for module in base.modules():
            checkpoint = module.__dict__.get("_gradient_checkpointing_func")
            if checkpoint is not None:
                module._gradient_checkpointing_func = keep_row_context(checkpoint)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def enable_fast_training(
        self, *, chunked_loss: bool | str = "auto", compute_dtype: Any = "auto", checkpoint_every: int | None = None,
        chunk_logits: int = fast.CHUNK_LOGITS, memory_budget: int | str | None = None,
        sample_batch: Mapping[str, Any] | None = None,
    ) -> fast.FastTraining:
        """Compute the frozen base faster and leaner in training; what is trained and saved does not change
        (``docs/fast-training.md``). Calling it again replaces the previous choice.

        Args:
            chunked_loss: ``model(..., labels=...)`` in train mode with gradients computes the loss chunk by chunk from
                the LM head's input, never the full logits (:func:`deltatune.fast.linear_cross_entropy`), and returns
                ``logits=None``; eval mode or ``torch.no_grad()`` returns logits as usual. ``"auto"``: where the loss
                is known to equal transformers' (Llama-, Mistral-, Qwen-, GPT-2-, T5-type models); ``True`` raises
                for other models.
            compute_dtype: Store and compute the frozen base parameters in ``"bf16"`` / ``"fp16"`` (adapters, their
                gradients and the optimizer stay float32). ``"auto"``: bfloat16 where matmuls in it are fast (CUDA
                with bfloat16, else float16; a CPU with AVX512-BF16 / AMX), float32 elsewhere; ``None``: unchanged.
                The cast rounds the base weights; :meth:`disable_fast_training` casts back, not to the old values.
            checkpoint_every: Recompute the activations of every k-th decoder layer in backward (``1``: all), to trade
                time for memory; ``None``: no checkpointing.
            chunk_logits: How many logits (tokens x vocab) one loss chunk holds.
            memory_budget: Choose ``checkpoint_every`` instead: bytes (or ``"6GiB"``) that a training step's
                parameters, gradients, AdamW state and saved activations should fit in; one forward on
                ``sample_batch`` (as large as the training batches) measures the activations, and the largest ``k``
                that fits is taken (none where everything fits).

        Returns:
            What was switched on, with a note for each ``"auto"`` part that stayed off (``model.fast_training``).

        Raises:
            ConfigError: an option out of range, or a part asked for explicitly that this model does not support
                (nothing is changed then).
        """
        return fast.enable_fast_training(
            self, chunked_loss=chunked_loss, compute_dtype=compute_dtype, checkpoint_every=checkpoint_every,
            chunk_logits=chunk_logits, memory_budget=memory_budget, sample_batch=sample_batch,
        )

    def disable_fast_training(self) -> None:
        """Back to the standard training path (see :func:`deltatune.fast.disable_fast_training`)."""
        fast.disable_fast_training(self)

    @property
    def fast_training(self) -> fast.FastTraining | None:
        """What :meth:`enable_fast_training` switched on, or ``None``."""
        return self.__dict__.get("_fast_training")

    # --- parameters -----------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, adapters included in "all"; a quantized weight counts the weights it
        stands for (``quant.weight_counts``), as in peft."""
        counts = quant.weight_counts(self)
        sizes = [(counts.get(id(p), p.numel()), p.requires_grad) for p in self.parameters()]
        return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- files ----------------------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str = "default", save_embedding_layers: bool | str = "auto",
                           state_dict: Mapping[str, torch.Tensor] | None = None) -> dict:
        """The tensors saved for ``adapter_name``, keyed exactly as in ``adapter_model.safetensors``; with
        ``state_dict`` (a full state dict of this model gathered by FSDP / DeepSpeed ZeRO-3), the values come from it
        (:func:`deltatune.checkpoint.gathered_values`)."""
        self._check_exists(adapter_name)
        if adapter_name in self.prompt_encoder:
            if state_dict is not None:
                raise ConfigError("state_dict= takes a layer adapter's values from a gathered state dict; a prompt "
                                  "adapter's file holds its encoder's output, so save it from the model itself")
            return checkpoint.prompt_file_state(self.get_base_model(), adapter_name, self.prompt_encoder[adapter_name])
        saved = checkpoint.layer_file_state(
            self.get_base_model(), adapter_name, biases=trained_biases(self.peft_config[adapter_name]),
            save_embedding_layers=save_embedding_layers, shared=self._shared_state(adapter_name),
        )
        if state_dict is None:
            return saved
        return checkpoint.gathered_values(saved, state_dict, self.get_base_model(), adapter_name,
                                          prefix=checkpoint.LAYER_KEY_PREFIX,
                                          shared_prefix=f"base_model.shared_state.{adapter_name}.")

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
        """Load tensors keyed as in ``adapter_model.safetensors`` into the existing adapter ``adapter_name``
        (``checkpoint`` checks every key and shape first); ``source``, the file, is named in every error."""
        self._check_exists(adapter_name)
        if adapter_name not in self.prompt_encoder:
            checkpoint.load_layer_file_state(
                self.get_base_model(), state_dict, adapter_name, source, self._shared_state(adapter_name)
            )
            return
        self.prompt_encoder[adapter_name] = checkpoint.load_prompt_file_state(
            self.get_base_model(), state_dict, adapter_name, self.prompt_encoder[adapter_name], source
        )
        self._refresh()

    def _shared_state(self, adapter_name: str) -> nn.Module | None:
        """The adapter's tensors shared by all its layers (``LayerMethod.make_shared``), if its method has any."""
        shared = self.base_model.shared_state
        return shared[adapter_name] if adapter_name in shared else None

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Save adapters in peft's format: the default adapter at the top of ``save_directory``, every other adapter
        in a sub-folder named after it.

        The save is atomic as a whole (:func:`deltatune.files.write_adapters`): a reader, or a crash at any moment,
        sees either all the previous files or all the new ones, never one adapter's new weights with its old config.
        Other entries of ``save_directory`` are kept. The safetensors metadata records the base model's fingerprint
        (:mod:`deltatune.fingerprint`), which loading checks; peft ignores it.

        Args:
            save_directory: Where to write.
            safe_serialization: ``adapter_model.safetensors`` (default) or a pickled ``adapter_model.bin``.
            selected_adapters: Which adapters (default: all).
            save_embedding_layers: Also save the base weights of adapted embedding layers (``"auto"``: when the
                vocabulary was resized).
            is_main_process: Only the main process writes (distributed training).
            path_initial_model_for_weight_conversion: A directory where this PiSSA/OLoRA adapter was saved right
                after creation: the adapter is then saved as a plain LoRA of twice the rank that applies to the
                *original* base model (see ``methods.lora.mutated_init_to_lora``), as peft does.
            state_dict: The values to save, from a full state dict of this model gathered by FSDP or DeepSpeed
                ZeRO-3 (whose live parameters are shards): keys as ``state_dict()`` names them, wrapper segments
                such as ``_fsdp_wrapped_module.`` ignored, or as the file does (what Trainer hands over).

        Raises:
            ConfigError: a conversion asked for an adapter that is not LoRA.
        """
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            self._check_exists(name)
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            from .methods.lora import LoraConfig, mutated_init_to_lora

            wrong = [n for n in names if not isinstance(self.peft_config[n], LoraConfig)]
            if wrong:
                raise ConfigError(
                    f"path_initial_model_for_weight_conversion converts LoRA (PiSSA/OLoRA) adapters only; {wrong} "
                    f"are not LoRA"
                )
            initial = read_weights(path_initial_model_for_weight_conversion)
        adapters = {}
        for name in names:
            adapter_directory(save_directory, name)  # refuses names and symlinks that lead outside
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            tensors = self.adapter_state_dict(name, save_embedding_layers, state_dict)
            if initial is not None:
                config, tensors = mutated_init_to_lora(config, tensors, *initial)
            # A converted PiSSA/OLoRA adapter applies to the original base, not to the residual this model holds:
            # its fingerprint keeps the shapes only.
            fingerprint = base_fingerprint(self.get_base_model(), name, values=initial is None)
            fingerprint = json.dumps(fingerprint, separators=(",", ":"))
            adapters["" if name == "default" else name] = adapter_files(
                config.to_json_string(), tensors, safe_serialization, {METADATA_KEY: fingerprint}
            )
        write_adapters(save_directory, adapters)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        safetensors_only: bool = False,
        torch_device: str | torch.device | None = None,
        strict_base: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Attach a saved adapter (local directory or hub repo id with ``revision``/``subfolder``) to ``model``.

        On any error the base model is left exactly as it was before the call.

        Args:
            model: The base model.
            model_id: Adapter directory or hub repo id.
            adapter_name: Name of the loaded adapter.
            is_trainable: Load it trainable (default: frozen, inference mode).
            config: Use this config instead of reading ``adapter_config.json`` (weights are still read).
            autocast_adapter_dtype: See :meth:`add_adapter`.
            ephemeral_gpu_offload: See ``_check_load_options`` (refused where a GPU exists).
            low_cpu_mem_usage: peft's memory saving while loading; the loaded model is the same, so it is accepted.
            key_mapping: ``{regex: replacement}`` applied to the saved keys first, as peft does (see
                :func:`checkpoint.remap_keys`); by default the base model's ``_checkpoint_conversion_mapping``.
            safetensors_only: Refuse a pickled ``adapter_model.bin``.
            torch_device: See ``_check_load_options``.
            strict_base: Refuse (:class:`AdapterLoadError`) an adapter whose saved base-model fingerprint
                (:mod:`deltatune.fingerprint`) does not match ``model``; by default that only warns
                (:class:`~deltatune.fingerprint.BaseModelMismatchWarning`). deltatune's own argument, not peft's.
            **kwargs: Only the hub keywords ``subfolder``, ``revision``, ``token``, ``cache_dir``,
                ``local_files_only``.

        Raises:
            TypeError: any other keyword.
        """
        hub = _hub_kwargs("from_pretrained", kwargs)
        _check_load_options("from_pretrained", ephemeral_gpu_offload, torch_device)
        validate_adapter_name(adapter_name)
        config, config_source, tensors, source, fingerprint = _read_adapter(model_id, config, safetensors_only, hub)
        config.inference_mode = not is_trainable
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            target_cls = TASK_WRAPPERS.get(config.task_type, PeftModel)
        tensors = _remap(model, config, tensors, key_mapping)
        check_planned_size(model, config, tensors, source, config_source)
        with restore_base_on_error(model, config):
            with naming_source(config_source):
                peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            try:
                peft_model.load_adapter_state_dict(tensors, adapter_name, source)
                check_base(fingerprint, model, source, strict_base)
            except Exception:
                peft_model.unload()
                raise
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        safetensors_only: bool = False,
        strict_base: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter under ``adapter_name`` (not made active); all or nothing. Arguments as in
        :meth:`from_pretrained`.

        As in peft, an existing ``adapter_name`` gets the file's weights (what ``transformers.Trainer`` does to
        resume from a checkpoint or restore the best one): in place, so an optimizer holding the parameters keeps
        them, and only when the file's config equals the adapter's (else the weights would mean something else);
        its trainability is unchanged. A new adapter's base is checked against its fingerprint as in
        :meth:`from_pretrained` (``strict_base``).

        Raises:
            ConfigError: the file's config differs from the existing adapter's.
            TypeError: an unknown keyword.
        """
        hub = _hub_kwargs("load_adapter", kwargs)
        _check_load_options("load_adapter", ephemeral_gpu_offload, torch_device)
        validate_adapter_name(adapter_name)
        config, config_source, tensors, source, fingerprint = _read_adapter(model_id, None, safetensors_only, hub)
        tensors = _remap(self.get_base_model(), config, tensors, key_mapping)
        if adapter_name in self.peft_config:
            self._check_same_config(adapter_name, config, config_source)
            self.load_adapter_state_dict(tensors, adapter_name, source)
            return
        config.inference_mode = not is_trainable
        check_planned_size(self.get_base_model(), config, tensors, source, config_source)
        with restore_base_on_error(self.get_base_model(), config):
            with naming_source(config_source):
                self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
            try:
                self.load_adapter_state_dict(tensors, adapter_name, source)
                check_base(fingerprint, self.get_base_model(), source, strict_base)
            except Exception:
                self._remove_adapter_modules(adapter_name)
                del self.peft_config[adapter_name]
                self._refresh()
                raise

    def _check_same_config(self, adapter_name: str, config: PeftConfig, source: str) -> None:
        """Refuse loading a file into existing adapter ``adapter_name`` unless it was saved with the same config
        (fields that do not change the weights' meaning aside)."""
        ignored = ("inference_mode", "base_model_name_or_path", "revision")
        mine = {k: v for k, v in self.peft_config[adapter_name].to_dict().items() if k not in ignored}
        theirs = {k: v for k, v in config.to_dict().items() if k not in ignored}
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            raise ConfigError(
                f"{source}: cannot load into the existing adapter {adapter_name!r}: its config differs in {diff}; "
                f"load it under another name"
            )


def _remap(
    model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    """Apply ``key_mapping``, by default (layer methods only, as peft) the model's ``_checkpoint_conversion_mapping``,
    with which transformers maps checkpoints of an older architecture onto a renamed one."""
    if key_mapping is None and not config.is_prompt_learning:
        key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
    return checkpoint.remap_keys(tensors, key_mapping) if key_mapping else tensors


def _read_adapter(
    model_id: str | os.PathLike, config: PeftConfig | None, safetensors_only: bool, hub: dict[str, Any]
) -> tuple[PeftConfig, str, dict[str, torch.Tensor], str, str | None]:
    """The config (``config`` if given) and weights of one saved version, with the paths they came from, and the
    base-model fingerprint saved with the weights (``None`` if there is none).

    A save swaps the whole directory in (``files.replace_directory``); should one land between reading the config and
    reading the weights, both are read again, so a pair never mixes two versions.
    """
    directory = os.path.join(os.fspath(model_id), hub.get("subfolder") or "")
    for _ in range(5):
        version = directory_version(directory)
        if config is not None:
            read, config_source = copy.deepcopy(config), "config passed to from_pretrained"
        else:
            read, config_source = read_config_file(model_id, **hub)
        tensors, source = read_weights(model_id, safetensors_only=safetensors_only, **hub)
        if directory_version(directory) == version:
            break
    if isinstance(get_method(read.peft_type), RouterMethod):  # its experts are saved beside it (RouterMethod.attach)
        read.__dict__["_read_from"] = directory
    metadata = read_safetensors_header(source).get("__metadata__", {}) if source.endswith(".safetensors") else {}
    return read, config_source, tensors, source, metadata.get(METADATA_KEY)


class PeftModelForCausalLM(PeftModel):
    """Decoder-only language models (Llama, GPT-2, ...)."""

    prompt_task = prompt.PromptTask(token_labels=True, positions_from_mask=True)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models (T5, MT5, mt0, BART, ...)."""


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the classification head trains in full and is saved with the adapter."""

    default_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    """Token classification; the classification head trains in full and is saved with the adapter."""

    default_modules_to_save = ("classifier", "score")
    prompt_task = prompt.PromptTask(token_labels=True)


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering; the span head trains in full and is saved with the adapter."""

    default_modules_to_save = ("qa_outputs",)
    prompt_task = prompt.PromptTask(span_keys=("start_positions", "end_positions"))


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings (hidden states)."""


TASK_WRAPPERS: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


# peft 0.21.2's COMPATIBLE_TUNER_TYPES (peft/tuners/mixed/model.py): the methods a PeftMixedModel holds together.
MIXED_PEFT_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT", "SHIRA")


class PeftMixedModel(PeftModel):
    """Adapters of different methods (``MIXED_PEFT_TYPES``) on one model, several active at once: peft's
    ``PeftMixedModel``, built by ``get_peft_model(..., mixed=True)`` or :meth:`from_pretrained`, each further adapter
    added with :meth:`add_adapter` / :meth:`load_adapter` from its own (ordinary, single-method) adapter directory.

    Active adapters on one layer compose in the order they were added, whatever order :meth:`set_adapter` names them
    in, as in peft (which wraps each new method's layer around the layers already there): the first added is
    innermost, so an OFT adapter added after a LoRA rotates the input the LoRA sees, and a merge folds them in that
    order (``AdapterLayer.delta_runs``). Unlike peft's, it also saves (each adapter as its own peft directory, as
    :meth:`PeftModel.save_pretrained`), and deleting the active adapter is refused as in :class:`PeftModel`.
    """

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """:meth:`PeftModel.add_adapter` for a method that mixes (``MIXED_PEFT_TYPES``); any other is refused.

        Raises:
            ConfigError: a method outside ``MIXED_PEFT_TYPES`` (prompt methods, IA3, VeRA, ...); nothing changes.
        """
        kind = peft_config.peft_type.value
        if kind not in MIXED_PEFT_TYPES:
            raise ConfigError(
                f"{kind} adapters cannot be mixed: a PeftMixedModel holds {list(MIXED_PEFT_TYPES)} adapters (as "
                f"peft's); use PeftModel for a {kind} adapter"
            )
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                            autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (one name or several) the active adapters; as in peft they train unless
        ``inference_mode`` (which is recorded in their configs)."""
        super().set_adapter([adapter_name] if isinstance(adapter_name, str) else list(adapter_name), inference_mode)

    def delete_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Delete one adapter or several (all checked first); deleting active ones follows
        :meth:`PeftModel.delete_adapter`'s rule, as in peft."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_exists(name)
        for name in names:
            super().delete_adapter(name)

    def _refresh(self) -> None:
        """Each layer's active deltas outermost (last added) first; adapters of one method added one after another
        share one peft layer, which runs them in the order ``set_adapter`` named them."""
        super()._refresh()
        for _, layer in adapter_layers(self.get_base_model()):
            runs = layer.delta_runs([n for n in reversed(self.peft_config) if n in self._active and n in layer.deltas])
            layer.set_active([n for run in runs for n in sorted(run, key=self._active.index)])


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; the wrapper class follows ``task_type``
    (``mixed``: :class:`PeftMixedModel`).

    Args:
        model: The base model (modified in place).
        peft_config: The adapter's config.
        adapter_name: Its name.
        mixed: Return a :class:`PeftMixedModel` (adapters of different methods active together; ``task_type``
            then chooses no task wrapper, as in peft).
        autocast_adapter_dtype: See :meth:`PeftModel.add_adapter`.
        revision: Recorded as the config's ``revision`` (the base model's hub revision), as peft does.
        low_cpu_mem_usage: See :meth:`PeftModel.add_adapter` (``True`` is refused).

    Raises:
        ConfigError: ``low_cpu_mem_usage=True``; with ``mixed=True``, a method outside ``MIXED_PEFT_TYPES``.
    """
    if revision is not None:
        peft_config = dataclasses.replace(peft_config, revision=revision)
    cls = TASK_WRAPPERS.get(peft_config.task_type, PeftModel) if peft_config.task_type else PeftModel
    if mixed:
        cls = PeftMixedModel
    return cls(
        model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )

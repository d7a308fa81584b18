"""peft's low-level tuner API: ``LoraModel(model, config, "default")``, ``IA3Model(...)``, ... one class per method.

In peft, ``PeftModel.base_model`` is a per-method *tuner*: the module holding the adapted model as ``.model``, the
configs as ``.peft_config``, and the adapter operations (``set_adapter``, ``merge_and_unload``, ``unload``, ...). Code
written against that layer builds a tuner directly. Here every tuner class is the one generic :class:`BaseTuner`,
named per method from the registry (``<X>Config`` -> ``<X>Model``: :func:`tuner_class`), not one copy per method:
a tuner is the :class:`~deltatune.model.AdapterModel` holder that a ``PeftModel`` keeps as ``base_model`` (so
``state_dict()`` keys are peft's ``model.<path>...``), with that ``PeftModel`` kept beside it (not as a submodule)
doing the bookkeeping, so a tuner behaves exactly as ``get_peft_model`` does.

Also the registry as peft's lookup tables (:data:`PEFT_TYPE_TO_CONFIG_MAPPING`, :data:`PEFT_TYPE_TO_TUNER_MAPPING`,
read lazily, so looking one up imports one method) and :func:`get_peft_config`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .checkpoint import LAYER_KEY_PREFIX, restore_base_on_error
from .config import _METADATA_FIELDS, PeftConfig
from .errors import AdapterStateError, ConfigError
from .layers import adapter_layers, save_wrappers
from .model import MIXED_PEFT_TYPES, TASK_WRAPPERS, AdapterModel, PeftModel
from .registry import LayerMethod, PeftType, PromptMethod, RouterMethod, get_method, method_modules


class BaseTuner(AdapterModel):
    """One method's adapters injected into ``model`` (peft's ``BaseTuner``: ``LoraModel(model, config, name)``).

    Attributes:
        model: The adapted model (changed in place, as in peft).
        peft_config: Adapter name -> config (the ``PeftModel``'s own dict).
    """

    peft_type: ClassVar[PeftType | None] = None  # set on each generated per-method class

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig | Mapping[str, PeftConfig], adapter_name: str = "default",
        low_cpu_mem_usage: bool = False, state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject adapter ``adapter_name`` into ``model``.

        Args:
            peft_config: The config, or peft's ``{adapter_name: config}``.
            low_cpu_mem_usage: As in ``inject_adapter_in_model``: accepted with a ``state_dict`` (deltatune builds
                real weights and loads it into them), refused without one.
            state_dict: Adapter weights keyed relative to ``model`` (``<path>.lora_A.weight``), loaded right away.

        Raises:
            ConfigError: a config of another method, a dict holding other adapters' configs (peft records them
                without building them), a prompt method (those have no tuner), or ``low_cpu_mem_usage`` without
                ``state_dict``.
            AdapterLoadError: ``state_dict`` does not fit; ``model`` unchanged.
        """
        config = _one_config(peft_config, adapter_name)
        self._check_method(config)
        if isinstance(model, (PeftModel, AdapterModel)):
            raise AdapterStateError(f"{type(model).__name__} already holds adapters; add this one to it instead")
        if low_cpu_mem_usage and state_dict is None:
            raise ConfigError("low_cpu_mem_usage=True without a state_dict (an adapter left on the meta device) is "
                              "not supported; pass the adapter's state_dict, or leave low_cpu_mem_usage off")
        super().__init__(model)
        self.training = model.training
        self.__dict__["_in_wrapper"] = False
        with restore_base_on_error(model, config):
            wrapper = PeftModel(self, config, adapter_name)
            if state_dict is not None:
                try:
                    keyed = {LAYER_KEY_PREFIX + key: value for key, value in state_dict.items()}
                    wrapper.load_adapter_state_dict(keyed, adapter_name, "state dict")
                except Exception:
                    wrapper.unload()
                    raise
        self.__dict__["_wrapper"] = wrapper  # not a submodule: it holds this module as its base_model

    @classmethod
    def _check_method(cls, config: PeftConfig) -> None:
        method = get_method(config.peft_type)
        if isinstance(method, PromptMethod):
            raise ConfigError(f"{config.peft_type.value} is a prompt method: it has no tuner model (it feeds the model "
                              f"inputs); use get_peft_model(model, config)")
        if cls.peft_type is not None and config.peft_type != cls.peft_type:
            raise ConfigError(f"{cls.__name__} builds {cls.peft_type.value} adapters, got a "
                              f"{type(config).__name__} ({config.peft_type.value}); use "
                              f"{tuner_class(config.peft_type).__name__}")

    # --- running ----------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The model's forward with the adapters (and ``adapter_names`` / ``task_ids`` as in ``PeftModel``)."""
        if self._in_wrapper:  # the PeftModel's own call into its base_model
            return super().forward(*args, **kwargs)
        self.__dict__["_in_wrapper"] = True
        try:
            return self._wrapper(*args, **kwargs)
        finally:
            self.__dict__["_in_wrapper"] = False

    def generate(self, *args, **kwargs):
        return self._wrapper.generate(*args, **kwargs)

    def train(self, mode: bool = True) -> BaseTuner:
        super().train(mode)
        if "_wrapper" in self.__dict__:  # (the wrapper also calls this while building the first adapter)
            self._wrapper.training = mode  # it puts new adapters in its own mode
        return self

    # --- adapters ---------------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return self._wrapper.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        """peft's attribute: as last given to :meth:`set_adapter` (a name or a list), else the list of names."""
        given = self.__dict__.get("_given_active")
        names = self._wrapper.active_adapters
        return given if given is not None and ([given] if isinstance(given, str) else list(given)) == names else names

    @property
    def targeted_module_names(self) -> list[str]:
        """The modules the adapters adapt (paths in ``model``)."""
        return [name for name, layer in adapter_layers(self.model)
                if any(d.parameter_name is None for d in layer.deltas.values())]

    @property
    def targeted_parameter_names(self) -> list[str]:
        """The parameters the adapters adapt directly (LoRA's ``target_parameters``), as ``<module>.<parameter>``."""
        names = []
        for name, layer in adapter_layers(self.model):
            for delta in layer.deltas.values():
                if delta.parameter_name is not None:
                    owner = name.removesuffix(".base_layer").split(".base_layer.")[0]
                    names.append(f"{owner}.{delta.parameter_name}")
        return list(dict.fromkeys(names))

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False, state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's way to add another adapter: put its config in ``peft_config[adapter_name]`` first, then call this.

        Raises:
            ConfigError: ``model`` is not this tuner's model, ``peft_config`` has no such entry, or
                ``low_cpu_mem_usage=True`` / ``state_dict`` (load it with ``set_peft_model_state_dict`` instead).
        """
        if model is not self.model:
            raise ConfigError("inject_adapter(model, ...): model must be this tuner's .model")
        if low_cpu_mem_usage or state_dict is not None:
            raise ConfigError("inject_adapter: low_cpu_mem_usage / state_dict are not supported for a further "
                              "adapter; inject it, then load its weights with set_peft_model_state_dict")
        config = self.peft_config.pop(adapter_name, None)
        if config is None:
            raise ConfigError(f"inject_adapter: set peft_config[{adapter_name!r}] to the adapter's config first")
        try:
            self._check_method(config)
            self._wrapper.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        except Exception:
            self.peft_config.setdefault(adapter_name, config)
            raise

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or several) active; ``inference_mode`` freezes them (peft's meaning)."""
        self._wrapper.set_adapter(adapter_name, inference_mode)
        self.__dict__["_given_active"] = adapter_name

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch gradients of the given adapters' parameters on or off (until the active adapters next change)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._wrapper._check_exists(name)
        for modules in self._adapter_modules(names):
            modules.requires_grad_(requires_grad)

    def _adapter_modules(self, names: Sequence[str]) -> Iterator[nn.Module]:
        for _, layer in adapter_layers(self.model):
            yield from (layer.deltas[n] for n in names if n in layer.deltas)
        for _, wrapper in save_wrappers(self.model):
            yield from (wrapper.modules_to_save[n] for n in names if n in wrapper.modules_to_save)
        yield from (self.shared_state[n] for n in names if n in self.shared_state)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; deleting an active one leaves the others active, or the first remaining adapter when
        it was the only one (peft's rule, with its warning), and none when it was the last."""
        self._wrapper._check_exists(adapter_name)
        active = self.active_adapters
        if adapter_name in active:
            others = [n for n in active if n != adapter_name]
            if not others:
                others = [n for n in self.peft_config if n != adapter_name][:1]
                if others:
                    warnings.warn(f"adapter {adapter_name!r} was active and is deleted; active now: {others[0]!r}",
                                  UserWarning, stacklevel=2)
            if others:
                self._wrapper.set_adapter(others)
            else:
                self._wrapper._active = []
        self._wrapper.delete_adapter(adapter_name)

    def disable_adapter_layers(self) -> None:
        """Compute as the base model until :meth:`enable_adapter_layers`; warns, as peft does, where a trained
        ``bias`` means the output still differs from the base model's."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(f"adapter {name!r} trains biases (bias={bias!r}): with adapter layers disabled the "
                              f"output still differs from the base model's", UserWarning, stacklevel=2)
        self._wrapper.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        self._wrapper.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False, **options) -> None:
        """See ``PeftModel.merge_adapter`` (``max_merge_error`` for quantized bases)."""
        self._wrapper.merge_adapter(adapter_names, safe_merge, **options)

    def unmerge_adapter(self) -> None:
        self._wrapper.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, **options) -> nn.Module:
        """Merge and return the plain model; see ``PeftModel.merge_and_unload`` (``quantized_base``, ...)."""
        return self._wrapper.merge_and_unload(progressbar, safe_merge, adapter_names, **options)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the model as it was."""
        return self._wrapper.unload()

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """See ``PeftModel.add_weighted_adapter`` (LoRA adapters)."""
        self._wrapper.add_weighted_adapter(*args, **kwargs)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict[str, Any]:
        """``model.config`` as a dict (``{"model_type": "custom"}`` for a model without one), as in peft."""
        config = getattr(model, "config", None)
        if config is None:
            return {"model_type": "custom"}
        if hasattr(config, "to_dict"):
            return config.to_dict()
        return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _one_config(peft_config: PeftConfig | Mapping[str, PeftConfig], adapter_name: str) -> PeftConfig:
    if isinstance(peft_config, PeftConfig):
        return peft_config
    if not isinstance(peft_config, Mapping) or set(peft_config) != {adapter_name}:
        raise ConfigError(
            f"peft_config must be a PeftConfig or {{{adapter_name!r}: config}}, got "
            f"{list(peft_config) if isinstance(peft_config, Mapping) else type(peft_config).__name__}; add further "
            f"adapters with inject_adapter after setting peft_config[name]"
        )
    return peft_config[adapter_name]


def tuner_name(config_class: type) -> str:
    """peft's tuner class name for a config class: ``LoraConfig`` -> ``LoraModel``, ``VBLoRAConfig`` ->
    ``VBLoRAModel``."""
    return config_class.__name__.removesuffix("Config") + "Model"


@functools.cache
def tuner_class(peft_type: PeftType | str) -> type[BaseTuner]:
    """The tuner class of a layer or router method (one class per method, created once)."""
    method = get_method(peft_type)
    if isinstance(method, PromptMethod):
        raise ConfigError(f"{peft_type} is a prompt method: it has no tuner model")
    config_class = method.config_class
    name = tuner_name(config_class)
    doc = f"peft's ``{name}``: {config_class.__name__} adapters injected into a model (see :class:`BaseTuner`)."
    return type(name, (BaseTuner,), {"peft_type": PeftType(str(peft_type)), "__doc__": doc, "__module__": __name__})


def find_tuner(name: str) -> type[BaseTuner] | None:
    """The tuner class called ``name`` (``"LoraModel"``): the method whose module exports ``<X>Config``, imported
    in registry order until found; ``None`` when no method has that name."""
    if not name.endswith("Model"):
        return None
    config_name = name.removesuffix("Model") + "Config"
    for module in method_modules():
        if config_name in module.__all__ and isinstance(module.METHOD, (LayerMethod, RouterMethod)):
            return tuner_class(module.METHOD.config_class.peft_type_default())
    return None


def tuner_names() -> list[str]:
    """Every tuner class name (imports every method)."""
    return [tuner_name(m.METHOD.config_class) for m in method_modules() if not isinstance(m.METHOD, PromptMethod)]


def _prompt_module_class(peft_type: PeftType) -> type[nn.Module]:
    """A prompt method's module class, peft's "tuner" for it (``PromptEmbedding``, ``PrefixEncoder``, ...): the one
    ``nn.Module`` class its module exports."""
    module = next(m for m in method_modules() if m.METHOD is get_method(peft_type))
    (cls,) = [v for v in map(module.__dict__.get, module.__all__) if isinstance(v, type) and issubclass(v, nn.Module)]
    return cls


class _RegistryMapping(Mapping):
    """A read-only ``PeftType -> value`` table over the registry, computed per lookup (so a lookup imports one
    method); keys are also found by their string (``"LORA"``), as in peft's dicts."""

    def __init__(self, value: Callable[[PeftType], Any], name: str, keys: Sequence[str] | None = None) -> None:
        self._value, self._name = value, name
        self._keys = tuple(PeftType) if keys is None else tuple(PeftType(k) for k in keys)

    def __getitem__(self, key: Any) -> Any:
        raw = key.value if isinstance(key, enum.Enum) else key
        try:
            peft_type = PeftType(raw)
        except ValueError:
            raise KeyError(key) from None
        if peft_type not in self._keys:
            raise KeyError(key)
        return self._value(peft_type)

    def __iter__(self) -> Iterator[PeftType]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<{self._name}: {len(self)} methods>"


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[PeftType, type[PeftConfig]] = _RegistryMapping(
    lambda t: get_method(t).config_class, "PEFT_TYPE_TO_CONFIG_MAPPING")
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[PeftType, type[nn.Module]] = _RegistryMapping(
    lambda t: _prompt_module_class(t) if isinstance(get_method(t), PromptMethod) else tuner_class(t),
    "PEFT_TYPE_TO_TUNER_MAPPING")
# The methods a PeftMixedModel takes -> their tuner classes. peft 0.21.2's table lists the methods registered as
# mixable, which adds HiRA, IA3, RoAd and BEFT (its PeftMixedModel then refuses them) and leaves out OFT (which it
# takes through load_adapter only); this one lists what deltatune's PeftMixedModel takes.
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: Mapping[PeftType, type[nn.Module]] = _RegistryMapping(
    tuner_class, "PEFT_TYPE_TO_MIXED_MODEL_MAPPING", MIXED_PEFT_TYPES)
# peft's task type string -> PeftModel subclass
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    task.value: cls for task, cls in TASK_WRAPPERS.items()}


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config that ``config_dict`` (an ``adapter_config.json``'s content, ``peft_type`` included) describes.

    Raises:
        ConfigError: no or an unknown ``peft_type``, or values the config rejects; an unknown field is a
            ``TypeError`` naming it, as peft's constructor raises (``PeftConfig.from_dict`` warns and reads on).
    """
    if not isinstance(config_dict, Mapping) or "peft_type" not in config_dict:
        raise ConfigError("get_peft_config: expected a dict with a 'peft_type' entry")
    data = {key: value.value if isinstance(value, enum.Enum) else value for key, value in config_dict.items()}
    config_class = get_method(data["peft_type"], source="get_peft_config").config_class
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class._unsupported) | _METADATA_FIELDS
    unknown = sorted(set(data) - known)
    if unknown:
        raise TypeError(f"get_peft_config: {config_class.__name__} has no field(s) {unknown}")
    return config_class.from_dict(data, source="get_peft_config")

"""Adapter configs: the base dataclass, the task enum, the JSON round trip and reading ``adapter_config.json``.

Configs use peft's field names and ``peft_type`` values so that ``adapter_config.json`` files move freely between
deltatune, peft and vLLM. Reading a file applies one policy for fields this class does not define:

* a field peft knows but deltatune does not implement (``_unsupported``), left at its "off" value: ignored;
  set to anything else: :class:`ConfigError`, because loading would silently compute something else;
* metadata fields (``peft_version``, ...): ignored;
* any other unknown field: one warning naming them all, then ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError
from .files import CONFIG_NAME, atomic_write_bytes, read_json_file, resolve_file
from .registry import PeftType, config_class  # PeftType is derived from the registry; importable from here too

# Fields peft writes that carry no meaning for the computation.
_METADATA_FIELDS = frozenset({"peft_version", "megatron_core"})


class TaskType(str, enum.Enum):
    """What the wrapped model does; picks the task wrapper (``PeftModelForCausalLM``, ...)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _is_off(value: Any) -> bool:
    """Whether a peft field's value means "feature not used"."""
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def _json_type_ok(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a field annotation (``bool`` is not an ``int``; an ``int`` is a ``float``;
    enums accept their string values, checked later by the config itself). Unknown annotations accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_json_type_ok(value, a) for a in args)
    if hint is type(None) or hint is None:
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))
    if origin in (list, set, frozenset, tuple) or hint in (list, set, frozenset, tuple):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return all(_json_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        key, item = args if len(args) == 2 else (Any, Any)
        return all(_json_type_ok(k, key) and _json_type_ok(v, item) for k, v in value.items())
    return True


def _check_json_types(cls: type, kwargs: dict[str, Any], source: str) -> None:
    """Refuse values of the wrong JSON type (``"r": "8"``, ``"lora_alpha": []``) with one clear message, before the
    config's own checks or any arithmetic see them."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this interpreter cannot resolve: leave the checking to the class
        return
    for name, value in kwargs.items():
        if name in hints and not _json_type_ok(value, hints[name]):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            hint = hints[name].__name__ if isinstance(hints[name], type) else str(hints[name]).replace("typing.", "")
            raise ConfigError(f"{source}: field {name!r} must be of type {hint}, got {shown} ({type(value).__name__})")


@dataclass
class PeftConfig:
    """Fields every method shares.

    Attributes:
        peft_type: Which method; set by each subclass, never by the user.
        task_type: What the base model does; selects the task wrapper. ``None`` gives the generic ``PeftModel``.
        inference_mode: Load frozen (no trainable adapter parameters). Saved files carry ``True``.
        base_model_name_or_path: Where the base model came from; ``AutoPeftModel`` loads it from here.
        revision: Hub revision of the base model.
        auto_mapping: For custom (non-transformers) models: the base class and parent library, as peft records it.
        modules_to_save: Names (exact or dotted suffix) of modules trained in full and saved with the adapter,
            e.g. a classification head.
    """

    peft_type: PeftType | None = None
    task_type: TaskType | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict | None = None
    modules_to_save: list[str] | None = None

    # peft fields this class does not implement, with the value that means "off" (see module docstring).
    _unsupported: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                raise ConfigError(
                    f"unknown task_type {self.task_type!r}; use one of {[t.value for t in TaskType]}"
                ) from None
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    @property
    def is_prompt_learning(self) -> bool:
        """Whether this method feeds the model inputs (virtual tokens / prefixes) instead of wrapping layers."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with peft's field names; sets become sorted lists, enums their values and sub-configs
        dicts."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, set):
                value = sorted(value)
            elif dataclasses.is_dataclass(value):  # a sub-config (LoRA's kasa_config, ...): peft writes asdict()
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` atomically into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> PeftConfig:
        """Build the config class named by ``data["peft_type"]`` (or ``cls`` itself when it is concrete).

        Raises:
            ConfigError: unknown ``peft_type``, a peft feature switched on that deltatune does not implement, or
                values the config's own checks reject. ``source`` (e.g. the file path) is named in the message.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        peft_type = data.get("peft_type")
        if peft_type is None and cls.peft_type_default() is None:
            raise ConfigError(f"{source}: has no 'peft_type'; it is not an adapter config")
        target_cls = config_class(peft_type, source=source) if peft_type is not None else cls
        return target_cls._from_known_type(data, source)

    @classmethod
    def peft_type_default(cls) -> PeftType | None:
        for f in dataclasses.fields(cls):
            if f.name == "peft_type":
                return f.default
        return None

    @classmethod
    def _from_known_type(cls, data: dict[str, Any], source: str) -> PeftConfig:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key == "peft_type" or key in _METADATA_FIELDS:
                continue
            if key in names:
                kwargs[key] = value
            elif key in cls._unsupported:
                if not _is_off(value) and value != cls._unsupported[key]:
                    raise ConfigError(
                        f"{source}: sets {key}={value!r}, a {cls.__name__} feature deltatune does not implement; "
                        f"loading it would compute something else. Remove the field or load it with a library "
                        f"that supports it."
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring fields unknown to {cls.__name__}: {sorted(unknown)}", stacklevel=3)
        _check_json_types(cls, kwargs, source)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: invalid {cls.__name__}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> PeftConfig:
        """Read ``adapter_config.json`` from a local directory or a hub repo (``revision``, ``subfolder``, ...)."""
        return read_config(pretrained_model_name_or_path, **hub_kwargs)


@dataclass
class LayerConfig(PeftConfig):
    """Fields every layer method (LoRA, IA3, ...) shares: which modules to adapt.

    Attributes:
        target_modules: Module names to adapt: a list of exact names or dotted suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), a string regex matched against the full name, or ``"all-linear"``
            (every linear layer except the output head). ``None`` uses the default for the model type.
        exclude_modules: Same forms as ``target_modules``; matches are never adapted.
        layers_to_transform: Only adapt modules in these layer indices (an int or a list).
        layers_pattern: Name of the layer list (``"layers"``, ``"h"``, ...) used to read the layer index; needed
            only when the model's layer list has an unusual name.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    # Targeting fields the method's peft config lacks: refused when set and left out of adapter_config.json, so that
    # peft reads a saved adapter exactly as deltatune does.
    _not_in_peft: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self._not_in_peft:
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"{type(self).__name__} has no {name} (peft's {type(self).__name__} lacks the field, so peft would "
                    f"read the adapter differently); select the modules with target_modules instead: a list of "
                    f"names, or a regex such as r'.*layers\\.(0|1)\\..*q_proj'"
                )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern is not None and not self.layers_to_transform:
            raise ConfigError("layers_pattern only has an effect together with layers_to_transform")
        for name in ("target_modules", "exclude_modules"):
            pattern = getattr(self, name)
            if isinstance(pattern, str) and pattern != "all-linear":
                validate_regex(name, pattern)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in self._not_in_peft:
            del out[name]
        return out


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt method (prompt tuning, P-tuning, prefix tuning) shares. Dimensions left ``None`` are read
    from the base model's config when the adapter is added (and then saved, so a file always carries them).

    Attributes:
        num_virtual_tokens: Number of virtual tokens ``T`` (for prefix tuning: prefix length per layer).
        token_dim: Width of one virtual token: the model's hidden size. For prefix tuning, the key (or value) width
            of one layer, ``head_dim × num_key_value_heads`` (smaller than the hidden size with grouped-query
            attention).
        num_transformer_submodules: ``2`` for encoder-decoder models (task ``SEQ_2_SEQ_LM``), else ``1``. Prompt
            tuning and P-tuning keep ``T × num_transformer_submodules`` rows and feed the first ``T`` to the encoder.
        num_attention_heads: Attention heads; for prefix tuning the number of key/value heads.
        num_layers: Transformer layers (prefix tuning: the layers that receive a prefix).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def read_config_file(model_id: str | os.PathLike, **hub_kwargs: Any) -> tuple[PeftConfig, str]:
    """Like :func:`read_config`, also returning the local path of the file that was read."""
    path = resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(model_id), hub_kwargs.get("subfolder") or "")
        raise ConfigError(f"no {CONFIG_NAME} in {where!r}; is this an adapter directory?")
    return PeftConfig.from_dict(read_json_file(path), source=path), path


def read_config(model_id: str | os.PathLike, **hub_kwargs: Any) -> PeftConfig:
    """Read and validate ``adapter_config.json`` from a local directory or a hub repo.

    Raises:
        ConfigError: the file is missing, not JSON, or not a valid config (the message names the file).
    """
    return read_config_file(model_id, **hub_kwargs)[0]


def validate_regex(field_name: str, pattern: str) -> None:
    """Refuse an invalid regular expression when the config is built, not when the model is walked."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{field_name}: {pattern!r} is not a valid regular expression ({exc})") from None

"""``AutoPeftModel*``: load the base model an adapter names, then the adapter, in one call (peft's API).

``AutoPeftModelForCausalLM.from_pretrained("org/adapter")`` reads ``adapter_config.json`` (local directory or hub repo,
at ``revision`` / ``subfolder``), loads ``base_model_name_or_path`` at the config's own ``revision`` with the
transformers Auto class that fits the adapter's ``task_type``, and attaches the adapter with
:meth:`deltatune.PeftModel.from_pretrained`. The adapter's ``revision`` and the base model's ``revision`` are
independent: the first is the argument, the second is pinned in the adapter's config.

Custom modelling code (``trust_remote_code``) is never enabled on the caller's behalf. Before transformers is asked for
anything, :func:`check_remote_code` reads the base model's ``config.json`` as data and, when loading it would import
Python files shipped with the model, raises :class:`~deltatune.errors.RemoteCodeError` naming those files and where
they come from, unless the caller passed ``trust_remote_code=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .config import PeftConfig, TaskType, read_config_file
from .errors import AdapterLoadError, ConfigError, RemoteCodeError
from .files import read_json_file, resolve_file, validate_adapter_name
from .model import TASK_WRAPPERS, PeftModel

# task_type -> the transformers Auto class that loads a base model for it (peft's choice for each task).
AUTO_CLASS_FOR_TASK: dict[TaskType, str] = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}

# Keyword arguments that address the adapter only; everything else not listed in ``_SHARED`` goes to the base model.
_ADAPTER_ONLY = ("subfolder", "safetensors_only", "strict_base")
# Hub access settings both loads use.
_SHARED = ("token", "cache_dir", "local_files_only")


# --- trust_remote_code -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteCode:
    """What loading a model would execute: ``entries`` maps Auto class names to ``module.Class`` references, each
    with the place its file comes from (``source``: a local directory or ``hub repo <id>``)."""

    model_id: str
    revision: str | None
    entries: tuple[tuple[str, str, str], ...]  # (auto class, "module.Class", source)

    @property
    def files(self) -> list[str]:
        """The Python files named in ``auto_map`` (each may import further files from the same place)."""
        return sorted({f"{ref.rsplit('.', 1)[0]}.py" for _, ref, _ in self.entries})

    def describe(self) -> str:
        lines = []
        for auto_class, ref, source in self.entries:
            module = ref.rsplit(".", 1)[0]
            lines.append(f"  {auto_class} -> {ref} (file {module}.py from {source})")
        return "\n".join(lines)


def _source_of(model_id: str, revision: str | None, ref: str) -> tuple[str, str]:
    """Split an ``auto_map`` value into (``module.Class``, where its code comes from). ``"org/repo--mod.Cls"`` takes
    the code from another hub repo."""
    if "--" in ref:
        repo, ref = ref.split("--", 1)
        return ref, f"hub repo {repo!r} (a different repository than the model's)"
    if os.path.isdir(model_id):
        return ref, f"local directory {os.path.abspath(model_id)!r}"
    return ref, f"hub repo {model_id!r} at revision {revision or 'main'!r}"


def _local_model_types(auto_class_name: str) -> set[str] | None:
    """The ``model_type`` values transformers itself implements for ``auto_class_name`` (``None`` if unknown)."""
    try:
        import transformers

        return set(getattr(transformers, auto_class_name)._model_mapping._model_mapping)
    except Exception:  # private API moved: be conservative and treat every auto_map entry as custom code
        return None


def check_remote_code(
    model_id: str | os.PathLike,
    auto_class_name: str,
    trust_remote_code: bool = False,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> RemoteCode | None:
    """Decide, from ``config.json`` read as plain JSON, whether loading ``model_id`` with ``auto_class_name`` would run
    code shipped with the model. Nothing is imported or executed.

    Returns:
        ``None`` when transformers' own code loads the model; the :class:`RemoteCode` that would run when
        ``trust_remote_code`` is true.

    Raises:
        RemoteCodeError: custom code is needed and ``trust_remote_code`` is not ``True``; the message names the
            files, where they come from, the risk, and how to opt in.
        ConfigError: no readable ``config.json``, or a ``model_type`` transformers does not know and no ``auto_map``.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_id = os.fspath(model_id)
    hub = dict(revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
               local_files_only=local_files_only)
    where = f"{model_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        path = resolve_file(model_id, "config.json", **hub)
    except AdapterLoadError as exc:
        raise ConfigError(f"cannot read the base model's config.json: {exc}") from exc
    if path is None:
        raise ConfigError(
            f"base model {where} has no config.json, so it is not a transformers model; load it yourself and attach "
            f"the adapter with PeftModel.from_pretrained(model, adapter)"
        )
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    auto_map = data.get("auto_map") if isinstance(data.get("auto_map"), dict) else {}
    model_type = data.get("model_type")
    known_config = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    local_types = _local_model_types(auto_class_name)
    known_model = known_config and local_types is not None and model_type in local_types

    if not known_config and "AutoConfig" not in auto_map:
        raise ConfigError(
            f"{path}: model_type {model_type!r} is not implemented by this transformers version and config.json has "
            f"no auto_map; upgrade transformers or load the base model yourself"
        )
    if local_types is not None and not known_model and auto_class_name not in auto_map:
        offered = sorted(k for k in auto_map if k != "AutoConfig")
        raise ConfigError(
            f"{path}: model_type {model_type!r} cannot be loaded with transformers' {auto_class_name} (its own code "
            f"offers {offered or 'nothing'}); the adapter's task_type does not fit its base model"
        )
    # What transformers would import from the model's files: with trust_remote_code=True every auto_map entry in use
    # (it prefers them over its own classes); without it only entries it has no class of its own for, which fail.
    local = {"AutoConfig": known_config, auto_class_name: known_model}
    in_use = [name for name in ("AutoConfig", auto_class_name) if name in auto_map]
    required = [name for name in in_use if not local[name]]
    if not in_use or (trust_remote_code is not True and not required):
        return None
    entries = []
    for name in in_use:
        ref = auto_map[name]
        ref = ref[0] if isinstance(ref, (list, tuple)) and ref else ref
        if not isinstance(ref, str) or "." not in ref:
            raise ConfigError(f"{path}: auto_map[{name!r}] is not a 'module.Class' string: {ref!r}")
        entries.append((name, *_source_of(model_id, revision, ref)))
    code = RemoteCode(model_id, revision, tuple(entries))
    if trust_remote_code is True:
        return code
    pin = "" if revision and len(revision) == 40 else " and pin revision= to the commit you reviewed"
    raise RemoteCodeError(
        f"base model {where} needs custom code to load as {auto_class_name}: its config.json ({path}) maps\n"
        f"{code.describe()}\n"
        f"Loading it imports and runs those Python files ({', '.join(code.files)}, and whatever they import) on this "
        f"machine, with your user's permissions: arbitrary code, not data. deltatune never enables that for you. "
        f"Review the files at the places above, then pass trust_remote_code=True{pin}."
    )


# --- Auto classes ------------------------------------------------------------------------------------------------

class _BaseAutoPeftModel:
    """Shared ``from_pretrained``; subclasses fix the task (``_task_type``), which also picks the wrapper class."""

    _task_type: ClassVar[TaskType | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter.

        Args:
            pretrained_model_name_or_path: Adapter directory or hub repo id.
            adapter_name: Name of the loaded adapter.
            is_trainable: Load the adapter trainable (default: frozen, inference mode).
            config: Use this config instead of reading ``adapter_config.json`` (weights are still read).
            revision: Hub revision of the adapter. The base model's revision is the config's ``revision`` field.
            trust_remote_code: Allow the base model's own Python code to run (see :func:`check_remote_code`).
            **kwargs: ``subfolder``, ``safetensors_only`` and ``strict_base`` apply to the adapter; ``token``, ``cache_dir`` and
                ``local_files_only`` both loads; everything else (``dtype``/``torch_dtype``, ``device_map``,
                ``attn_implementation``, ...) goes to the base model's ``from_pretrained``.

        Raises:
            ConfigError: the adapter's task does not fit this class, or its config names no base model.
            RemoteCodeError: the base model needs custom code and ``trust_remote_code`` is not ``True``.
            AdapterLoadError: the adapter's weights are missing, corrupt or do not fit the base model.
        """
        import transformers

        validate_adapter_name(adapter_name)
        adapter_id = os.fspath(pretrained_model_name_or_path)
        shared = {k: kwargs.pop(k) for k in _SHARED if k in kwargs}
        adapter_only = {k: kwargs.pop(k) for k in _ADAPTER_ONLY if k in kwargs}
        if config is None:
            hub = {**shared, "revision": revision, "subfolder": adapter_only.get("subfolder")}
            peft_config, source = read_config_file(adapter_id, **hub)
        else:
            peft_config, source = config, "config passed to from_pretrained"

        task = peft_config.task_type
        if cls._task_type is not None and task is not None and task != cls._task_type:
            right = next((c.__name__ for c in _AUTO_CLASSES if c._task_type == task), "AutoPeftModel")
            raise ConfigError(
                f"{source}: the adapter's task_type is {task.value}, but {cls.__name__} loads "
                f"{cls._task_type.value} adapters; use {right}.from_pretrained(...) instead"
            )
        task = task or cls._task_type
        base_id = peft_config.base_model_name_or_path
        if not base_id:
            raise ConfigError(
                f"{source}: base_model_name_or_path is not set, so the base model is unknown; load it yourself and "
                f"call PeftModel.from_pretrained(model, {adapter_id!r})"
            )
        base_cls, auto_class_name = _base_class(task, peft_config, source, transformers)
        if auto_class_name is not None:
            try:
                check_remote_code(
                    base_id, auto_class_name, trust_remote_code, revision=peft_config.revision,
                    token=shared.get("token"), cache_dir=shared.get("cache_dir"),
                    local_files_only=bool(shared.get("local_files_only", False)),
                )
            except RemoteCodeError:
                raise
            except ConfigError as exc:
                raise ConfigError(f"{source} names base model {base_id!r}: {exc}") from exc
        # trust_remote_code is always passed explicitly, so transformers never prompts or decides on its own.
        base = base_cls.from_pretrained(
            base_id, revision=peft_config.revision, trust_remote_code=trust_remote_code is True, **shared, **kwargs
        )
        _fit_embeddings_to_adapter_tokenizer(
            base, adapter_id, revision=revision, subfolder=adapter_only.get("subfolder"),
            trust_remote_code=trust_remote_code is True, **shared,
        )
        peft_cls = TASK_WRAPPERS.get(task, PeftModel)
        return peft_cls.from_pretrained(
            base, adapter_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, revision=revision,
            **shared, **adapter_only,
        )


def _fit_embeddings_to_adapter_tokenizer(
    base: nn.Module, adapter_id: str, *, revision: str | None, subfolder: str | None, trust_remote_code: bool,
    **hub: Any,
) -> None:
    """An adapter trained with added tokens is saved with its tokenizer (and the resized embedding rows): give the
    base model as many embedding rows as that tokenizer has tokens, so the adapter's weights fit (peft does the same).
    Without a tokenizer next to the adapter, or when the sizes already agree, nothing changes."""
    if resolve_file(adapter_id, "tokenizer_config.json", subfolder=subfolder, revision=revision, **hub) is None:
        return
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        adapter_id, revision=revision, subfolder=subfolder or "", trust_remote_code=trust_remote_code, **hub
    )
    if len(tokenizer) != embeddings.weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


def _base_class(task: TaskType | None, config: PeftConfig, source: str, transformers: Any) -> tuple[Any, str | None]:
    """The transformers class that loads the base model, and the Auto class name to check for custom code (``None``
    for a concrete transformers class, which never runs custom code)."""
    if task is not None:
        name = AUTO_CLASS_FOR_TASK[task]
        return getattr(transformers, name), name
    mapping = config.auto_mapping or {}
    library, class_name = mapping.get("parent_library"), mapping.get("base_model_class")
    if isinstance(library, str) and isinstance(class_name, str) and (
        library == "transformers" or library.startswith("transformers.")
    ) and not library.startswith("transformers_modules"):
        found = getattr(transformers, class_name, None)
        if isinstance(found, type) and issubclass(found, nn.Module) and hasattr(found, "from_pretrained"):
            return found, None
    raise ConfigError(
        f"{source}: task_type is not set and auto_mapping {mapping or None!r} names no transformers class, so the "
        f"base model's class is unknown (deltatune imports nothing a config names outside transformers); use the "
        f"AutoPeftModelFor<Task> class for the adapter's task, or load the base model yourself and call "
        f"PeftModel.from_pretrained(model, adapter)"
    )


class AutoPeftModel(_BaseAutoPeftModel):
    """Any task: the base model's Auto class and the wrapper follow the adapter's ``task_type``."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _task_type = TaskType.CAUSAL_LM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _task_type = TaskType.SEQ_2_SEQ_LM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _task_type = TaskType.SEQ_CLS


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _task_type = TaskType.TOKEN_CLS


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _task_type = TaskType.QUESTION_ANS


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _task_type = TaskType.FEATURE_EXTRACTION


_AUTO_CLASSES = (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForFeatureExtraction,
)

__all__ = [
    "AUTO_CLASS_FOR_TASK",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "RemoteCode",
    "check_remote_code",
]

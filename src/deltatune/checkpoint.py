"""Adapter files: peft's on-disk format, key mapping as pure functions, safe reading, atomic writing.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (the default adapter
at the top, any other adapter in a sub-folder named after it). Saved keys are the module paths under the wrapper with
the adapter name removed: in memory ``base_model.model.<path>.deltas.<adapter>.lora_A.weight`` is saved as
``base_model.model.<path>.lora_A.weight``, and a ``modules_to_save`` copy
``base_model.model.<path>.modules_to_save.<adapter>.weight`` is saved as ``base_model.model.<path>.weight`` —
exactly the keys peft writes.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .config import CONFIG_NAME, PeftConfig
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .layers import AdapterLayer, ModulesToSaveWrapper

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# A safetensors header (JSON describing tensors) larger than this is not an adapter; refuse before reading it.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_CONTAINERS = {AdapterLayer: "deltas", ModulesToSaveWrapper: "modules_to_save"}
_WRAPPED = {AdapterLayer: "base_layer", ModulesToSaveWrapper: "original_module"}


# --- names and atomic writes -------------------------------------------------------------------------------------

def validate_adapter_name(name: object) -> str:
    """An adapter name is used as a module key and as a sub-folder name: it must be a plain, non-empty word.

    Raises:
        AdapterStateError: the name is empty, contains ``.``, a path separator or NUL, or is not a string.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "./\\\0"):
        raise AdapterStateError(
            f"invalid adapter name {name!r}: use a non-empty name without '.', '/', '\\\\' or NUL "
            f"(it becomes a module key and a sub-folder of the save directory)"
        )
    if os.path.isabs(name) or name == "__base__":
        raise AdapterStateError(f"invalid adapter name {name!r}: it is reserved or an absolute path")
    return name


def atomic_write_files(files: Mapping[str, bytes]) -> None:
    """Write several files so that each is either fully the old or fully the new content.

    Every file is written to a temporary sibling and fsync'ed first; only when all are on disk are they renamed
    into place, so a failure while serialising or writing leaves all previous files intact.
    """
    temps: list[tuple[str, str]] = []
    try:
        for path, data in files.items():
            directory = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
        for directory in {os.path.dirname(os.path.abspath(p)) for p in files}:
            _fsync_dir(directory)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write_files({path: data})


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- state dicts: pure functions over module trees and dicts --------------------------------------------------------

def _holders(root: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in root.named_modules() if isinstance(m, tuple(_CONTAINERS))}


def layer_adapter_state_dict(
    root: nn.Module, adapter_name: str, bias: str = "none", save_embedding_layers: bool = False
) -> dict[str, torch.Tensor]:
    """The saved-format state dict of layer adapter ``adapter_name`` in ``root`` (keys relative to ``root``).

    Which tensors belong to the adapter comes from the wrappers themselves: the adapter's delta in each
    ``AdapterLayer``, its copy in each ``ModulesToSaveWrapper``, plus the biases ``bias`` selects and, with
    ``save_embedding_layers``, the base weights of adapted embedding layers (needed when the vocabulary was resized).
    """
    out: dict[str, torch.Tensor] = {}
    for path, holder in _holders(root).items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name not in container:
            continue
        for key, value in container[adapter_name].state_dict().items():
            out[f"{path}.{key}"] = value
        if isinstance(holder, AdapterLayer):
            base = holder.base_layer
            if bias == "lora_only" and getattr(base, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = base.bias
            if save_embedding_layers and isinstance(base, nn.Embedding):
                out[f"{path}.base_layer.weight"] = base.weight
    if bias == "all":
        for name, param in root.named_parameters():
            if name.endswith("bias") and name not in out and f".{_CONTAINERS[AdapterLayer]}." not in name:
                out[name] = param
    return {k: v.detach() for k, v in out.items()}


def to_model_keys(saved_keys: Iterable[str], holders: Mapping[str, nn.Module], adapter_name: str) -> dict[str, str]:
    """Map saved keys to in-memory parameter names: insert ``<container>.<adapter>`` after the wrapper's path.

    Keys that address the wrapped module itself (``...base_layer.bias``, ``...original_module.weight``) or lie outside
    any wrapper are returned unchanged.
    """
    mapping = {}
    for key in saved_keys:
        parts = key.split(".")
        target = key
        for cut in range(len(parts) - 1, 0, -1):
            holder = holders.get(".".join(parts[:cut]))
            if holder is None:
                continue
            rest = parts[cut:]
            if rest[0] not in (_WRAPPED[type(holder)], _CONTAINERS[type(holder)]):
                target = ".".join([*parts[:cut], _CONTAINERS[type(holder)], adapter_name, *rest])
            break
        mapping[key] = target
    return mapping


def load_layer_adapter_state_dict(
    root: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, source: str = "adapter"
) -> None:
    """Copy a saved-format state dict into adapter ``adapter_name`` of ``root``, all or nothing.

    Every key is mapped and checked (exists, same shape) and every parameter of the adapter must be present before
    the first value is copied, so on error the model is exactly as before.

    Raises:
        AdapterLoadError: unknown keys, missing adapter parameters, or shape mismatches; the message names the first
            offending key (with both shapes) and what to do.
    """
    holders = _holders(root)
    mapping = to_model_keys(state_dict, holders, adapter_name)
    params = dict(root.named_parameters())
    params.update(root.named_buffers())
    unknown = [k for k, target in mapping.items() if target not in params]
    if unknown:
        raise AdapterLoadError(
            f"{source}: {len(unknown)} saved tensor(s) do not fit this model, first {unknown[0]!r}. The adapter was "
            f"probably saved for a different base model or with different target_modules."
        )
    for key, target in mapping.items():
        saved, current = tuple(state_dict[key].shape), tuple(params[target].shape)
        if saved != current:
            raise AdapterLoadError(_shape_message(source, key, saved, current, params[target]))
    expected = set()
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name in container:
            prefix = f"{path}.{_CONTAINERS[type(holder)]}.{adapter_name}."
            expected.update(prefix + n for n, _ in container[adapter_name].named_parameters())
    missing = sorted(expected - set(mapping.values()))
    if missing:
        raise AdapterLoadError(
            f"{source}: the file lacks {len(missing)} tensor(s) the adapter needs, first {missing[0]!r}; "
            f"the file is incomplete or was saved with a different config"
        )
    with torch.no_grad():
        for key, target in mapping.items():
            params[target].copy_(state_dict[key].to(dtype=params[target].dtype, device=params[target].device))


def _shape_message(source: str, key: str, saved: tuple, current: tuple, tensor: torch.Tensor) -> str:
    msg = f"{source}: shape mismatch for {key!r}: saved {list(saved)}, model has {list(current)}."
    vocab_like = key.endswith(("embed_tokens.base_layer.weight", "lora_embedding_A")) or (
        len(saved) == 2 and len(current) == 2 and saved[1] == current[1] and saved[0] != current[0]
        and ("embed" in key or "lm_head" in key or "wte" in key or "shared" in key)
    )
    if vocab_like:
        msg += (
            " The base model's vocabulary size differs from the one the adapter was trained with; call "
            "model.resize_token_embeddings(<saved vocabulary size>) on the base model before loading."
        )
    else:
        msg += " The adapter was saved with another rank or for another base model; load it onto the model it was trained on."
    return msg


# --- reading files --------------------------------------------------------------------------------------------------

def resolve_file(
    model_id: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> str | None:
    """Local path of ``filename`` in a local directory or a hub repo (via huggingface_hub and its cache), or ``None``
    when the location exists but lacks the file.

    Raises:
        AdapterLoadError: the location is neither a local directory nor a reachable hub repo/revision.
    """
    model_id = os.fspath(model_id)
    if os.path.isdir(model_id):
        path = os.path.join(model_id, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        return hf_hub_download(
            repo_id=model_id, filename=filename, subfolder=subfolder or None, revision=revision, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only,
        )
    except EntryNotFoundError:
        return None
    except HFValidationError:
        raise AdapterLoadError(f"{model_id!r} is neither an existing directory nor a valid hub repo id") from None
    except Exception as exc:  # offline, unknown repo or revision, network errors: one message, the cause chained
        raise AdapterLoadError(
            f"could not find {filename} for {model_id!r} (revision={revision!r}, subfolder={subfolder!r}): "
            f"{type(exc).__name__}: {exc}. Pass a local directory, or check the repo id, revision and network "
            f"(HF_HUB_OFFLINE / local_files_only read only the local cache)."
        ) from exc


def read_config(model_id: str | os.PathLike, **hub_kwargs) -> PeftConfig:
    """Read and validate ``adapter_config.json``.

    Raises:
        ConfigError: the file is missing, not JSON, or not a valid config (the message names the file).
    """
    path = resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(model_id), hub_kwargs.get("subfolder") or "")
        raise ConfigError(f"no {CONFIG_NAME} in {where!r}; is this an adapter directory?")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON adapter config ({exc})") from exc
    return PeftConfig.from_dict(data, source=path)


def check_safetensors_header(path: str) -> None:
    """Refuse a safetensors file whose header is truncated or claims more bytes than the file has, before any
    allocation based on it."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise AdapterLoadError(f"{path}: truncated safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise AdapterLoadError(
            f"{path}: corrupt safetensors header (claims {header_len} bytes, file has {size}); re-save the adapter"
        )


def read_weights(
    model_id: str | os.PathLike, *, safetensors_only: bool = False, **hub_kwargs
) -> tuple[dict[str, torch.Tensor], str]:
    """Read adapter weights (safetensors preferred; a pickled ``.bin`` only with ``weights_only=True``).

    Returns:
        The tensors and the path they came from.

    Raises:
        AdapterLoadError: no weights file, a ``.bin`` when ``safetensors_only``, or a corrupt file (named).
    """
    path = resolve_file(model_id, SAFETENSORS_NAME, **hub_kwargs)
    if path is not None:
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            tensors = load_file(path, device="cpu")
        except Exception as exc:
            raise AdapterLoadError(f"{path}: corrupt safetensors file ({type(exc).__name__}: {exc})") from exc
        return tensors, path
    path = resolve_file(model_id, PICKLE_NAME, **hub_kwargs)
    if path is None:
        raise AdapterLoadError(f"no {SAFETENSORS_NAME} or {PICKLE_NAME} for {os.fspath(model_id)!r}")
    if safetensors_only:
        raise AdapterLoadError(
            f"{path}: only a pickled {PICKLE_NAME} is available and safetensors_only=True; convert it to safetensors"
        )
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(
            f"{path}: cannot be read as a weights-only pickle ({type(exc).__name__}: {exc}); deltatune never "
            f"unpickles arbitrary objects. Re-save the adapter as safetensors."
        ) from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterLoadError(f"{path}: expected a dict of tensors")
    return tensors, path


# --- writing --------------------------------------------------------------------------------------------------------

def save_adapter(
    directory: str | os.PathLike, config: PeftConfig, tensors: Mapping[str, torch.Tensor], safe_serialization: bool = True
) -> None:
    """Write one adapter (config + weights) into ``directory`` atomically (see :func:`atomic_write_files`)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        from safetensors.torch import save

        weights_name, payload = SAFETENSORS_NAME, save(owned, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(owned, buffer)
        weights_name, payload = PICKLE_NAME, buffer.getvalue()
    atomic_write_files({
        os.path.join(directory, weights_name): payload,
        os.path.join(directory, CONFIG_NAME): config.to_json_string().encode(),
    })

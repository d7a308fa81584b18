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
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .config import CONFIG_NAME, PeftConfig
from .errors import AdapterLoadError, AdapterStateError, ConfigError, DeltatuneError
from .layers import AdapterLayer, ModulesToSaveWrapper

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# A safetensors header (JSON describing tensors) larger than this is not an adapter; refuse before reading it.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# An adapter_config.json larger than this is not a config; refuse before reading it.
_MAX_CONFIG_BYTES = 16 * 1024 * 1024

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


def adapter_directory(save_directory: str | os.PathLike, adapter_name: str) -> str:
    """Where adapter ``adapter_name`` is saved under ``save_directory``: the directory itself for ``"default"``, else
    the sub-folder named after the adapter, which must stay inside ``save_directory`` (symlinks resolved).

    Raises:
        AdapterStateError: the name is invalid (see :func:`validate_adapter_name`) or the sub-folder would resolve to a
            place outside ``save_directory``.
    """
    save_directory = os.fspath(save_directory)
    if adapter_name == "default":
        return save_directory
    path = os.path.join(save_directory, validate_adapter_name(adapter_name))
    root = os.path.realpath(save_directory)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise AdapterStateError(
            f"adapter {adapter_name!r} would be saved to {os.path.realpath(path)!r}, outside {save_directory!r} "
            f"(a symlink?); remove the link or choose another adapter name"
        )
    return path


# Where a PeftModel's layer adapters sit in its state dict and in adapter files: under the wrapper's ``base_model``
# holder, whose ``model`` is the adapted model (peft's layout).
LAYER_KEY_PREFIX = "base_model.model."


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
    holders = _holders(root)
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name not in container:
            continue
        item = container[adapter_name]
        for key, value in (item.saved_state_dict() if isinstance(holder, AdapterLayer) else item.state_dict()).items():
            out[f"{path}.{key}"] = value
        if isinstance(holder, AdapterLayer):
            base = holder.base_layer
            if bias.endswith("_only") and getattr(base, "bias", None) is not None:  # lora_only, oft_only, ...
                out[f"{path}.base_layer.bias"] = base.bias
            if save_embedding_layers and isinstance(base, nn.Embedding):
                out[f"{path}.base_layer.weight"] = base.weight
    if bias == "all":
        # Biases inside containers belong to an adapter: this one's were saved above under adapter-free keys, and
        # another adapter's must not leak into this file under keys that name it.
        owned = {id(p) for h in holders.values() for p in getattr(h, _CONTAINERS[type(h)]).parameters()}
        for name, param in root.named_parameters():
            if name.endswith("bias") and name not in out and id(param) not in owned:
                out[name] = param
    return {k: v.detach() for k, v in out.items()}


def to_model_keys(saved_keys: Iterable[str], holders: Mapping[str, nn.Module], adapter_name: str) -> dict[str, str]:
    """Map saved keys to in-memory parameter names: insert ``<container>.<adapter>`` after the wrapper's path, or only
    ``<adapter>`` when the key already names the container (peft writes ``classifier.modules_to_save.bias`` for a
    ``modules_to_save`` bias under ``bias="all"``).

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
            rest, container = parts[cut:], _CONTAINERS[type(holder)]
            if rest[0] == container:  # peft's bias="all" keys keep the container and drop only the adapter name
                target = ".".join([*parts[:cut], container, adapter_name, *rest[1:]])
            elif rest[0] != _WRAPPED[type(holder)]:
                target = ".".join([*parts[:cut], container, adapter_name, *rest])
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
    # Outside the adapter's own tensors, a file may only carry what peft writes there: biases (``bias="all"`` /
    # ``"lora_only"``) and the base weights of adapted layers (resized embeddings). Anything else would silently
    # overwrite the base model.
    own = tuple(f".{container}.{adapter_name}." for container in _CONTAINERS.values())
    foreign = [
        k for k, t in mapping.items()
        if not any(marker in t for marker in own) and not t.endswith(("bias", ".base_layer.weight"))
    ]
    if foreign:
        raise AdapterLoadError(
            f"{source}: tensor {foreign[0]!r} would overwrite a base-model weight, which an adapter file must not do "
            f"({len(foreign)} such tensor(s)); the file is not a plain adapter. Load the full model instead."
        )
    for key, target in mapping.items():
        saved, current = tuple(state_dict[key].shape), tuple(params[target].shape)
        if saved != current:
            raise AdapterLoadError(_shape_message(source, key, saved, current, params[target]))
        if params[target].is_floating_point() and not state_dict[key].is_floating_point():
            raise AdapterLoadError(
                f"{source}: tensor {key!r} has dtype {state_dict[key].dtype} but the model's parameter is "
                f"{params[target].dtype}; a floating-point tensor is required. The file is corrupt or was not written "
                f"by an adapter library."
            )
    expected = set()
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name in container:
            prefix = f"{path}.{_CONTAINERS[type(holder)]}.{adapter_name}."
            constants = getattr(container[adapter_name], "constants", ())  # never saved (Delta.constants)
            expected.update(prefix + n for n, _ in container[adapter_name].named_parameters() if n not in constants)
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


def shared_state_plan(
    holder: nn.Module, saved: Mapping[str, torch.Tensor], source: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check an adapter's saved shared tensors (keys ``<name>`` of ``base_model.<name>``) against its shared-state
    module (see ``LayerMethod.make_shared``) and return ``(destination, value)`` pairs to copy once the rest of the
    file has loaded, so that a failed load changes nothing.

    A saved tensor that the module regenerates instead of saving (a non-persistent buffer, e.g. VeRA's projections
    under ``save_projection=False``) is ignored with a warning, as peft does.

    Raises:
        AdapterLoadError: a persistent tensor is missing, or a saved one is unknown or of another shape.
    """
    expected = holder.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise AdapterLoadError(
            f"{source}: the file lacks 'base_model.{missing[0]}', which the adapter's config says is saved with it; "
            f"the file is incomplete or was saved with a different config"
        )
    regenerated = {name for name, _ in holder.named_buffers()} - set(expected)
    plan = []
    for key, value in saved.items():
        if key in regenerated:
            warnings.warn(f"{source}: ignoring 'base_model.{key}': the adapter's config regenerates it", stacklevel=3)
            continue
        if key not in expected:
            raise AdapterLoadError(f"{source}: unexpected tensor 'base_model.{key}'; not a tensor of this adapter")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterLoadError(_shape_message(source, f"base_model.{key}", tuple(value.shape),
                                                  tuple(expected[key].shape), expected[key]))
        plan.append((expected[key], value))
    return plan


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
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return hf_hub_download(
            repo_id=model_id, filename=filename, subfolder=subfolder or None, revision=revision, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only,
        )
    except LocalEntryNotFoundError as exc:
        # Offline (or local_files_only): the cache has this revision but not the file -> the file is absent, as far
        # as we can know; the revision itself is not cached -> say so instead of "no such file".
        if cached_snapshot(model_id, revision, cache_dir) is not None:
            return None
        raise AdapterLoadError(
            f"{model_id!r} (revision={revision!r}) is not in the local Hugging Face cache and downloads are disabled "
            f"(HF_HUB_OFFLINE=1 or local_files_only=True); download it once online or pass a local directory"
        ) from exc
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


def cached_snapshot(
    repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> str | None:
    """The snapshot folder of ``repo_id`` at ``revision`` (branch, tag or commit) in the local Hugging Face cache, or
    ``None`` when that revision is not cached. Reads the cache layout only; never touches the network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    revision = revision or "main"
    commit = revision
    if not REGEX_COMMIT_HASH.fullmatch(revision):
        try:
            with open(os.path.join(storage, "refs", revision), encoding="utf-8") as fh:
                commit = fh.read().strip()
        except (OSError, ValueError):
            return None
    snapshot = os.path.join(storage, "snapshots", commit)
    return snapshot if commit and os.path.isdir(snapshot) else None


def read_json_file(path: str, *, max_bytes: int = _MAX_CONFIG_BYTES, error: type[Exception] = ConfigError) -> object:
    """Parse a small JSON file, refusing oversized, non-UTF-8, malformed or absurdly nested content with ``error``
    (whose message names the file)."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is too large for a JSON config (limit {max_bytes})")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        if isinstance(exc, DeltatuneError):
            raise
        raise error(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from exc


def read_config_file(model_id: str | os.PathLike, **hub_kwargs) -> tuple[PeftConfig, str]:
    """Like :func:`read_config`, also returning the local path of the file that was read."""
    path = resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(model_id), hub_kwargs.get("subfolder") or "")
        raise ConfigError(f"no {CONFIG_NAME} in {where!r}; is this an adapter directory?")
    return PeftConfig.from_dict(read_json_file(path), source=path), path


def read_config(model_id: str | os.PathLike, **hub_kwargs) -> PeftConfig:
    """Read and validate ``adapter_config.json``.

    Raises:
        ConfigError: the file is missing, not JSON, or not a valid config (the message names the file).
    """
    return read_config_file(model_id, **hub_kwargs)[0]


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


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The header of a safetensors file: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus
    ``"__metadata__"`` when present. Reads only the (size-checked) header bytes, never tensor data, and runs no code.

    Raises:
        AdapterLoadError: truncated file, absurd header size, or a header that is not a JSON object of well-formed
            tensor entries lying inside the file; the message names the file.
    """
    check_safetensors_header(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise AdapterLoadError(f"{path}: corrupt safetensors header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise AdapterLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len

    def is_count(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    for name, entry in header.items():
        if name == "__metadata__":
            ok = isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
        else:
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(is_count(d) for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2
                and all(is_count(o) for o in entry["data_offsets"])
                and entry["data_offsets"][0] <= entry["data_offsets"][1] <= data_len
            )
        if not ok:
            raise AdapterLoadError(f"{path}: corrupt safetensors header entry {name!r}; re-save the adapter")
    return header


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

        read_safetensors_header(path)
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
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterLoadError(f"{path}: expected a dict of tensors keyed by name")
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

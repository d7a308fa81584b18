"""Adapter files on disk and on the hub: names, directories, atomic writes, and reading untrusted bytes safely.

Only I/O lives here; which tensors an adapter owns and under which keys is ``checkpoint``'s business, and turning
JSON into a config is ``config``'s, so this module imports nothing from deltatune but ``errors``. Everything read
is treated as untrusted: sizes are bounded before anything is allocated, safetensors headers are checked against the
file before tensors are read, and pickles are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from collections.abc import Mapping

import torch

from .errors import AdapterLoadError, AdapterStateError, ConfigError, DeltatuneError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# In ``adapter_names`` (one adapter per row of a mixed batch): the row uses no adapter. Reserved as an adapter name.
BASE_ADAPTER = "__base__"

# A safetensors header (JSON describing tensors) larger than this is not an adapter; refuse before reading it.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# An adapter_config.json larger than this is not a config; refuse before reading it.
_MAX_CONFIG_BYTES = 16 * 1024 * 1024


# --- names and directories ------------------------------------------------------------------------------------------

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
    if os.path.isabs(name) or name == BASE_ADAPTER:
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


# --- atomic writes --------------------------------------------------------------------------------------------------

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


# --- reading --------------------------------------------------------------------------------------------------------

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

def write_adapter(
    directory: str | os.PathLike, config_json: str, tensors: Mapping[str, torch.Tensor], safe_serialization: bool = True
) -> None:
    """Write one adapter into ``directory``: ``config_json`` as ``adapter_config.json`` and ``tensors`` as
    ``adapter_model.safetensors`` (or a weights-only ``adapter_model.bin``), both atomically together (see
    :func:`atomic_write_files`)."""
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
        os.path.join(directory, CONFIG_NAME): config_json.encode(),
    })

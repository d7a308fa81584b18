"""Adapter files on disk and on the hub: names, directories, atomic writes, and reading untrusted bytes safely.

Only I/O lives here; which tensors an adapter owns and under which keys is ``checkpoint``'s business, and turning
JSON into a config is ``config``'s, so this module imports nothing from deltatune but ``errors``. Everything read
is treated as untrusted: sizes are bounded before anything is allocated, safetensors headers are checked against the
file before tensors are read, and pickles are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping

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
    into place, so a failure while serialising or writing leaves all previous files intact. A crash *during* the
    renames can still pair new files with old ones: files that must change together go through
    :func:`replace_directory`.
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
    leftover = interrupted_save(model_id)
    if leftover is not None:
        raise AdapterLoadError(
            f"{model_id!r} does not exist: a save into it was interrupted ({leftover} lies beside it); saving again "
            f"repairs it (deltatune.files.recover_directory finishes the interrupted save)"
        )
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


# --- replacing a directory as a whole -------------------------------------------------------------------------------
#
# A save is a new version of a whole directory: the adapter's config and weights (and a run's checkpoint files) must
# never be seen paired with another version's. The new version is written into a hidden sibling (".<name>" +
# _SAVE_MARK + "new-<pid>-<token>"), fsync'ed, and then swapped in:
#
# * Linux (renameat2 with RENAME_EXCHANGE: kernel >= 3.15 and glibc >= 2.28, on ext4, xfs, btrfs, tmpfs, ...): the
#   two directories trade names in one atomic step, so every reader sees the complete old or the complete new one.
# * Elsewhere, or where the filesystem refuses the exchange: two renames (old -> ".<name>...old-<pid>-<token>", then
#   new -> name). Between them the directory is briefly absent (a load fails "not found", it never reads a mix);
#   a crash there is repaired by the next save of that directory (the new version, complete, is put in place).
#
# Entries of the old directory that are not replaced (other adapters' sub-folders, a tokenizer, a run's files) are
# carried into the new version as hard links (copies where links are impossible) before the swap.

_SAVE_MARK = ".deltatune-save-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# A leftover whose owner cannot be checked (no POSIX pids) is treated as abandoned after this many seconds.
_LEFTOVER_AGE = 3600.0


def replace_directory(
    target: str | os.PathLike, files: Mapping[str, bytes], replaced: Collection[str] = ()
) -> None:
    """Make ``target`` hold ``files`` (relative path -> content) in one atomic swap of the whole directory.

    Entries of the previous ``target`` are kept unless ``files`` or ``replaced`` (relative paths) name them. Leftovers
    of an interrupted earlier save of ``target`` are cleaned first. When the swap cannot be done (no write access
    to the parent, ``target`` is a mount point, an entry that cannot be carried over) each file is still replaced
    atomically on its own (:func:`atomic_write_files`).

    Raises:
        OSError: writing failed (disk full, permissions); the previous version of ``target`` is untouched.
    """
    target = os.path.realpath(os.fspath(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    recover_directory(target)
    try:
        staging = tempfile.mkdtemp(prefix=f".{name}{_SAVE_MARK}new-{os.getpid()}-", dir=parent)
    except PermissionError:
        staging = None
    if staging is None or os.path.ismount(target):
        _write_in_place(target, files, replaced)
        return
    try:
        skip = {os.path.normpath(p) for p in (*files, *replaced)}
        if os.path.isdir(target):
            _carry_over(target, staging, skip)
            shutil.copymode(target, staging)
        for rel, data in files.items():
            path = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_synced(path, data)
        _fsync_tree(staging)
    except _CannotCarry:
        shutil.rmtree(staging, ignore_errors=True)
        _write_in_place(target, files, replaced)
        return
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, target)


def publish_directory(target: str | os.PathLike, fill: Callable[[str], None]) -> None:
    """Make ``target`` exactly what ``fill(staging)`` writes into a fresh hidden sibling, in one atomic swap (the
    previous ``target``, if any, is replaced whole: nothing of it is kept). For outputs too large to hold in memory
    (a merged model), which :func:`replace_directory` would need as bytes; the crash guarantees are the same, and
    leftovers are recognised and cleaned the same way.

    Raises:
        OSError: ``fill`` or writing failed (disk full, permissions); the previous ``target`` is untouched.
    """
    target = os.path.realpath(os.fspath(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    recover_directory(target)
    staging = tempfile.mkdtemp(prefix=f".{name}{_SAVE_MARK}new-{os.getpid()}-", dir=parent)
    try:
        fill(staging)
        for directory, _, names in os.walk(staging):  # ``fill`` wrote with ordinary, unsynced writes
            for file_name in names:
                with open(os.path.join(directory, file_name), "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, target)


def recover_directory(target: str | os.PathLike) -> None:
    """Finish or discard what an interrupted :func:`replace_directory` of ``target`` left beside it.

    Only a crash between the two renames of the fallback swap leaves ``target`` missing; then its new version (which
    was complete before the first rename) is put in place, or else the old one. Every other leftover is an unused or
    retired version and is deleted. Leftovers of a save still running in another live process are left alone.
    """
    target = os.path.realpath(os.fspath(target))
    parent, name = os.path.split(target)
    prefix = f".{name}{_SAVE_MARK}"
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except FileNotFoundError:
        return
    leftovers: dict[str, dict[str, str]] = {}
    for entry in names:
        kind, _, owner = entry[len(prefix):].partition("-")
        if kind in ("new", "old") and not _owner_alive(owner, os.path.join(parent, entry)):
            leftovers.setdefault(owner, {})[kind] = os.path.join(parent, entry)
    if not os.path.lexists(target):
        for owner, pair in leftovers.items():
            if "old" in pair:  # the crash came between the two renames: "new" is complete
                os.rename(pair.pop("new", None) or pair.pop("old"), target)
                break
    for pair in leftovers.values():
        for path in pair.values():
            shutil.rmtree(path, ignore_errors=True)


def recover_leftovers(parent: str | os.PathLike) -> None:
    """:func:`recover_directory` for every directory in ``parent`` that an interrupted save left leftovers beside."""
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for target in {n[1:n.index(_SAVE_MARK)] for n in names if n.startswith(".") and _SAVE_MARK in n}:
        if target:
            recover_directory(os.path.join(parent, target))


def interrupted_save(directory: str | os.PathLike) -> str | None:
    """A hint for a load that found nothing in ``directory``: the name of a save's leftover beside it, if any."""
    target = os.path.realpath(os.fspath(directory))
    parent, name = os.path.split(target)
    try:
        return next((n for n in sorted(os.listdir(parent)) if n.startswith(f".{name}{_SAVE_MARK}")), None)
    except OSError:
        return None


def directory_version(directory: str | os.PathLike) -> tuple[int, int] | None:
    """Identity of the directory now at ``directory`` (a swap installs a new one), or ``None`` if there is none.

    A reader that sees the same identity before and after reading several files has read them from one version.
    """
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _CannotCarry(Exception):
    """An entry of the old directory cannot be carried into the new version (a socket, a device, a FIFO)."""


def _carry_over(source: str, destination: str, skip: set[str], rel: str = "") -> None:
    """Recreate ``source``'s tree (minus ``skip``) in ``destination``: files hard-linked (copied when linking is
    impossible), directories recreated, symlinks copied as symlinks."""
    for entry in os.scandir(source):
        here = os.path.join(rel, entry.name)
        if here in skip:
            continue
        dest = os.path.join(destination, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir():
            os.mkdir(dest)
            shutil.copymode(entry.path, dest)
            _carry_over(entry.path, dest, skip, here)
        elif entry.is_file():
            try:
                os.link(entry.path, dest)
            except OSError:  # cross-device, no hard links on this filesystem, protected_hardlinks
                shutil.copy2(entry.path, dest)
        else:
            raise _CannotCarry(entry.path)


def _swap_in(staging: str, target: str) -> None:
    """Put the complete, synced ``staging`` at ``target`` atomically, then delete the previous version (or, when the
    swap fails, ``staging``)."""
    cwd = _cwd_inside(target)
    try:
        if not os.path.isdir(target):
            os.rename(staging, target)
        elif not _exchange(staging, target):  # after an exchange, ``staging`` holds the previous version
            retired = staging.replace(f"{_SAVE_MARK}new-", f"{_SAVE_MARK}old-", 1)
            os.rename(target, retired)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(retired, target)
                raise
            staging = retired
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(os.path.dirname(target))
    if cwd is not None:  # this process worked inside the old version; follow the path to the new one
        os.chdir(cwd if os.path.isdir(cwd) else target)


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange directories ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    platform, C library or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl < 1.2.? : no wrapper
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _cwd_inside(target: str) -> str | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return cwd if cwd == target or cwd.startswith(target + os.sep) else None


def _owner_alive(owner: str, path: str) -> bool:
    """Whether the save that left ``path`` (``owner`` = "<pid>-<token>") may still be running on this machine."""
    pid = owner.partition("-")[0]
    if os.name != "posix" or not pid.isdigit():
        try:
            return time.time() - os.path.getmtime(path) < _LEFTOVER_AGE
        except OSError:
            return False
    return pid_alive(int(pid))  # this process's own leftovers too: another thread may be saving


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (POSIX)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(root: str) -> None:
    """fsync every directory under ``root`` (bottom-up), so the names of everything in it are on disk."""
    for directory, _, _ in os.walk(root, topdown=False):
        _fsync_dir(directory)


def _write_in_place(target: str, files: Mapping[str, bytes], replaced: Collection[str]) -> None:
    """The fallback when ``target`` cannot be swapped: every file atomic on its own, stale ``replaced`` removed."""
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
    atomic_write_files({os.path.join(target, rel): data for rel, data in files.items()})
    for rel in replaced:
        if rel not in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(target, rel))


# --- writing --------------------------------------------------------------------------------------------------------

def adapter_files(
    config_json: str,
    tensors: Mapping[str, torch.Tensor],
    safe_serialization: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, bytes]:
    """The two files of one adapter: ``adapter_config.json`` and ``adapter_model.safetensors`` (or a weights-only
    ``adapter_model.bin``, which has no room for ``metadata``), by file name."""
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        from safetensors.torch import save

        weights_name, payload = SAFETENSORS_NAME, save(owned, metadata={**(metadata or {}), "format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(owned, buffer)
        weights_name, payload = PICKLE_NAME, buffer.getvalue()
    return {weights_name: payload, CONFIG_NAME: config_json.encode()}


def write_adapters(save_directory: str | os.PathLike, adapters: Mapping[str, Mapping[str, bytes]]) -> None:
    """Write adapters (sub-folder, ``""`` for the top -> its :func:`adapter_files`) into ``save_directory``, all in
    one :func:`replace_directory` swap: a reader sees all of them old or all new. Each adapter's previous files
    (config, safetensors, pickle) go; everything else in ``save_directory`` stays."""
    files = {os.path.join(sub, name): data for sub, named in adapters.items() for name, data in named.items()}
    replaced = [os.path.join(sub, name) for sub in adapters for name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)]
    replace_directory(save_directory, files, replaced)

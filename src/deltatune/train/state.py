"""The run directory and its checkpoints.

Layout of a run directory::

    run.json                  the options (what this run computes) — how a later command recognises the run
    .deltatune-run.lock       held while a run trains here (pid, host, start time): one run per directory
    metrics.jsonl             one JSON object per logged step / evaluation
    checkpoints/LATEST        name of the newest complete checkpoint (written last, atomically)
    checkpoints/step-000040/  adapter (peft format) + optimizer + scheduler + RNG states + trainer state, and the
                              adapter's training state where a method has one (train_state.safetensors)
    adapter/                  the final adapter (peft format: PeftModel.from_pretrained loads it)
    best/                     the adapter with the best eval loss (when evaluating during training)
    loss.png, summary.json    written at the end

A checkpoint directory is written whole (:func:`deltatune.files.replace_directory`: a hidden sibling, fsync'ed, swapped
in atomically), and only then does ``LATEST`` move to it; a crash, a SIGKILL or a full disk at any point leaves the
previous checkpoint complete and ``LATEST`` pointing at it, and no checkpoint directory ever holds files of two
writes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..checkpoint import LAYER_KEY_PREFIX
from ..files import CONFIG_NAME, SAFETENSORS_NAME, atomic_write_files, recover_leftovers, replace_directory
from ..layers import Delta, adapter_layers
from .options import TrainError, TrainOptions

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
TRAIN_STATE_NAME = "train_state.safetensors"
LOCK_FILE = ".deltatune-run.lock"
# Every file a checkpoint may hold; rewriting a checkpoint replaces all of them.
CHECKPOINT_FILES = (SAFETENSORS_NAME, CONFIG_NAME, TRAIN_STATE_NAME, "optimizer.pt", "scheduler.pt", "rng_state.pt",
                    "trainer_state.json")


@dataclass
class TrainerState:
    """Progress of a run, saved with every checkpoint.

    Attributes:
        step: Optimizer steps done.
        tokens: Non-padding input tokens processed (all processes).
        elapsed: Seconds spent training (evaluation excluded), summed over resumed segments.
        best_eval_loss: Lowest eval loss seen during training, and ``best_step`` where.
        bad_evals: Evaluations since the last improvement (early stopping).
        stopped_early: Whether early stopping ended the run.
    """

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# --- the run directory -----------------------------------------------------------------------------------------------

def read_run(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{path}: unreadable run file ({exc})") from None


def write_run(directory: str, options: TrainOptions, info: dict[str, Any]) -> None:
    from .. import __version__

    os.makedirs(directory, exist_ok=True)
    payload = {"deltatune_version": __version__, "options": options.to_dict(), **info}
    atomic_write_files({os.path.join(directory, RUN_FILE): (json.dumps(payload, indent=2) + "\n").encode()})


def check_run_dir(options: TrainOptions) -> str | None:
    """Decide what the run directory means for this command; returns the checkpoint to resume from (or None).

    Raises:
        TrainError: the directory holds another run (or something that is not a run) and ``--overwrite`` was not
            given; or ``--resume`` names something that is not a run of these options.
    """
    directory = options.out
    assert directory is not None
    if options.resume:
        stored = read_run(directory)
        if stored is None:
            raise TrainError(f"--resume {directory}: not a run directory (no {RUN_FILE})")
        return latest_checkpoint(directory)
    if not os.path.exists(directory) or (os.path.isdir(directory) and not set(os.listdir(directory)) - {LOCK_FILE}):
        return None
    if not os.path.isdir(directory):
        raise TrainError(f"--out {directory} is a file; choose a directory")
    stored = read_run(directory)
    if stored is None:
        raise TrainError(
            f"--out {directory} exists and is not a deltatune run directory; choose another --out "
            f"(--overwrite only replaces run directories)"
        )
    if options.overwrite:
        return None
    previous = TrainOptions.from_dict(stored.get("options", {}))
    diff = options.differences(previous)
    if diff:
        raise TrainError(
            f"--out {directory} holds a different run (differs in {', '.join(diff[:6])}); choose another --out "
            f"or pass --overwrite to replace it"
        )
    where = describe_progress(directory)
    raise TrainError(
        f"--out {directory} already holds this run ({where}); continue it with --resume {directory} or start "
        f"over with --overwrite"
    )


@contextlib.contextmanager
def run_lock(directory: str) -> Iterator[None]:
    """Hold ``directory`` for one run: a second run into it fails at once with one line naming the holder.

    The lock is ``.deltatune-run.lock`` (the holder's pid, host and start time) under an exclusive ``flock``, which
    the kernel releases when the holder exits in any way, SIGKILL included; a lock file left by such a run is taken
    over with a note. Where ``flock`` is missing (Windows) the file's existence is the lock, and a leftover must be
    removed by hand. Released (the file removed, and ``directory`` too if this created it and it is empty) on exit.

    Raises:
        TrainError: another live run holds ``directory``.
    """
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    fd, previous = _take_lock(path, directory)
    try:
        if previous:
            print(f"note: {directory}: the run that held it ({previous}) ended without releasing its lock; "
                  f"taking it over", file=sys.stderr, flush=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only when empty: nothing else was written


def _take_lock(path: str, directory: str) -> tuple[int, str]:
    """Open and lock ``path``; returns the descriptor and a description of a previous holder that left it behind."""
    try:
        import fcntl
    except ImportError:  # no flock: exclusive creation is the lock
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), ""
        except FileExistsError:
            raise TrainError(f"--out {directory} is in use by another run ({_holder(path)}); if none is running, "
                             f"delete {path}") from None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainError(f"--out {directory} is in use by another run ({_holder(path)}); wait for it to end or "
                             f"choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: lock the new one
            return fd, _holder(path) if os.fstat(fd).st_size else ""
        os.close(fd)


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def describe_progress(directory: str) -> str:
    if os.path.isfile(os.path.join(directory, "adapter", CONFIG_NAME)):
        return "finished"
    latest = latest_checkpoint(directory)
    return f"last checkpoint {os.path.basename(latest)}" if latest else "no checkpoint yet"


def clear_run_dir(directory: str) -> None:
    """Empty a run directory for ``--overwrite`` (only called on directories that hold a ``run.json``)."""
    for name in set(os.listdir(directory)) - {LOCK_FILE}:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


# --- checkpoints -----------------------------------------------------------------------------------------------------

def latest_checkpoint(directory: str) -> str | None:
    pointer = os.path.join(directory, CHECKPOINTS, LATEST)
    try:
        with open(pointer, encoding="utf-8") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(directory, CHECKPOINTS, name)
    if not name or not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise TrainError(f"{pointer} names {name!r}, which is not a complete checkpoint; the run directory is damaged")
    return path


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain Python / tensors (loadable with ``weights_only=True``)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    directory: str,
    state: TrainerState,
    adapter_config_json: str,
    adapter_tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep: int,
    train_state: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write checkpoint ``step-<state.step>`` and point ``LATEST`` at it; then delete all but the newest ``keep``.

    ``train_state`` (from :func:`adapter_train_state`) is written only when a method has any.

    Raises:
        TrainError: the write failed (disk full, permissions); the previous checkpoint is untouched and named.
    """
    from safetensors.torch import save

    root = os.path.join(directory, CHECKPOINTS)
    name = f"step-{state.step:06d}"
    path = os.path.join(root, name)
    previous = latest_checkpoint(directory)
    try:
        extra = {TRAIN_STATE_NAME: save(_cpu(train_state), metadata={"format": "pt"})} if train_state else {}
        replace_directory(path, {
            **extra,
            SAFETENSORS_NAME: save(_cpu(adapter_tensors), metadata={"format": "pt"}),
            CONFIG_NAME: adapter_config_json.encode(),
            "optimizer.pt": _torch_bytes(optimizer_state),
            "scheduler.pt": _torch_bytes(scheduler_state),
            "rng_state.pt": _torch_bytes(rng_states),
            "trainer_state.json": (json.dumps(asdict(state), indent=2) + "\n").encode(),
        }, replaced=CHECKPOINT_FILES)
        atomic_write_files({os.path.join(root, LATEST): (name + "\n").encode()})
    except OSError as exc:
        if previous != path:
            shutil.rmtree(path, ignore_errors=True)
        raise write_failure(directory, f"checkpoint {name}", exc, previous) from None
    prune_checkpoints(directory, keep)
    return path


def write_failure(directory: str, what: str, exc: OSError, previous: str | None = None) -> TrainError:
    """The one-line error for a failed write in a run directory, naming the checkpoint that is still intact."""
    if previous is None:
        try:
            previous = latest_checkpoint(directory)
        except TrainError:
            previous = None
    kept = f"the previous checkpoint {os.path.basename(previous)} is intact" if previous else "no earlier checkpoint"
    why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return TrainError(f"could not write {what} ({why}); {kept}. Free space and continue with --resume {directory}")


def prune_checkpoints(directory: str, keep: int) -> None:
    """Delete checkpoints older than the newest ``keep`` and leftovers of interrupted writes."""
    root = os.path.join(directory, CHECKPOINTS)
    recover_leftovers(root)
    latest = latest_checkpoint(directory)
    names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    if latest is not None:
        names = [n for n in names if n <= os.path.basename(latest)]
        stale = [n for n in os.listdir(root) if n.startswith("step-") and n > os.path.basename(latest)]
        for name in stale:  # written after LATEST moved? impossible; from a killed write: incomplete
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for name in names[: max(0, len(names) - keep)]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read everything :func:`save_checkpoint` wrote (tensors on CPU; ``train_state`` empty when there was none)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
        state = TrainerState(**json.load(fh))
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as fh:
        config = json.load(fh)
    extra = os.path.join(path, TRAIN_STATE_NAME)

    def load(name: str) -> Any:
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)

    return {
        "state": state,
        "adapter": load_file(os.path.join(path, SAFETENSORS_NAME)),
        "config": config,
        "train_state": load_file(extra) if os.path.isfile(extra) else {},
        "optimizer": load("optimizer.pt"),
        "scheduler": load("scheduler.pt"),
        "rng": load("rng_state.pt"),
    }


# --- the adapter's training state ------------------------------------------------------------------------------------

def _deltas(model: Any, adapter_name: str) -> dict[str, Delta]:
    """Adapter ``adapter_name``'s deltas by the prefix of their keys in the adapter file."""
    return {f"{LAYER_KEY_PREFIX}{path}": layer.deltas[adapter_name]
            for path, layer in adapter_layers(model.get_base_model()) if adapter_name in layer.deltas}


def adapter_train_state(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every delta's :meth:`~deltatune.layers.Delta.train_state`, keyed like the adapter file."""
    return {f"{prefix}.{key}": value.detach() for prefix, delta in _deltas(model, adapter_name).items()
            for key, value in delta.train_state().items()}


def restore_adapter(model: Any, adapter_name: str, checkpoint: dict[str, Any], source: str) -> None:
    """Put a checkpoint's adapter into ``model`` as it was in training: the adapter file with the training state's
    full tensors in place of the file's, the config fields training wrote (AdaLoRA's ``rank_pattern``), then each
    delta's remaining training state.

    Raises:
        TrainError: the adapter needs a training state the checkpoint lacks (written by an older deltatune).
    """
    extra = checkpoint["train_state"]
    if not extra and adapter_train_state(model, adapter_name):
        raise TrainError(
            f"{source} holds no {TRAIN_STATE_NAME}, which this {model.peft_config[adapter_name].peft_type.value} "
            f"adapter needs to resume exactly (the checkpoint is from an older deltatune); start the run again "
            f"with --overwrite or in a new --out directory"
        )
    adapter = checkpoint["adapter"]
    model.load_adapter_state_dict({**adapter, **{k: v for k, v in extra.items() if k in adapter}}, adapter_name,
                                  source)
    config = model.peft_config[adapter_name]
    fresh = json.loads(config.to_json_string())  # as JSON, like the checkpoint's
    for key, value in checkpoint["config"].items():
        if key in fresh and fresh[key] != value:
            setattr(config, key, value)
    deltas = _deltas(model, adapter_name)
    states: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in deltas}
    for key, value in extra.items():
        owner = max((p for p in deltas if key.startswith(p + ".")), key=len, default=None)  # innermost (nested)
        if owner is None:
            raise TrainError(f"{source}: {TRAIN_STATE_NAME} holds {key!r}, which no adapter layer of this run has; "
                             f"the checkpoint does not belong to this run")
        states[owner][key[len(owner) + 1:]] = value
    for prefix, delta in deltas.items():
        delta.load_train_state(states[prefix])

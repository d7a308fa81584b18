"""The launch environment: an ``Accelerator`` for this process, and hints when the launch looks wrong.

Kept apart from the loop because it is about how ``train`` was started (one process or several, CPU or GPU, a busy
machine), not about what a run computes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .options import TrainOptions

if TYPE_CHECKING:
    from accelerate import Accelerator


def start_accelerator(options: TrainOptions) -> Accelerator:
    """This process's accelerator: mixed precision as asked, CPU data parallelism where there is no GPU."""
    from accelerate import Accelerator

    _fresh_accelerator_state()
    return Accelerator(mixed_precision="bf16" if options.bf16 else "no", cpu=_multi_process_cpu())


def launch_notes(world: int) -> list[str]:
    """Hints worth printing before a run starts (``world``: the number of processes)."""
    return [note for note in (_launch_note(world), _busy_machine_note()) if note]


def _multi_process_cpu() -> bool:
    """Whether this is one of several processes on a machine without GPUs: accelerate then needs ``cpu=True`` to
    set up CPU data parallelism (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def _fresh_accelerator_state() -> None:
    """Let a second ``train()`` in the same single process use other settings (e.g. bf16): accelerate keeps its
    state process-wide and refuses changes. Distributed runs keep theirs (it holds the process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset(reset_partial_state=True)


def _busy_machine_note() -> str | None:
    """A hint when other processes keep the cores busy: PyTorch's OpenMP threads then spin waiting for each other
    and each step can take many times longer, unless they wait passively."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load > cores + 0.5 and "OMP_WAIT_POLICY" not in os.environ and torch.get_num_threads() > 1:
        return (f"note: the machine is busy (load {load:.1f} on {cores} cores); if steps are slow, run with "
                f"OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1)")
    return None


def _launch_note(world: int) -> str | None:
    """A hint when ``accelerate launch`` started one process on a CPU-only machine (its default launcher cannot
    start several CPU processes; its torchrun launcher, selected by ``--multi_gpu``, can)."""
    if world == 1 and "ACCELERATE_DYNAMO_BACKEND" in os.environ and "WORLD_SIZE" not in os.environ \
            and not torch.cuda.is_available():
        return ("note: accelerate launch started a single process; for data-parallel training on CPU use "
                "`accelerate launch --multi_gpu --num_processes N ...` (torchrun with gloo) or torchrun")
    return None

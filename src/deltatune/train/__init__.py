"""Training on ``accelerate``: ``deltatune train`` and its programmatic form.

Modules: ``options`` (the run's settings), ``presets`` (built-in models, data, presets), ``data`` (reading,
tokenising, batching), ``evaluate`` (held-out metrics), ``state`` (run directory and checkpoints), ``metrics``
(metrics file, plot, summary), ``launch`` (the accelerator, launch hints), ``loop`` (the loop), ``artifacts``
(loading a run for generate / merge).

Example:
    >>> from deltatune.train import TrainOptions, train
    >>> train(TrainOptions(model="path/to/model", data="train.jsonl", r=16, target="all-linear", out="runs/x"))
"""

from .loop import RunResult, train
from .options import TrainError, TrainOptions

__all__ = ["RunResult", "TrainError", "TrainOptions", "train"]

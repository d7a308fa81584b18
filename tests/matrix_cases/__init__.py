"""The method configurations the shared matrix (``tests/test_matrix.py``) runs on every tiny model family.

Each method has one module here defining ``CASES: list[MatrixCase]``; the matrix imports every module of this package,
so a new method joins the matrix by adding a file, without touching the matrix itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tests.models import FAMILIES

ALL_FAMILIES = tuple(sorted(FAMILIES))


@dataclass(frozen=True)
class MatrixCase:
    """One adapter configuration of one method.

    Attributes:
        config_class: Name of the config class in ``deltatune`` (and in ``peft`` when ``in_peft``).
        name: Short id; test ids read ``<family>-<name>``.
        kwargs: Config arguments besides ``task_type``, or ``family -> arguments`` where targets differ by family.
        nonzero_kwargs: Arguments that make a fresh adapter's delta non-zero (LoRA: ``init_lora_weights=False``).
            Empty: the matrix perturbs every adapter parameter with seeded noise instead, as training would.
        weight_init: The init rewrites the base weights (PiSSA, OLoRA): a fresh adapter equals the base only up to
            rounding, unload does not restore the base, and merge_and_unload of a fresh adapter gives it back.
        families: The families the method supports.
        in_peft: peft has the same config class, so trainable-parameter counts are compared with peft's.
        mergeable: The delta folds into the base weights (merge / merge_and_unload).
    """

    config_class: str
    name: str
    kwargs: dict[str, Any] | Callable[[str], dict[str, Any]] = field(default_factory=dict)
    nonzero_kwargs: dict[str, Any] = field(default_factory=dict)
    weight_init: bool = False
    families: tuple[str, ...] = ALL_FAMILIES
    in_peft: bool = True
    mergeable: bool = True

    def config_kwargs(self, family: str) -> dict[str, Any]:
        kwargs = self.kwargs(family) if callable(self.kwargs) else self.kwargs
        return dict(task_type=FAMILIES[family].task_type, **kwargs)

    def make_config(self, library: Any, family: str, *, nonzero: bool = False) -> Any:
        """The config as ``library`` (``deltatune`` or ``peft``) spells it."""
        extra = self.nonzero_kwargs if nonzero else {}
        return getattr(library, self.config_class)(**{**self.config_kwargs(family), **extra})


@torch.no_grad()
def perturb_adapter(model: nn.Module, adapter: str = "default", seed: int = 0, std: float = 0.2) -> None:
    """Add seeded noise to every trainable parameter of ``adapter``'s deltas, so the delta is clearly non-zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f".deltas.{adapter}." in name and param.is_floating_point():
            param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * std)


def all_cases() -> list[MatrixCase]:
    cases = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        cases.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    return cases

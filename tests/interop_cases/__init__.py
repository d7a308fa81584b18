"""The adapters ``tests/test_interop_peft.py`` exchanges with peft, both ways.

Each method has one module here defining ``CASES: list[InteropCase]``; the interop tests import every module of this
package, so a method joins them by adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tests.models import make_convnet_inputs


@dataclass(frozen=True)
class InteropCase:
    """One adapter configuration, spelled identically for both libraries.

    Attributes:
        name: Test id.
        config_class: Name of the config class in both ``deltatune`` and ``peft``.
        factory: Builds the base model (deterministic: two calls give the same weights).
        make_inputs: ``model -> inputs`` for a forward without labels' side effects on the compared logits.
        kwargs: Config arguments shared by both libraries.
        extra_ours / extra_theirs: Saved keys only one library writes (each side still loads the other's file);
            the reason belongs in a comment next to the case.
    """

    name: str
    config_class: str
    factory: Callable[[], nn.Module]
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    kwargs: dict[str, Any]
    extra_ours: frozenset[str] = field(default_factory=frozenset)
    extra_theirs: frozenset[str] = field(default_factory=frozenset)

    def config(self, library: Any) -> Any:
        return getattr(library, self.config_class)(**self.kwargs)


def convnet_inputs(model: Any, batch: int = 2) -> dict[str, torch.Tensor]:
    inputs = make_convnet_inputs(batch)
    inputs.pop("labels")
    return inputs


def all_cases() -> list[InteropCase]:
    cases = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        cases.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    return cases

"""``create_arrow_model``: a base model, a library of task LoRAs (and general ones for GenKnowSub) loaded as adapters
``task_<i>`` / ``gks_<i>``, and an Arrow router over them (``methods/lora_arrow.py``), as peft's function of that name.

It lives above ``model.py`` because it loads adapters; the method modules it uses are imported when it runs, so that
importing deltatune imports no method.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, TargetError
from .layers import adapter_layers
from .model import PeftModel

__all__ = ["create_arrow_model"]

TASK_PREFIX, GENERAL_PREFIX, ROUTER = "task_", "gks_", "arrow_router"


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: Sequence[str],
    arrow_config: Any,
    general_adapter_paths: Sequence[str] | None = None,
    **adapter_kwargs: Any,
) -> PeftModel:
    """Load the task LoRAs as ``task_0 … task_{n-1}`` (and, with ``arrow_config.use_gks``, the general ones as
    ``gks_0 …``), check that they agree (one rank, the same module names and shapes, Linear-like layers only), and add
    the active adapter ``arrow_router``: a ``LoraConfig(arrow_config=..., target_modules=<their modules>, r=<their
    rank>)``. ``arrow_config`` itself is not modified (peft writes the adapter names into it; here the router's copy
    holds them).

    Args:
        base_model: The model the LoRAs were trained on.
        task_specific_adapter_paths: Adapter directories or hub ids (``"user/repo"`` or ``"user/repo/subfolder"``).
        arrow_config: An ``ArrowConfig`` (or its fields as a dict).
        general_adapter_paths: The general LoRAs for GenKnowSub (required with ``use_gks``).
        **adapter_kwargs: Passed to every load (``revision``, ``token``, ...).

    Raises:
        ConfigError: no task adapters, ``use_gks`` without general ones, or adapters that disagree.
        TargetError: an adapter on a layer other than Linear / Conv1D.
    """
    from .methods.lora import LoraConfig  # noqa: PLC0415 (importing deltatune imports no method)
    from .methods.lora_arrow import ArrowVariant  # noqa: PLC0415

    arrow_config = ArrowVariant.config_from(arrow_config)  # also a dict
    if not task_specific_adapter_paths:
        raise ConfigError("create_arrow_model: task_specific_adapter_paths must name at least one adapter")
    if arrow_config.use_gks and not general_adapter_paths:
        raise ConfigError("create_arrow_model: arrow_config.use_gks=True needs general_adapter_paths (GenKnowSub "
                          "subtracts their mean from the task adapters)")
    tasks = [f"{TASK_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    general = [f"{GENERAL_PREFIX}{i}" for i in range(len(general_adapter_paths or ()))] if arrow_config.use_gks else []
    sources = list(zip(tasks, task_specific_adapter_paths)) + list(zip(general, general_adapter_paths or ()))
    model = None
    for name, path in sources:
        location, kwargs = _source(path, adapter_kwargs)
        if model is None:
            model = PeftModel.from_pretrained(base_model, location, adapter_name=name, **kwargs)
        else:
            model.load_adapter(location, adapter_name=name, **kwargs)
    modules, r = _agreed_library(model, tasks + general)
    config = dataclasses.replace(arrow_config)
    config.task_adapter_names, config.gks_adapter_names = tasks, general
    model.add_adapter(ROUTER, LoraConfig(arrow_config=config, target_modules=modules, r=r))
    model.set_adapter(ROUTER)
    return model


def _source(path: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """peft's reading of an adapter path: a local directory, or a hub id whose parts after ``user/repo`` are a
    subfolder."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ConfigError(f"create_arrow_model: {path} has no adapter_config.json")
        return path, dict(kwargs)
    parts = path.strip("/").split("/")
    if len(parts) > 2 and "subfolder" not in kwargs:
        return "/".join(parts[:2]), {**kwargs, "subfolder": "/".join(parts[2:])}
    return path, dict(kwargs)


def _agreed_library(model: PeftModel, names: list[str]) -> tuple[list[str], int]:
    """The module names (last path part) and rank every adapter of ``names`` shares; refuses a library whose adapters
    differ in rank or modules, or sit on other layers than Linear / Conv1D (peft's checks)."""
    reference = None
    for name in names:
        modules, ranks = set(), set()
        for path, layer in adapter_layers(model.base_model.model):
            delta = layer.deltas[name] if name in layer.deltas else None
            if delta is None:
                continue
            base = layer.base_layer
            if not isinstance(base, (nn.Linear, Conv1D)) or not hasattr(delta, "lora_A"):
                raise TargetError(f"create_arrow_model: adapter {name!r} adapts {path}, a {type(base).__name__}; "
                                  f"Arrow routes over LoRA on Linear / Conv1D layers only")
            modules.add(path.rpartition(".")[2])
            ranks.add(delta.lora_A.weight.shape[0])
        found = (modules, ranks)
        if reference is None:
            reference = found
        elif found != reference:
            raise ConfigError(f"create_arrow_model: adapter {name!r} differs from {names[0]!r} in its modules or rank "
                              f"({sorted(modules)}, r={sorted(ranks)} vs {sorted(reference[0])}, "
                              f"r={sorted(reference[1])}); Arrow needs one rank and the same modules")
        if len(ranks) != 1:
            raise ConfigError(f"create_arrow_model: adapter {name!r} has several ranks {sorted(ranks)}")
    return sorted(reference[0]), next(iter(reference[1]))

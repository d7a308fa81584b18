"""What the LoRA variants that change LoRA's update on a Linear layer share: the strategy interface and the reading
of their sub-configs. (Which field selects which variant, and the checks of their combinations: ``lora_variants.py``.)

peft 0.21 calls these "LoRA variants": one config field each (``kasa_config``, ``velora_config``, ``monteclora_config``,
``use_bdlora``, ``use_qalora``, ``arrow_config``), at most one per adapter, on ``nn.Linear``-like layers only. Here each
lives in its own module (``methods/lora_<variant>.py``) as a :class:`LoraVariant`: an object a LoRA delta holds and
hands its update to, like DoRA (``methods/dora.py``). A variant changes what it must of the update ``B A x`` (KaSA
inserts a learned diagonal, QALoRA pools the input, BD-LoRA makes a factor block-diagonal, VeLoRA compresses what
backward keeps, MonteCLoRA perturbs ``A`` while training, Arrow routes over other adapters) and installs its own
parameters on the delta under peft's names, so that files and parameter counts are peft's.

This module imports nothing from ``lora.py``; what a variant reads from the delta is :class:`LoraLinearLike`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import accumulate


class LoraLinearLike(Protocol):
    """What a variant reads from the LoRA delta it belongs to (``methods/lora.py``'s Linear / Conv1D delta)."""

    r: int
    scaling: float
    lora_A: nn.Linear  # weight (r, in)
    lora_B: nn.Linear  # weight (out, r)
    dropout: nn.Module
    training: bool

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor: ...


class LoraVariant:
    """One adapter's variant on one layer. Every hook defaults to plain LoRA; a variant overrides what it changes.

    ``x`` is the adapter's input (in its dtype, through dropout while training), except in :meth:`forward`, which
    gets the layer's input.
    """

    field: ClassVar[str]  # the LoraConfig field that selects it
    sub_config: ClassVar[type | None] = None  # the dataclass of the field's value (None: a flag)
    # why merging is impossible (Arrow routes per token); None: the update is a weight and merges
    merge_refusal: ClassVar[str | None] = None

    @classmethod
    def config_from(cls, value: Any) -> Any:
        """The field's value as :attr:`sub_config` (a dict read from JSON converted); see :func:`config_from`."""
        return value if cls.sub_config is None else config_from(value, cls.sub_config, cls.field)

    @classmethod
    def check_target(cls, config: Any, base_layer: nn.Module, name: str) -> None:
        """Refuse a target this variant cannot adapt (before anything is built). Only Linear-like layers reach it."""

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> LoraVariant:
        """Install the variant's parameters on the freshly initialised ``delta`` (module ``name``) and return it."""
        return cls()

    def joined(self, delta: LoraLinearLike, deltas: nn.ModuleDict) -> None:
        """Called when ``delta`` joins an adapter layer, whose ``deltas`` (every adapter's) it may keep (Arrow)."""

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        """The unscaled update ``B A x`` (..., out)."""
        return F.linear(F.linear(x, delta.lora_A.weight), delta.lora_B.weight)

    def lora_weight(self, delta: LoraLinearLike) -> torch.Tensor:
        """The unscaled update as a weight ``(out, in)``: what merging adds (times ``scaling``)."""
        return delta.lora_B.weight @ delta.lora_A.weight

    def forward(self, delta: LoraLinearLike, x: torch.Tensor, base_out: torch.Tensor,
                base_layer: nn.Module) -> torch.Tensor:
        """The layer's output for its input ``x``: ``base_out + scaling · B A x`` unless the variant says otherwise."""
        return accumulate(base_out, self.lora_forward(delta, delta.adapter_input(x)), delta.scaling)


def config_from(value: Any, sub_config: type, field: str) -> Any:
    """``value`` as a ``sub_config`` instance: ``None`` stays, a dict (read from JSON, where peft writes every field,
    also the ``init=False`` ones) is converted, anything else is refused naming ``field``.

    Raises:
        ConfigError: a dict with a field the sub-config does not have, a bad value (its own checks), another type.
    """
    if value is None or isinstance(value, sub_config):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{field} must be a {sub_config.__name__}, a dict or None, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(sub_config)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{field} has fields {sub_config.__name__} does not know: {unknown}")
    try:
        made = sub_config(**{k: v for k, v in value.items() if fields[k].init})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    for key, item in value.items():  # init=False fields peft saves too (Arrow's adapter names)
        if not fields[key].init:
            setattr(made, key, item)
    return made

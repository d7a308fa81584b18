"""Lily: low-rank adapters interconnected across layers — shared down-projections, a shared bank of routed
up-projections.

Zhong et al., 2024, "Low-Rank Interconnected Adaptation across Layers" (arXiv:2407.09946), §3: rather than one
``B A`` per layer, the layers of one kind (one target suffix, one weight shape) share their projectors. Every
``stride_A`` consecutive layers share one ``A ∈ R^{r×in}``; all layers of the kind share one bank of ``num_B``
up-projections ``B_e ∈ R^{r×out}``; each layer has its own router ``R ∈ R^{num_B×r}`` that mixes the bank:

    h = A x                                        (…, r)
    p = mean over every position of the batch of softmax(R h)        (num_B,)
    Δy = scaling · h (Σ_e p_e B_e)                 (…, out)

As in peft, ``p`` is averaged over all positions of the batch (padding included), so a row's update depends on the
rows beside it: a mixed-adapter batch gives each adapter's rows the update they would get as a batch of their own,
and a cached ``generate()`` step averages over the new positions only (as peft's does). There is no fixed weight
update, so merging is refused (peft raises too).

Grouping, as peft's: the adapted layers, in module order, grouped by (the target suffix their name ends with — the
longest where several do; the whole pattern for a regex ``target_modules`` — and weight shape); within a group layer
``i`` takes the ``A`` of layer ``⌊i / stride_A⌋ · stride_A`` and every layer takes the first layer's ``B``. Shared
projectors are one module held by several deltas (they count once, as in peft).

Saved keys, peft's, one set per layer (shared tensors repeated under each layer's path): ``<module>.lily_A.weight``
``(r, in)``, ``<module>.lily_B.weight`` ``(num_B·r, out)`` (``B_e`` is rows ``e·r … (e+1)·r``) and
``<module>.lily_router.weight`` ``(num_B, r)``. Init: ``A`` and the routers Kaiming-uniform (``a = √5``), ``B = 0``
(the base model); ``init_weights=False`` draws ``B`` like ``A``, for tests. Layer type: ``nn.Linear``, as in peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, NotMergeableError
from ..kernels import accumulate
from ..layers import Delta
from ..registry import LayerMethod
from .common import adapter_dtype, check_scale, check_size, place_delta

__all__ = ["LilyConfig"]  # exported from deltatune


@dataclass
class LilyConfig(LayerConfig):
    """Configuration of a Lily adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Rank of every ``A`` and ``B_e`` (peft suggests 2-4× a LoRA's, since projectors are shared).
        stride_A: Consecutive layers of one kind that share one ``A`` (1: each layer has its own).
        num_B: Up-projections in each kind's shared bank, mixed per layer by its router; at least 2.
        scaling: Direct multiplier of the update (no ``α / r``).
        init_weights: ``True``: ``B = 0`` (the base model). ``False``: ``B`` random, for tests.
    """

    peft_type: PeftType = field(default=PeftType.LILY, init=False)
    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("stride_A", self.stride_A)
        check_size("num_B", self.num_B)
        if self.num_B < 2:
            raise ConfigError(f"num_B must be at least 2 (the router mixes the bank), got {self.num_B}")
        check_scale("scaling", self.scaling)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (B = 0) or False (random), got {self.init_weights!r}")


class LilyDelta(Delta):
    """``Δy = scaling · A x · Σ_e p_e B_e`` with ``A`` and the bank shared with other layers, the router its own."""

    def __init__(self, lily_A: nn.Linear, lily_B: nn.Linear, num_B: int, scaling: float) -> None:
        super().__init__()
        self.lily_A = lily_A  # (r, in), shared with up to stride_A - 1 other layers
        self.lily_B = lily_B  # (num_B · r, out), shared with every layer of the kind
        self.lily_router = nn.Linear(lily_A.out_features, num_B, bias=False)  # (num_B, r), this layer's own
        self.num_B, self.scaling = num_B, scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        hidden = self.lily_A(x.to(self.lily_A.weight.dtype))  # (..., r)
        mix = F.softmax(self.lily_router(hidden), dim=-1).reshape(-1, self.num_B).mean(dim=0)  # (num_B,)
        bank = self.lily_B.weight.unflatten(0, (self.num_B, -1))  # (num_B, r, out)
        combined = torch.einsum("e,eio->io", mix, bank)  # (r, out)
        return accumulate(base_out, hidden @ combined, self.scaling)

    def check_mergeable(self, base_layer: nn.Module) -> None:
        raise NotMergeableError("Lily cannot be merged: its router mixes the up-projections per batch, so there is "
                                "no fixed weight update (peft refuses too)")

    def extra_repr(self) -> str:
        return f"in={self.lily_A.in_features}, r={self.lily_A.out_features}, num_B={self.num_B}"


class LilyProjectors(nn.Module):
    """Which ``A`` and ``B`` each target of one adapter uses (module name -> projector). The projectors are
    registered in the deltas that use them, not here, so that they are saved under every layer's path, as peft saves
    them, and nothing under ``base_model.``."""

    def __init__(self, a_for: dict[str, nn.Linear], b_for: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.a_for, self.b_for = a_for, b_for  # plain dicts: not submodules


def _kind(config: LilyConfig, name: str) -> str:
    """The target suffix ``name`` was selected by (the longest that fits), or the regex itself."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets
    return max((t for t in targets if name.endswith(t)), key=len, default=name)


def make_projectors(config: LilyConfig, targets: dict[str, nn.Module], others: dict[str, nn.Module]
                    ) -> LilyProjectors:
    """Build and initialise the shared ``A`` and ``B`` of one adapter's targets (see the module docstring)."""
    groups: dict[tuple[str, torch.Size], list[str]] = {}
    for name, base in targets.items():  # module order
        groups.setdefault((_kind(config, name), base.weight.shape), []).append(name)
    a_for: dict[str, nn.Linear] = {}
    b_for: dict[str, nn.Linear] = {}
    for (_, (out_features, in_features)), names in groups.items():
        weight = targets[names[0]].weight
        dtype = adapter_dtype(weight.dtype)
        bank = nn.Linear(out_features, config.num_B * config.r, bias=False, device=weight.device, dtype=dtype)
        for i, name in enumerate(names):
            if i % config.stride_A == 0:
                a = nn.Linear(in_features, config.r, bias=False, device=weight.device, dtype=dtype)
                if weight.device.type != "meta":
                    with torch.no_grad():
                        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            a_for[name], b_for[name] = a, bank
        if weight.device.type != "meta":
            with torch.no_grad():
                if config.init_weights:
                    nn.init.zeros_(bank.weight)
                else:
                    nn.init.kaiming_uniform_(bank.weight, a=math.sqrt(5))
    return LilyProjectors(a_for, b_for)


def make_delta(config: LilyConfig, base_layer: nn.Module, name: str, shared: LilyProjectors) -> LilyDelta:
    """The Lily delta of ``base_layer`` (module ``name``) on its kind's shared projectors, with its own router."""
    delta = LilyDelta(shared.a_for[name], shared.b_for[name], config.num_B, config.scaling)

    def init(delta: LilyDelta) -> None:
        nn.init.kaiming_uniform_(delta.lily_router.weight, a=math.sqrt(5))

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=LilyConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    make_shared=make_projectors,
    mergeable=False,
)

"""HiRA: a high-rank update as the base weight modulated, entry by entry, by a low-rank matrix.

Huang et al., 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models" (ICLR 2025),
§3.2: ``ΔW = W0 ⊙ (B A)``. The Hadamard product with the frozen weight gives the update ``W0``'s rank structure
(up to ``rank(W0) · r``) for the parameters of a rank-``r`` LoRA:

    y = x (W0 + W0 ⊙ B A)ᵀ + b

``A`` ``(r, in)``, ``B`` ``(out, r)``; for an ``nn.Embedding`` (weight ``(num, dim)``) ``A`` ``(r, num)``, ``B``
``(dim, r)`` and ``W0 ⊙ (B A)ᵀ``; for a convolution ``A`` ``(r, in, *kernel)``, ``B`` ``(out, r, 1, …)`` and
``(B A)[o, i, k] = Σ_j B[o, j] A[j, i, k]``. Init (peft's): ``A`` Kaiming-uniform (``a = √5``), ``B = 0``;
``"gaussian"``: ``A ~ N(0, 1/r²)`` on Linear layers; embeddings ``A = 0``, ``B ~ N(0, 1)``; ``init_weights=False``
draws both ``N(0, 1)`` (tests). ``hira_dropout`` drops the adapter's input (not on embeddings, as in peft).

Because the update reads ``W0``, several merged HiRA adapters each use the weight from before any merge
(``Delta.merges_from_original``), as the unmerged forward does; unmerge restores that weight exactly.

Saved keys, peft's: ``<module>.hira_A`` / ``<module>.hira_B``; ``<module>.hira_embedding_A`` /
``<module>.hira_embedding_B`` on embeddings. Layer types: ``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (not grouped: the Hadamard product needs ``B A`` shaped like the weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_dropout, check_size, place_delta

__all__ = ["HiraConfig"]  # exported from deltatune

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class HiraConfig(LayerConfig):
    """Configuration of a HiRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Rank of ``A`` and ``B`` (the update itself is high-rank).
        hira_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Weight stored ``(in, out)``; read from the layer type here (``Conv1D``), written as peft does.
        init_weights: ``True``: ``B = 0`` (the base model). ``"gaussian"``: ``A ~ N(0, 1/r²)`` on Linear layers,
            ``B = 0``. ``False``: random ``A`` and ``B``, for tests.
        rank_pattern: peft's field, which peft 0.21.2's HiRA ignores (every layer gets ``r``); only ``{}`` is
            accepted, since a per-module rank would write files peft cannot load.
    """

    peft_type: PeftType = field(default=PeftType.HIRA, init=False)
    r: int = 32
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_dropout("hira_dropout", self.hira_dropout)
        if not (isinstance(self.init_weights, bool) or self.init_weights == "gaussian"):
            raise ConfigError(f"init_weights must be True, False or 'gaussian', got {self.init_weights!r}")
        if self.rank_pattern:
            raise ConfigError(
                f"rank_pattern is not supported for HiRA: peft 0.21.2 ignores it (every HiRA layer gets r), so an "
                f"adapter with per-module ranks would not load there; got {self.rank_pattern!r}"
            )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear" and (
                self.layers_to_transform is not None):
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string (as in peft)")


class HiraDelta(Delta):
    """``Δy = op(dropout(x), W0 ⊙ M)`` with ``M = B A`` in the layer's weight layout and ``op`` the layer's own
    operation without its bias."""

    merges_from_original = True

    def __init__(self, base_layer: nn.Module, r: int, dropout: float) -> None:
        super().__init__()
        weight = base_layer.weight
        if isinstance(base_layer, nn.Embedding):
            num, dim = weight.shape
            self.hira_embedding_A = nn.Parameter(torch.zeros(r, num))
            self.hira_embedding_B = nn.Parameter(torch.zeros(dim, r))
        elif isinstance(base_layer, _CONVS):
            self.hira_A = nn.Parameter(torch.zeros(r, base_layer.in_channels, *base_layer.kernel_size))
            self.hira_B = nn.Parameter(torch.zeros(base_layer.out_channels, r, *(1,) * len(base_layer.kernel_size)))
        else:  # Linear, Conv1D (weight (in, out))
            out_features, in_features = weight.shape if not isinstance(base_layer, Conv1D) else weight.shape[::-1]
            self.hira_A = nn.Parameter(torch.zeros(r, in_features))
            self.hira_B = nn.Parameter(torch.zeros(out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 and not isinstance(base_layer, nn.Embedding) \
            else nn.Identity()

    def modulation(self, base_layer: nn.Module) -> torch.Tensor:
        """``M``, shaped and laid out like ``base_layer.weight``."""
        if isinstance(base_layer, nn.Embedding):
            return (self.hira_embedding_B @ self.hira_embedding_A).T  # (num, dim)
        a, b = self.hira_A, self.hira_B
        m = b.flatten(1) @ a.flatten(1)  # (out, in · prod(kernel))
        if isinstance(base_layer, _CONVS):
            return m.view(b.shape[0], *a.shape[1:])
        return m.T if isinstance(base_layer, Conv1D) else m

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        m = self.modulation(base_layer)
        weight = base_layer.weight.to(m.dtype) * m
        if isinstance(base_layer, nn.Embedding):
            update = F.embedding(x, weight)
        else:
            x = self.dropout(x.to(m.dtype))
            if isinstance(base_layer, _CONVS):
                update = base_layer._conv_forward(x, weight, None)
            elif isinstance(base_layer, Conv1D):
                update = x @ weight
            else:
                update = F.linear(x, weight)
        return base_out + update.to(base_out.dtype)

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module,
                      original: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert original is not None  # the layer passes it (merges_from_original)
        m = self.modulation(base_layer)
        update = original["weight"].to(m.dtype) * m
        return {"weight": params["weight"] + update.to(params["weight"].dtype)}

    def extra_repr(self) -> str:
        a = getattr(self, "hira_A", None)
        return f"r={(a if a is not None else self.hira_embedding_A).shape[0]}"


def check_target(config: HiraConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a grouped convolution: ``B A`` cannot take the shape of its weight.

    Raises:
        TargetError: a convolution with ``groups > 1``.
    """
    if isinstance(base_layer, _CONVS) and base_layer.groups > 1:
        raise TargetError(f"{name}: HiRA cannot adapt a grouped convolution (groups={base_layer.groups}): the "
                          f"Hadamard product W0 ⊙ BA needs BA shaped like the weight (as in peft)")


def make_delta(config: HiraConfig, base_layer: nn.Module, name: str) -> HiraDelta:
    """Build and initialise the HiRA delta of ``base_layer`` (module ``name``); see the module docstring's init."""
    r = config.r
    delta = HiraDelta(base_layer, r, config.hira_dropout)
    init_weights = config.init_weights

    def init(delta: HiraDelta) -> None:
        if isinstance(base_layer, nn.Embedding):
            a, b = delta.hira_embedding_A, delta.hira_embedding_B
            if init_weights is False:
                a.normal_()
            b.normal_()
            return
        a, b = delta.hira_A, delta.hira_B
        if init_weights is False:
            a.normal_()
            b.normal_()
        elif init_weights == "gaussian" and not isinstance(base_layer, _CONVS):
            a.normal_(std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=HiraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D, nn.Embedding, *_CONVS),
    check_target=check_target,
)

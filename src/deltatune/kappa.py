"""KappaTune target selection (peft's ``find_kappa_target_modules``): adapt the weights with the smallest condition
number ``κ = σ_max / σ_min``.

A well-conditioned weight spreads its information over many directions, so a low-rank update there disturbs what the
model already knows less than in an ill-conditioned one; the selection ranks every ``nn.Linear`` (quantized ones read
dequantized) and every fused 3-D MoE expert tensor (mean κ over its experts) and returns the lowest fraction ``top_p``
as a config's ``target_modules`` / ``target_parameters``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch
from torch import nn

from . import quant
from .errors import ConfigError

_MOE_SUFFIXES = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")
_EPS = 1e-8  # keeps κ finite for a singular matrix

T = TypeVar("T")


def _kappa(matrix: torch.Tensor) -> float:
    """``σ_max / (σ_min + ε)`` of a 2-D matrix (a conv weight flattened to ``[out, rest]``)."""
    sigma = torch.linalg.svdvals(matrix.detach().float().reshape(matrix.shape[0], -1))
    return (sigma[0] / (sigma[-1] + _EPS)).item()


def _progress(items: list[T], show: bool, what: str) -> Iterable[T]:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"Computing SVD ({what})", unit=what.split()[-1])


def _lowest(kappas: dict[str, float], top_p: float | None) -> list[str]:
    ranked = sorted(kappas, key=kappas.__getitem__)
    return ranked[: max(1, int(len(ranked) * top_p))] if ranked and top_p is not None else ranked


def find_kappa_target_modules(
    model: nn.Module, top_p: float | None = 0.2, max_dim_size_to_analyze: int = 16384,
    moe_param_suffixes: tuple[str, ...] | None = None, show_progress: bool = True,
) -> dict[str, list[str] | None]:
    """``{"target_modules": [...], "target_parameters": [...] or None}``: the fraction ``top_p`` (at least one) of
    ``model``'s ``nn.Linear`` modules and of its fused MoE parameters (3-D, names ending in ``moe_param_suffixes``)
    with the lowest condition numbers, lowest first (``top_p=None``: all of them, ranked); matrices with a side over
    ``max_dim_size_to_analyze`` are skipped (their SVD is too costly). ``target_parameters`` is ``None`` for a model
    without such tensors.

    Raises:
        ConfigError: ``top_p`` not ``None`` or in ``(0, 1]``.
    """
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ConfigError(f"find_kappa_target_modules: top_p must be in (0, 1], got {top_p!r}")
    suffixes = tuple(moe_param_suffixes) if moe_param_suffixes else _MOE_SUFFIXES
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    modules = {}
    for name, module in _progress(linears, show_progress, "linear layers"):
        handler = quant.handler_for(module)
        weight = handler.dequantize(module) if handler is not None else module.weight
        if max(weight.shape) <= max_dim_size_to_analyze:
            modules[name] = _kappa(weight)
    stacks = [(name, p) for name, p in model.named_parameters() if p.dim() == 3 and name.endswith(suffixes)]
    parameters = {}
    for name, param in _progress(stacks, show_progress, "MoE parameters"):
        if max(param.shape[1:]) <= max_dim_size_to_analyze:
            parameters[name] = sum(_kappa(expert) for expert in param) / param.shape[0]
    return {"target_modules": _lowest(modules, top_p), "target_parameters": _lowest(parameters, top_p) or None}

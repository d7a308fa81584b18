"""Arrow: a LoRA "router" adapter that sends every token through the top-k of a library of task LoRAs, chosen by how
well the token aligns with each one; with GenKnowSub, the task LoRAs first lose what general-knowledge LoRAs share.

Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs" (arXiv 2405.11157), §4:
each task LoRA ``e`` of a layer gets a prototype ``pₑ``, the top right singular vector of ``ΔWₑ = Bₑ Aₑ`` (found by
15 steps of power iteration on ``Aₑᵀ (BₑᵀBₑ) Aₑ``, never forming ``ΔWₑ``; its sign is irrelevant). A token ``x`` scores
``|⟨x, pₑ⟩|``; the top ``top_k`` scores go through a softmax at ``router_temperature`` (the rest get 0), and the layer
adds ``Σₑ cₑ(x) · sₑ Bₑ Aₑ x`` (``sₑ`` each task LoRA's own scaling). Belofsky et al., 2025, "GenKnowSub"
(ACL 2025 short, 54): before routing, the mean ``A`` and mean ``B`` of the general LoRAs are subtracted from every
task LoRA's ``A`` and ``B`` (in place, once per task LoRA, as peft does).

As in peft 0.21, the router is an adapter of its own (``arrow_config`` in its ``LoraConfig``; its ``lora_A`` /
``lora_B`` exist but take no part), the task LoRAs are the layer's other LoRA adapters except the general ones
(``gks_<n>``), and prototypes are computed at the router's first forward and again whenever that set changes.
``rng_seed`` seeds the power iteration's start vector (the same for every task LoRA, as in peft). Routing per token
has no weight to merge into: merging is refused. :func:`deltatune.create_arrow_model` loads a library and adds the
router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import AdapterStateError, ConfigError
from ._lora_variant import LoraLinearLike, LoraVariant
from .common import check_seed

__all__ = ["ArrowConfig"]

_GKS = re.compile(r"gks_\d+")  # peft's names of the general-knowledge LoRAs
_POWER_STEPS, _EPS = 15, 1e-8


@dataclass
class ArrowConfig:
    """Arrow routing (peft's ``ArrowConfig``).

    Attributes:
        top_k: Task LoRAs combined per token.
        router_temperature: Softmax temperature of the top-k scores.
        use_gks: Subtract the general LoRAs' mean from the task LoRAs first (GenKnowSub).
        task_adapter_names: The task LoRAs' adapter names (set by ``create_arrow_model``: ``task_0``, ...).
        gks_adapter_names: The general LoRAs' adapter names (set by ``create_arrow_model``: ``gks_0``, ...).
        rng_seed: Seed of the power iteration's start vector; ``None``: the global generator.
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: list[str] | None = field(default=None, init=False)
    gks_adapter_names: list[str] | None = field(default=None, init=False)
    rng_seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ConfigError(f"arrow_config.top_k must be a positive integer, got {self.top_k!r}")
        if not self.router_temperature > 0:
            raise ConfigError(f"arrow_config.router_temperature must be positive, got {self.router_temperature!r}")
        if self.rng_seed is not None:
            check_seed("arrow_config.rng_seed", self.rng_seed)


def prototype(a: torch.Tensor, b: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The top right singular vector of ``B A`` (``(in,)``, fp32, unit norm up to ``eps``) by power iteration on
    ``v ↦ Aᵀ (BᵀB) (A v)``, from a Gaussian start vector (seeded with ``seed``)."""
    a, b = a.float(), b.float()  # (r, in), (out, r)
    gram = b.T @ b  # (r, r)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=a.device.type).manual_seed(int(seed))
    v = torch.randn(a.shape[1], device=a.device, dtype=torch.float32, generator=generator)
    v = v / (v.norm() + _EPS)
    for _ in range(_POWER_STEPS):
        w = a.T @ (gram @ (a @ v))
        v = w / (w.norm() + _EPS)
    return v


class ArrowVariant(LoraVariant):
    """The router's part of one layer: the task LoRAs' prototypes and the routed forward (module docstring)."""

    field = "arrow_config"
    sub_config = ArrowConfig
    merge_refusal = ("arrow_config: Arrow routes every token over the task LoRAs by its own scores, so no single "
                     "weight holds the router (nor in peft); keep it unmerged, or merge a task LoRA itself")

    def __init__(self, config: ArrowConfig) -> None:
        self.config = config
        self.deltas: nn.ModuleDict | None = None  # the adapter layer's deltas: the library
        self.prototypes: torch.Tensor | None = None  # (E, in)
        self.experts: tuple[str, ...] = ()  # the task LoRAs the prototypes belong to
        self.subtracted: set[str] = set()  # task LoRAs GenKnowSub has been applied to

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> ArrowVariant:
        return cls(config.arrow_config)

    def joined(self, delta: LoraLinearLike, deltas: nn.ModuleDict) -> None:
        self.deltas = deltas

    def task_loras(self, router: LoraLinearLike) -> list[str]:
        """The layer's plain LoRA adapters other than the router and the general LoRAs, in adapter order."""
        return [n for n, d in self.deltas.items() if d is not router and not _GKS.fullmatch(n) and _plain(d)]

    @torch.no_grad()
    def _subtract_general(self, names: list[str]) -> None:
        """GenKnowSub: ``A -= mean(A_gks)``, ``B -= mean(B_gks)`` for the task LoRAs not yet treated."""
        todo = [n for n in names if n not in self.subtracted]
        general = [self.deltas[n] for n in self.config.gks_adapter_names or () if n in self.deltas]
        if not todo or not general:
            return
        mean_a = torch.stack([d.lora_A.weight for d in general]).mean(0)  # (r, in)
        mean_b = torch.stack([d.lora_B.weight for d in general]).mean(0)  # (out, r)
        for name in todo:
            self.deltas[name].lora_A.weight.sub_(mean_a)
            self.deltas[name].lora_B.weight.sub_(mean_b)
        self.subtracted.update(todo)

    def _ready(self, router: LoraLinearLike) -> list[nn.Module]:
        names = self.task_loras(router)
        if not names:
            raise AdapterStateError("arrow_config: this layer has no task LoRA adapters to route over; load them "
                                    "first (deltatune.create_arrow_model does)")
        if self.config.top_k > len(names):
            raise AdapterStateError(f"arrow_config.top_k={self.config.top_k} exceeds the {len(names)} task LoRA "
                                    f"adapters of this layer")
        if self.config.use_gks:
            self._subtract_general(names)
        if tuple(names) != self.experts:
            with torch.no_grad():
                loras = [self.deltas[n] for n in names]
                self.prototypes = torch.stack([prototype(d.lora_A.weight, d.lora_B.weight, self.config.rng_seed)
                                               .to(d.lora_A.weight.dtype) for d in loras])
            self.experts = tuple(names)
        return [self.deltas[n] for n in names]

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        raise AdapterStateError("arrow_config: the router has no update of its own, only the routed one")

    def lora_weight(self, delta: LoraLinearLike) -> torch.Tensor:
        raise AdapterStateError(self.merge_refusal)

    def forward(self, delta: LoraLinearLike, x: torch.Tensor, base_out: torch.Tensor,
                base_layer: nn.Module) -> torch.Tensor:
        loras = self._ready(delta)
        tokens = x.reshape(-1, x.shape[-1]).to(loras[0].lora_A.weight.dtype)  # (t, in)
        scores = (tokens @ self.prototypes.T).abs()  # (t, E), sign-free
        top, index = scores.topk(self.config.top_k, dim=1)
        masked = torch.full_like(scores, float("-inf")).scatter(1, index, top)
        weights = torch.softmax(masked / self.config.router_temperature, dim=1)  # (t, E), zero off the top k
        routed = sum(weights[:, e:e + 1] * (d.scaling * (tokens @ d.lora_A.weight.T) @ d.lora_B.weight.T)
                     for e, d in enumerate(loras))  # (t, out)
        if delta.training and isinstance(delta.dropout, nn.Dropout):  # peft drops out the routed update
            routed = delta.dropout(routed)
        return base_out + routed.reshape(*base_out.shape[:-1], -1).to(base_out.dtype)


def _plain(delta: nn.Module) -> bool:
    """A plain LoRA delta on a Linear-like layer: factors ``lora_A`` / ``lora_B`` and no variant or DoRA."""
    return (isinstance(getattr(delta, "lora_A", None), nn.Linear) and getattr(delta, "dora", None) is None
            and getattr(delta, "variant", None) is None)

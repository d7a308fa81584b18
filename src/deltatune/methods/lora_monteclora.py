"""MonteCLoRA: LoRA whose ``A`` is, while training, an average of ``N`` Monte Carlo perturbations of itself.

Sengupta et al., 2024, "Robust and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank
Adaptation" (arXiv 2411.04358), §3, as peft 0.21 implements it. Per layer, with ``A`` ``(r, in)``:

* a covariance ``Σ = diag(clip(diag(S Z Sᵀ), 10⁻³))`` with ``S = diag(exp(std_prior))`` (``std_prior`` ``(r,)``
  trained) and ``Z`` a Wishart(``r``, ``I``) draw;
* ``N`` perturbations ``εₙ = sample_scaler · zₙ chol(Σ)`` with ``zₙ ~ N(0, I)`` of shape ``(in, r)``;
* mixture weights ``w = softmax(μ + L ζ)``, ``ζ ~ N(0, I_N)``, the logistic-normal approximation of a Dirichlet with
  concentration ``α = exp(expert_weights_prior)`` (``(N,)`` trained): ``μ = log α − mean(log α)``,
  ``L = chol(diag(1/α · (1 − 2/N) + Σ(1/α) / N²))``;
* training uses ``A' = (Σₙ wₙ (Aᵀ + εₙ))ᵀ``; evaluation and merging use ``A`` (the mean).

The small draws ``(Z, ζ)`` are made ``buffer_size`` at a time and used in turn, as peft does; the Gaussian ``z``
(``N · in · r`` numbers) is drawn at each training forward on the parameters' device, where peft keeps ``buffer_size``
of them (at its defaults about 150 MB per 4096-wide layer at ``r = 8``). The distribution is the same. The variational loss
(Dirichlet, Wishart and Gaussian KL terms times ``kl_loss_weight``, plus ``Σ w²`` with ``use_entropy``), averaged
over layers, is what the user adds to the loss: ``model.base_model._get_monteclora_loss()``. The parameters and the
two state buffers (``gaussian_var_prior``: the last ``Σ``; ``expert_weights``: the last ``w``) live in
``lora_monteclora_sampler``, peft's keys.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import adapter_layers
from ._lora_variant import LoraLinearLike, LoraVariant
from .common import check_size, layer_features

__all__ = ["MontecloraConfig"]

_EPS = 1e-3


@dataclass
class MontecloraConfig:
    """MonteCLoRA's sampling (peft's ``MontecloraConfig``).

    Attributes:
        num_samples: Perturbations ``N`` averaged per training forward.
        use_entropy: Add ``Σ wₙ²`` to the variational loss.
        dirichlet_prior: Concentration of the Dirichlet prior over the mixture weights (its KL term).
        sample_scaler: Scale of the perturbations ``ε``.
        kl_loss_weight: Weight of the KL terms in the variational loss.
        buffer_size: Draws of ``(Z, ζ)`` made at a time.
    """

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150

    def __post_init__(self) -> None:
        check_size("monteclora_config.num_samples", self.num_samples)
        check_size("monteclora_config.buffer_size", self.buffer_size)
        if not self.dirichlet_prior > 0:
            raise ConfigError(f"monteclora_config.dirichlet_prior must be positive, got {self.dirichlet_prior!r}")


def wishart_draw(p: int) -> torch.Tensor:
    """One Wishart(``p``, ``I``) draw by Bartlett's decomposition: ``L Lᵀ`` with ``Lᵢᵢ = √χ²(p − i)`` and standard
    normal entries below the diagonal."""
    chi2 = torch.distributions.Chi2(torch.arange(p, 0, -1, dtype=torch.float32)).sample()
    lower = torch.diag(chi2.sqrt().clamp_min(torch.finfo(torch.float32).eps))
    rows, cols = torch.tril_indices(p, p, offset=-1)
    lower[rows, cols] = torch.randn(rows.numel())
    return lower @ lower.T


class MontecloraSampler(nn.Module):
    """The variational parameters of one layer and its buffer of draws (see the module docstring)."""

    def __init__(self, in_features: int, r: int, config: MontecloraConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features, self.r, self.config = in_features, r, config
        n = config.num_samples
        self.std_prior = nn.Parameter(torch.rand(r, dtype=dtype, device=device))
        self.expert_weights_prior = nn.Parameter(torch.rand(n, dtype=dtype, device=device))
        self.register_buffer("gaussian_var_prior", torch.eye(r, dtype=dtype, device=device))
        self.register_buffer("expert_weights", torch.full((n,), 1 / n, dtype=dtype, device=device))
        self._draws: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next ``(z (N, in, r), Z (r, r), ζ (N,))``; ``(Z, ζ)`` from the buffer, refilled ``buffer_size`` at a
        time when used up."""
        if not self._draws:
            with torch.no_grad():
                zeta = torch.randn(self.config.buffer_size, self.config.num_samples)
                self._draws = [(wishart_draw(self.r), zeta[i]) for i in range(self.config.buffer_size)][::-1]
        like = self.std_prior
        wishart, zeta = (t.to(device=like.device, dtype=like.dtype) for t in self._draws.pop())
        z = torch.randn(self.config.num_samples, self.in_features, self.r, device=like.device, dtype=like.dtype)
        return z, wishart, zeta

    def covariance(self, wishart: torch.Tensor) -> torch.Tensor:
        """``Σ = diag(clip(diag(S Z Sᵀ), 10⁻³))``, ``(r, r)``."""
        std = torch.exp(self.std_prior)  # the diagonal of S
        return torch.diag((std[:, None] * wishart * std[None, :]).diagonal().clamp_min(_EPS))

    def mixture_weights(self, zeta: torch.Tensor) -> torch.Tensor:
        """``softmax(μ + L ζ)`` for ``α = exp(expert_weights_prior)`` (the logistic-normal Dirichlet), ``(N,)``."""
        n = self.config.num_samples
        alpha = torch.exp(self.expert_weights_prior).clamp_min(1e-6)
        mu = torch.log(alpha) - torch.log(alpha).mean()
        diag = (1 / alpha * (1 - 2 / n) + (1 / alpha).sum() / n**2).clamp_min(1e-6)
        chol = torch.linalg.cholesky((torch.diag(diag) + 1e-6 * torch.eye(n, device=alpha.device)).float())
        return torch.softmax(chol.to(alpha.dtype) @ zeta + mu, dim=-1)

    def perturbed_a(self, a: torch.Tensor) -> torch.Tensor:
        """One training draw of ``A' = (Σₙ wₙ (Aᵀ + εₙ))ᵀ`` ``(r, in)``; keeps ``Σ`` and ``w`` in the buffers."""
        z, wishart, zeta = self.draw()
        cov = self.covariance(wishart)
        chol = torch.linalg.cholesky(cov.float()).to(cov.dtype)
        noise = self.config.sample_scaler * torch.nan_to_num(z @ chol, nan=_EPS)  # (N, in, r)
        weights = self.mixture_weights(zeta)
        self.gaussian_var_prior = cov  # peft keeps the graph: the Gaussian KL term trains std_prior through it
        self.expert_weights = weights
        if torch.isnan(weights).any():  # peft's fallback: the mean weights for this forward
            warnings.warn("MonteCLoRA sampling produced NaN mixture weights; this forward uses A unperturbed",
                          RuntimeWarning, stacklevel=2)
            return a
        return torch.einsum("n,nir->ir", weights, a.T + noise).T

    def variational_loss(self) -> torch.Tensor | float:
        """``kl_loss_weight · (KL_Dirichlet + KL_Wishart + KL_Gaussian)`` (+ ``Σ w²`` with ``use_entropy``) while
        training, else 0."""
        if not self.training:
            return 0.0
        c, n, r = self.config, self.config.num_samples, self.r
        alpha = torch.exp(self.expert_weights_prior)
        prior = torch.full_like(alpha, c.dirichlet_prior)
        kl_dirichlet = (torch.lgamma(alpha.sum()) - torch.lgamma(prior.sum()) + (torch.lgamma(alpha)
                        - torch.lgamma(prior)).sum() + ((alpha - prior) * (torch.digamma(alpha)
                                                                            - torch.digamma(alpha.sum()))).sum())
        var = torch.exp(self.std_prior) ** 2  # diag(S Sᵀ)
        kl_wishart = 0.5 * (-torch.log(var).sum() * r + var.sum() * r - r**2)
        gauss = self.gaussian_var_prior.clamp_min(1e-6)
        kl_gauss = n * 0.5 * (gauss.trace() - torch.log(gauss).trace() - r)
        entropy = (self.expert_weights**2).sum() if c.use_entropy else 0.0
        return c.kl_loss_weight * (kl_dirichlet + kl_wishart + kl_gauss) + entropy


class MontecloraVariant(LoraVariant):
    """A LoRA delta with MonteCLoRA's sampler (see the module docstring)."""

    field = "monteclora_config"
    sub_config = MontecloraConfig

    @classmethod
    def attach(cls, config: Any, delta: LoraLinearLike, base_layer: nn.Module, name: str) -> MontecloraVariant:
        like = delta.lora_A.weight
        delta.lora_monteclora_sampler = MontecloraSampler(layer_features(base_layer)[0], delta.r,
                                                          config.monteclora_config, like.dtype, like.device)
        return cls()

    def lora_forward(self, delta: LoraLinearLike, x: torch.Tensor) -> torch.Tensor:
        a = delta.lora_A.weight
        if delta.training:
            a = delta.lora_monteclora_sampler.perturbed_a(a)
        return F.linear(F.linear(x, a), delta.lora_B.weight)


def monteclora_loss(base_model: nn.Module, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
    """The variational loss averaged over the MonteCLoRA layers of ``adapter_names`` (default: the active adapters);
    ``0.0`` without any. peft's ``model.base_model._get_monteclora_loss()``, to add to the task loss."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    total: torch.Tensor | float = 0.0
    count = 0
    for _, layer in adapter_layers(base_model.model):
        for name in (layer.active_adapters if names is None else names):
            sampler = getattr(layer.deltas[name], "lora_monteclora_sampler", None) if name in layer.deltas else None
            if sampler is not None:
                total = total + sampler.variational_loss()
                count += 1
    return total / count if count else 0.0

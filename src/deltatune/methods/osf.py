"""OSF: fine-tune a weight's minor singular directions, kept orthogonal to the major ones it must not forget.

Nayak et al., 2025, "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning"
(arXiv:2504.07097), §3: the weight's SVD ``W = U S Vᵀ`` is split at ``k = effective_rank``; the top ``k`` triplets
(``U_high``, ``S_high``, ``V_high``: what earlier tasks rely on) stay frozen, the remaining ``min(out, in) - k`` train
(``U_low``, ``S_low``, ``V_low``), and each gradient of ``U_low`` / ``V_low`` is projected off the frozen subspace
(``g ← g - U_high U_highᵀ g``, ``g ← g - g V_highᵀ V_high``) so training cannot move the preserved directions:

    ΔW = U_low diag(S_low) V_low - U0 diag(S0) V0           (out, in)

with ``U0, S0, V0`` the trainable part's values at creation (so a fresh adapter is exactly the base model). Where a
factor is square its complement is spanned by the initial low part, so the projection uses ``U0 U0ᵀ g`` (``V``:
``g V0ᵀ V0``) and ``U_high`` (``V_high``) is not kept, as in peft. The SVD (float32, ``torch.linalg.svd``) is of the
base weight when the adapter is made; it is not saved, so a file loads onto the base it was trained on and both
libraries regenerate the same factors. ``init_weights=False`` draws the trainable factors ``N(0, 1)`` (tests).

``effective_rank`` per layer (peft's rule): ``None`` → ``min(out, in) // 2``; a float in ``(0, 1]`` → that fraction
of ``min(out, in)`` (truncated); an integer → itself, at most ``min(out, in)``. ``rank_pattern`` keys are regexes
searched anywhere in the module's full name, the first match winning (peft's OSF rule, unlike LoRA's suffix rule).

Several active OSF adapters add their updates (peft's forward uses only the first; its merge adds all, as here);
unmerge subtracts the update (peft cannot unmerge OSF). Saved keys, peft's: ``<module>.osf_svd_params.U_low``,
``.S_low``, ``.V_low``. Layer type: ``nn.Linear``; default targets: peft's table per model type, else all linear
layers but the output head.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType, validate_regex
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod
from ..targeting import expand_all_linear
from .common import place_delta

__all__ = ["OSFConfig"]  # exported from deltatune

_ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
#: peft's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING (GPT-2's Conv1D entries are no OSF targets in peft either)
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _ATTENTION_AND_MLP for t in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
                                       "qwen2", "qwen3", "phi")},
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}


def _check_rank(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a positive integer or a fraction in (0, 1], got {value!r}")
    if isinstance(value, float) and not (0 < value <= 1 or (value > 1 and value.is_integer())):
        raise ConfigError(f"{where} must be a positive integer or a fraction in (0, 1], got {value!r}")
    if value <= 0 or value >= 2**31:
        raise ConfigError(f"{where} must be a positive integer below 2**31 or a fraction in (0, 1], got {value!r}")


@dataclass
class OSFConfig(LayerConfig):
    """Configuration of an OSF adapter (peft's field names). Shared targeting fields: ``target_modules`` and
    ``modules_to_save`` (see ``LayerConfig``); peft's ``OSFConfig`` has no other.

    Attributes:
        effective_rank: Singular directions kept frozen per layer (the rest train): an integer, a fraction in
            ``(0, 1]`` of ``min(out, in)``, or ``None`` for half of it.
        rank_pattern: ``{regex: effective_rank}`` for modules whose full name the regex matches anywhere (first
            match wins); values as ``effective_rank``.
        init_weights: ``True``: the trainable factors start at the SVD's (the base model). ``False``: random, for
            tests.
        target_svd_config: peft's placeholder (``{parameter name: rank}``), which peft 0.21.2 accepts "for forward
            compatibility" and ignores; accepted and saved here as there, with a warning that it has no effect.
    """

    peft_type: PeftType = field(default=PeftType.OSF, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules", "layers_to_transform", "layers_pattern")
    effective_rank: int | float | None = None
    rank_pattern: dict[str, int | float] | None = None
    init_weights: bool = True
    target_svd_config: dict[str, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.effective_rank is not None:
            _check_rank("effective_rank", self.effective_rank)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ConfigError(f"rank_pattern must be a dict of regex -> effective rank, got {self.rank_pattern!r}")
            for key, value in self.rank_pattern.items():
                _check_rank(f"rank_pattern[{key!r}]", value)
                validate_regex(f"rank_pattern key {key!r}", key)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (the base model) or False (random), got "
                              f"{self.init_weights!r}")
        if self.target_svd_config is not None:
            if not isinstance(self.target_svd_config, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                    for k, v in self.target_svd_config.items()):
                raise ConfigError(f"target_svd_config must be a dict of parameter name -> rank, got "
                                  f"{self.target_svd_config!r}")
            warnings.warn("target_svd_config has no effect: peft 0.21.2 accepts it for forward compatibility and "
                          "ignores it, and so does deltatune; set the frozen rank with effective_rank / rank_pattern",
                          UserWarning, stacklevel=3)


def effective_rank(config: OSFConfig, name: str, min_dim: int) -> int:
    """The frozen rank of module ``name`` with ``min(out, in) = min_dim`` (see the module docstring)."""
    value = config.effective_rank
    for pattern, rank in (config.rank_pattern or {}).items():
        if re.search(pattern, name):
            value = rank
            break
    if value is None:
        return min_dim // 2
    if isinstance(value, float) and value <= 1:
        return min(int(min_dim * value), min_dim)
    return min(int(value), min_dim)


class _Project(torch.autograd.Function):
    """Identity forward; the backward projects the gradient with ``project`` (OSF's orthogonality constraint)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, project) -> torch.Tensor:  # type: ignore[override]
        ctx.project = project
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.project(grad), None


class _SvdParams(nn.Module):
    """The trainable triplets (peft's ``osf_svd_params``): ``U_low`` (out, m), ``S_low`` (m,), ``V_low`` (m, in)."""

    def __init__(self, out_features: int, in_features: int, m: int) -> None:
        super().__init__()
        self.U_low = nn.Parameter(torch.zeros(out_features, m))
        self.S_low = nn.Parameter(torch.zeros(m))
        self.V_low = nn.Parameter(torch.zeros(m, in_features))


class OsfDelta(Delta):
    """``Δy = x (U_low S_low V_low - U0 S0 V0)ᵀ`` with the gradients of ``U_low`` and ``V_low`` kept orthogonal to
    the frozen top-``k`` singular subspace."""

    def __init__(self, out_features: int, in_features: int, k: int) -> None:
        super().__init__()
        m = min(out_features, in_features) - k
        self.osf_svd_params = _SvdParams(out_features, in_features, m)
        # not saved: regenerated from the base weight's SVD, as peft does
        self.register_buffer("U0", torch.zeros(out_features, m), persistent=False)
        self.register_buffer("S0", torch.zeros(m), persistent=False)
        self.register_buffer("V0", torch.zeros(m, in_features), persistent=False)
        # the frozen subspace where the low part cannot stand in for its complement (the factor is not square)
        self.register_buffer("U_high", torch.zeros(out_features, k) if out_features > in_features else None,
                             persistent=False)
        self.register_buffer("V_high", torch.zeros(k, in_features) if out_features < in_features else None,
                             persistent=False)

    def _project_u(self, grad: torch.Tensor) -> torch.Tensor:
        if self.U_high is not None:
            return grad - self.U_high @ (self.U_high.T @ grad)
        return self.U0 @ (self.U0.T @ grad)

    def _project_v(self, grad: torch.Tensor) -> torch.Tensor:
        if self.V_high is not None:
            return grad - (grad @ self.V_high.T) @ self.V_high
        return (grad @ self.V0.T) @ self.V0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_low, S_low, V_low)``, their gradients projected when autograd is on."""
        p = self.osf_svd_params
        u, v = p.U_low, p.V_low
        if torch.is_grad_enabled() and (u.requires_grad or v.requires_grad):
            u, v = _Project.apply(u, self._project_u), _Project.apply(v, self._project_v)
        return u, p.S_low, v

    def update(self) -> torch.Tensor:
        """``ΔW`` ``(out, in)``: exactly zero while the factors equal their start. The forward applies this matrix
        rather than the two rank-``m`` products separately: the trainable rank is about half the layer's, so it
        costs about the same, and the difference of two large, nearly equal products is then rounded once, the same
        way in the forward and in a merge."""
        u, s, v = self.factors()
        return (u * s) @ v - (self.U0 * self.S0) @ self.V0

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        update = self.update()
        return base_out + F.linear(x.to(update.dtype), update).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.update().to(base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"trainable_rank={self.S0.shape[0]}"


def check_target(config: OSFConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose effective rank resolves to 0, as peft does (``k = min(out, in)``, nothing left to train,
    is allowed, as in peft).

    Raises:
        TargetError: the resolved effective rank is 0 (a fraction too small for this layer).
    """
    if effective_rank(config, name, min(base_layer.weight.shape)) <= 0:
        raise TargetError(f"{name}: the effective rank resolves to 0 for this {tuple(base_layer.weight.shape)} "
                          f"weight; use a larger effective_rank (peft refuses it too)")


def make_delta(config: OSFConfig, base_layer: nn.Module, name: str) -> OsfDelta:
    """Build the OSF delta of ``base_layer`` (module ``name``) from its weight's SVD."""
    weight = base_layer.weight
    out_features, in_features = weight.shape
    k = effective_rank(config, name, min(out_features, in_features))
    delta = OsfDelta(out_features, in_features, k)

    def init(delta: OsfDelta) -> None:
        u, s, vt = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        # peft keeps the factors in the weight's dtype
        u, s, vt = (t.to(weight.dtype) for t in (u, s, vt))
        delta.U0.copy_(u[:, k:])
        delta.S0.copy_(s[k:])
        delta.V0.copy_(vt[k:])
        if delta.U_high is not None:
            delta.U_high.copy_(u[:, :k])
        if delta.V_high is not None:
            delta.V_high.copy_(vt[:k])
        p = delta.osf_svd_params
        if config.init_weights:
            p.U_low.copy_(delta.U0)
            p.S_low.copy_(delta.S0)
            p.V_low.copy_(delta.V0)
        else:
            for param in (p.U_low, p.S_low, p.V_low):
                param.normal_()

    return place_delta(delta, weight, init)


def _default_targets(model: nn.Module) -> list[str]:
    """peft's table for the model type, else every linear layer but the output head (peft's fallback)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(DEFAULT_TARGETS[model_type]) if model_type in DEFAULT_TARGETS else expand_all_linear(model)


METHOD = LayerMethod(
    config_class=OSFConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
    default_targets=_default_targets,
    check_target=check_target,
)

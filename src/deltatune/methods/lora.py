"""LoRA: a trainable low-rank update ``ΔW = (α / r) · B A`` next to a frozen weight.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1: ``h = W₀x + (α/r)·BAx`` with
``A ∈ R^{r×k}`` and ``B ∈ R^{d×r}``; ``B = 0`` at init so training starts from the base model.

Variants, each a small piece on top of the same delta:

* rsLoRA (Kalajdzievski, 2023, §3): scale by ``α / √r`` so the update's magnitude does not shrink with rank.
* DoRA (Liu et al., 2024, §4.1, §4.3): ``W' = m · (W₀ + ΔW) / ‖W₀ + ΔW‖`` per output channel with a trainable
  magnitude ``m``; the norm is treated as a constant in backward (§4.3) to save memory.
* Init schemes: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r)), ``False`` (both random: a
  non-zero delta, for tests), ``"pissa"`` / ``"pissa_niter_N"`` (Meng et al., 2024: A, B from the top-r singular
  triplets of W₀; W₀ keeps the residual), ``"olora"`` (Büyükakyüz, 2024: A, B from a QR decomposition of W₀).

Layer types: ``nn.Linear``, transformers ``Conv1D`` (weight stored ``(in, out)``, i.e. fan_in_fan_out),
``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` and ``nn.Embedding``. Parameter names follow peft (``lora_A.weight``,
``lora_B.weight``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``) so saved keys match.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType, validate_regex
from ..errors import ConfigError, TargetError
from ..layers import Delta
from ..registry import LayerMethod

_INIT_SCHEMES = (True, False, "gaussian", "pissa", "olora")


@dataclass
class LoraConfig(LayerConfig):
    """Configuration of a LoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Rank of the update.
        lora_alpha: Scale numerator: the update is multiplied by ``lora_alpha / r`` (``/ √r`` with rsLoRA).
        lora_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Weight stored ``(in, out)`` (GPT-2's ``Conv1D``). Set automatically when a target is a
            ``Conv1D``, as peft does; deltatune itself reads the layout
            from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` (every bias in the model), or ``"lora_only"``
            (biases of adapted layers).
        use_rslora: Scale by ``lora_alpha / √r``.
        use_dora: Weight-decomposed LoRA (DoRA): adds a trainable per-channel magnitude.
        init_lora_weights: ``True``, ``False``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"`` or ``"olora"``.
        rank_pattern: ``{module-name pattern: r}`` overriding ``r`` for matching modules (regex on the name suffix).
        alpha_pattern: ``{module-name pattern: alpha}`` overriding ``lora_alpha`` likewise.
    """

    peft_type: PeftType = field(default=PeftType.LORA, init=False)
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    # peft LoRA features not implemented here; a file that switches one on is refused (see config.py).
    _unsupported: ClassVar[dict[str, Any]] = {
        **dict.fromkeys(
            (
                "layer_replication", "loftq_config", "eva_config", "corda_config", "megatron_config",
                "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "arrow_config",
                "use_bdlora", "kasa_config", "monteclora_config", "velora_config", "lora_ga_config", "use_qalora",
                "lora_bias", "ensure_weight_tying",
            )
        ),
        "qalora_group_size": 16,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for where, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            # The bound only stops a corrupt file from asking for absurd allocations; real ranks are far below it.
            if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank < 2**31:
                raise ConfigError(f"{where} must be a positive integer below 2**31, got {rank!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if init not in _INIT_SCHEMES and not (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; use one of {list(_INIT_SCHEMES)} or 'pissa_niter_N'"
            )
        if self.use_dora and isinstance(init, str) and init != "gaussian":
            raise ConfigError(f"use_dora cannot be combined with init_lora_weights={init!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                validate_regex(f"{name} key {key!r}", rf"(.*\.)?({key})$")  # the form pattern_value matches with


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that matches the end of module ``name`` (peft's rule: the key is a
    regex matched against a dotted suffix), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoraDelta(Delta):
    """Shared LoRA/DoRA logic; subclasses supply the layer-type specifics (how A and B apply, the canonical weight
    layout ``(out, ...)`` and how to read it from the base layer)."""

    # Dimension of the base output that indexes output channels (DoRA's magnitude broadcasts along it).
    channel_dim: ClassVar[int] = -1

    def __init__(self, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__()
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None

    # --- what a layer type supplies -------------------------------------------------------------------------
    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled) in the layer's output layout."""
        raise NotImplementedError

    def lora_weight(self) -> torch.Tensor:
        """``B A`` (unscaled) in the canonical ``(out, in, ...)`` layout."""
        raise NotImplementedError

    @staticmethod
    def canonical(weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base weight as ``(out, in, ...)``; an involution (applying it twice gives the stored layout)."""
        return weight

    # --- shared -----------------------------------------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.canonical(self.lora_weight() * self.scaling, base_layer)

    def _weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """Per-output-channel norm of ``W₀ + ΔW``, shape ``(out,)``; detached as in DoRA §4.3."""
        weight = self.canonical(base_layer.weight, base_layer).to(self.adapter_dtype)
        combined = weight + self.lora_weight().detach() * self.scaling
        return combined.flatten(1).norm(dim=1).detach()

    def _channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return v.view(shape)

    def enable_dora(self, base_layer: nn.Module) -> None:
        """Add the magnitude vector, initialised to ``‖W₀ + ΔW‖`` so the adapter starts as plain LoRA."""
        self.lora_magnitude_vector = nn.Parameter(self.stored_magnitude(self._weight_norm(base_layer), base_layer))

    def stored_magnitude(self, m: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The ``(out,)`` magnitude in the shape peft saves it in, so that files interchange; the math reads it back
        with ``.flatten()``."""
        return m

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x_in = x.to(self.adapter_dtype) if x.is_floating_point() else x
        dropped = self.dropout(x_in)
        update = self.lora_forward(dropped) * self.scaling
        if self.lora_magnitude_vector is None:
            return base_out + update.to(base_out.dtype)
        # DoRA: y = s ⊙ (W₀x + ΔWx) + b with s = m / ‖W₀ + ΔW‖, written as a correction of the base output.
        scale = self._channel_view(self.lora_magnitude_vector.flatten() / self._weight_norm(base_layer), base_out.ndim)
        bias = getattr(base_layer, "bias", None)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_no_bias = base_out if bias is None else base_out - self._channel_view(bias, base_out.ndim)
        else:  # the base term must see the same dropped input as the update
            base_no_bias = self.base_no_bias(dropped, base_layer)
        dora = (scale - 1) * base_no_bias.to(scale.dtype) + scale * update
        return base_out + dora.to(base_out.dtype)

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base layer applied without its bias (DoRA under dropout)."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.lora_magnitude_vector is None:
            return super().merge_weight(weight, base_layer)
        norm = self._weight_norm(base_layer)
        self._merged_norm = norm
        merged = self.canonical(weight, base_layer) + self.lora_weight() * self.scaling
        factor = (self.lora_magnitude_vector.flatten() / norm).view(-1, *([1] * (merged.ndim - 1)))
        return self.canonical((factor * merged).to(weight.dtype), base_layer)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.lora_magnitude_vector is None:
            return super().unmerge_weight(weight, base_layer)
        norm = self._merged_norm
        canonical = self.canonical(weight, base_layer)
        factor = (self.lora_magnitude_vector.flatten() / norm).view(-1, *([1] * (canonical.ndim - 1)))
        orig = canonical / factor - self.lora_weight() * self.scaling
        return self.canonical(orig.to(weight.dtype), base_layer)


class LoraLinear(LoraDelta):
    """LoRA on ``nn.Linear`` and transformers ``Conv1D`` (whose weight is stored transposed)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__(r, alpha, dropout, use_rslora)
        out_features, in_features = self.canonical(base_layer.weight, base_layer).shape
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)

    @staticmethod
    def canonical(weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.T if isinstance(base_layer, Conv1D) else weight

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def lora_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in)

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return F.linear(x, self.canonical(base_layer.weight, base_layer).to(x.dtype))


class LoraConv(LoraDelta):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base kernel, stride and padding; B a 1×…×1 conv."""

    channel_dim = 1

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__(r, alpha, dropout, use_rslora)
        conv = type(base_layer)
        self.lora_A = conv(
            base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride, base_layer.padding,
            base_layer.dilation, bias=False,
        )
        self.lora_B = conv(r, base_layer.out_channels, 1, 1, bias=False)

    def stored_magnitude(self, m: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self._channel_view(m, base_layer.weight.ndim)  # peft's conv layout: (1, out, 1, ...)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def lora_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in, *k), (out, r, 1...)
        return torch.einsum("or,ri...->oi...", b.flatten(1), a)

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_layer._conv_forward(x, base_layer.weight.to(x.dtype), None)


class LoraEmbedding(LoraDelta):
    """LoRA on ``nn.Embedding``: ``ΔW = (B A)ᵀ``, looked up like the base table. DoRA is not supported here."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__(r, alpha, dropout, use_rslora)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, r))
        self._lookup = dict(
            padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
            scale_grad_by_freq=base_layer.scale_grad_by_freq, sparse=base_layer.sparse,
        )

    @staticmethod
    def canonical(weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.T  # (num_embeddings, dim) <-> (dim, num_embeddings)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dropout is not applied to token ids.
        return F.embedding(x, self.lora_embedding_A.T, **self._lookup) @ self.lora_embedding_B.T

    def lora_weight(self) -> torch.Tensor:
        return self.lora_embedding_B @ self.lora_embedding_A  # (dim, num_embeddings)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out + (self.lora_forward(x) * self.scaling).to(base_out.dtype)


# --- initialisation ------------------------------------------------------------------------------------------------

def _init_ab(delta: LoraDelta, scheme: bool | str) -> None:
    """Random A (and B when ``scheme`` is False); B = 0 otherwise, so the delta starts at zero."""
    if isinstance(delta, LoraEmbedding):  # peft's convention: A = 0, B ~ N(0, 1)
        a, b = delta.lora_embedding_A, delta.lora_embedding_B
        nn.init.normal_(b)
        if scheme is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)
        return
    a, b = delta.lora_A.weight, delta.lora_B.weight
    if scheme == "gaussian":
        nn.init.normal_(a, std=1 / delta.r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if scheme is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


@torch.no_grad()
def _init_from_weight(delta: LoraDelta, base_layer: nn.Module, scheme: str) -> None:
    """PiSSA / OLoRA: A and B span the principal part of W₀ and W₀ keeps the residual, so the initial output is
    unchanged while the adapter starts on the directions that matter most."""
    weight = delta.canonical(base_layer.weight, base_layer).float()  # (out, in)
    r = delta.r
    if scheme == "olora":
        q, rr = torch.linalg.qr(weight)
        b, a = q[:, :r], rr[:r]
        b, a = b / math.sqrt(delta.scaling), a / math.sqrt(delta.scaling)
    else:
        if scheme == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        else:
            niter = int(scheme.rsplit("_", 1)[-1])
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
            vh = v.T
        root = torch.sqrt(s[:r] / delta.scaling)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
    delta.lora_A.weight.copy_(a)
    delta.lora_B.weight.copy_(b)
    residual = weight - delta.scaling * (b @ a)
    base_layer.weight.copy_(delta.canonical(residual, base_layer).to(base_layer.weight.dtype))


# First match wins: base layer types -> the delta class that knows their shapes.
_LAYER_CLASSES: tuple[tuple[tuple[type[nn.Module], ...], type[LoraDelta]], ...] = (
    ((nn.Linear, Conv1D), LoraLinear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), LoraConv),
    ((nn.Embedding,), LoraEmbedding),
)


def check_target(config: LoraConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a module this config cannot adapt although its type is supported. Injection calls this for every target
    before the first :func:`make_delta`, because PiSSA / OLoRA initialisation rewrites the base weight.

    Raises:
        TargetError: a grouped convolution, DoRA on an embedding, or PiSSA / OLoRA on a layer other than Linear/Conv1D.
    """
    scheme = config.init_lora_weights
    if isinstance(base_layer, nn.modules.conv._ConvNd) and base_layer.groups != 1:
        raise TargetError(f"{name}: LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
    if config.use_dora and isinstance(base_layer, nn.Embedding):
        raise TargetError(f"{name}: DoRA supports Linear, Conv1D and Conv layers, not Embedding")
    if isinstance(scheme, str) and scheme != "gaussian" and not isinstance(base_layer, (nn.Linear, Conv1D)):
        raise TargetError(f"{name}: init_lora_weights={scheme!r} supports Linear and Conv1D layers only")


def make_delta(config: LoraConfig, base_layer: nn.Module, name: str) -> LoraDelta:
    """Build and initialise the LoRA delta for ``base_layer`` (module ``name``), honouring rank/alpha patterns."""
    check_target(config, base_layer, name)
    if isinstance(base_layer, Conv1D):
        config.fan_in_fan_out = True  # recorded as peft records it; readers such as vLLM take the layout from here
    cls = next(c for types, c in _LAYER_CLASSES if isinstance(base_layer, types))
    r = pattern_value(config.rank_pattern, name, config.r)
    alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
    delta = cls(base_layer, r, alpha, config.lora_dropout, config.use_rslora)
    weight = base_layer.weight
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    delta.to(device=weight.device, dtype=dtype)
    scheme = config.init_lora_weights
    if isinstance(scheme, str) and scheme not in ("gaussian",):
        _init_from_weight(delta, base_layer, scheme)
    elif weight.device.type != "meta":
        _init_ab(delta, scheme)
    if config.use_dora:
        delta.enable_dora(base_layer)
    return delta


METHOD = LayerMethod(
    config_class=LoraConfig,
    make_delta=make_delta,
    layer_types=tuple(t for types, _ in _LAYER_CLASSES for t in types),
    check_target=check_target,
)

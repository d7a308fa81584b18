"""LoRA: a trainable low-rank update ``ΔW = (α / r) · B A`` next to a frozen weight.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1: ``h = W₀x + (α/r)·BAx`` with
``A ∈ R^{r×k}`` and ``B ∈ R^{d×r}``; ``B = 0`` at init so training starts from the base model.

Variants, each a small piece on top of the same delta:

* rsLoRA (Kalajdzievski, 2023, §3): scale by ``α / √r`` so the update's magnitude does not shrink with rank.
* DoRA (Liu et al., 2024, §4.1, §4.3): ``W' = m · (W₀ + ΔW) / ‖W₀ + ΔW‖`` per output channel with a trainable
  magnitude ``m``; a variant strategy the delta holds, in ``methods/dora.py``.
* ``lora_bias``: a trainable bias on B (peft's ``lora_B.bias``), so the update is ``(α/r)·(BAx + b)``, for LoRA
  extracted from a full fine-tune whose biases changed too; zero at init, folded into the base bias on merge (a base
  layer without a bias cannot merge it). Linear, Conv1D and Conv layers; not with DoRA.
* The variants of ``methods/lora_variants.py`` (KaSA, VeLoRA, MonteCLoRA, BD-LoRA, QALoRA, Arrow; one file each), selected
  by their config field, each a strategy a Linear / Conv1D delta (:class:`LoraVariantLinear`) hands its update to.
* Init schemes: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r)), ``False`` (both random: a
  non-zero delta, for tests), ``"pissa"`` / ``"pissa_niter_N"`` (Meng et al., 2024: A, B from the top-r singular
  triplets of W₀; W₀ keeps the residual), ``"olora"`` (Büyükakyüz, 2024: A, B from a QR decomposition of W₀).

Layer types: ``nn.Linear``, transformers ``Conv1D`` (weight stored ``(in, out)``, i.e. fan_in_fan_out),
``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (grouped ones too, unmerged only), ``nn.Embedding`` and
``nn.MultiheadAttention`` (its in-projection and ``out_proj``). Parameter names follow peft (``lora_A.weight``,
``lora_B.weight``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``) so saved keys match.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import AdapterStateError, ConfigError, TargetError
from ..kernels import LowRank, accumulate, add_low_rank, add_low_rank_rows, index_accumulate
from ..layers import AdapterLayer, Delta, unwrap
from ..registry import LayerMethod
from ..targeting import find_modules_to_save, find_targets, iter_candidates, name_matches, pattern_value
from .alora import ActivatedLora, check_invocation_tokens
from .common import adapter_dtype, check_dropout, check_patterns, check_scale, embed_scale
from . import lora_init, lora_variants
from ._lora_variant import LoraVariant
from .dora import DoraVariant
from .lora_arrow import ArrowConfig
from .lora_bdlora import BdLoraConfig
from .lora_eva import get_eva_state_dict, initialize_lora_eva_weights
from .lora_init import (
    CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig, preprocess_corda, preprocess_loraga, replace_lora_weights_loftq,
)
from .lora_kasa import KasaConfig, check_model as _check_kasa_model, kasa_loss
from .lora_monteclora import MontecloraConfig, monteclora_loss
from .lora_replication import replicate_layers, restore_layers
from .lora_velora import VeloraConfig
from .trainable_tokens import check_rows, check_token_indices, input_embedding_name, make_token_adapter

__all__ = [  # exported from deltatune
    "ArrowConfig", "BdLoraConfig", "KasaConfig", "LoraConfig", "LoraRuntimeConfig", "MontecloraConfig", "VeloraConfig",
    *lora_init.__all__,
    "get_eva_state_dict", "initialize_lora_eva_weights",
]

_INIT_SCHEMES = (True, False, "gaussian", "pissa", "olora", *lora_init.CHECKED)
# Subspace iterations of fast PiSSA; a handful is the practice (peft's docs use 4-16). The bound stops a config file
# from asking for hours of SVD work at load time.
_MAX_PISSA_NITER = 1024


@dataclass
class LoraRuntimeConfig:
    """Settings of the run, not of the adapter (peft's ``LoraConfig.runtime_config``, never saved).

    Attributes:
        ephemeral_gpu_offload: peft computes DoRA's initial weight norm on a GPU for a base kept on the CPU; deltatune
            computes it where the base weight lives, so ``True`` is refused where a GPU exists (without one, peft
            does nothing with it either).
    """

    ephemeral_gpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.ephemeral_gpu_offload and torch.cuda.is_available():
            raise ConfigError("LoraRuntimeConfig(ephemeral_gpu_offload=True) is not implemented by deltatune (DoRA's "
                              "initial weight norm is computed where the base weight lives); leave it False")


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
        init_lora_weights: ``True``, ``False``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, or
            one of ``methods/lora_init.py``: ``"orthogonal"``, ``"mica"``, ``"corda"``, ``"lora_ga"``, ``"loftq"``,
            or ``"eva"`` (a plain LoRA until ``initialize_lora_eva_weights``, ``methods/lora_eva.py``).
        loftq_config: ``init_lora_weights="loftq"``'s :class:`LoftQConfig`, kept as a dict (as peft).
        eva_config: ``init_lora_weights="eva"``'s :class:`EvaConfig` (default: its defaults).
        corda_config: ``init_lora_weights="corda"``'s :class:`CordaConfig` (default: its defaults).
        lora_ga_config: ``init_lora_weights="lora_ga"``'s :class:`LoraGAConfig` (required).
        rank_pattern: ``{module-name pattern: r}`` overriding ``r`` for matching modules (regex on the name suffix).
        alpha_pattern: ``{module-name pattern: alpha}`` overriding ``lora_alpha`` likewise.
        lora_bias: A trainable bias on ``lora_B`` (saved as ``lora_B.bias``), scaled like the update; zero at init.
        target_parameters: Parameter names to adapt directly (peft's rule: ``"<module>.<parameter>"`` equals an
            entry or ends with ``"." + entry``), for weights no layer type wraps: MoE experts stored as one 3-D
            ``nn.Parameter`` per projection (``["experts.gate_up_proj", "experts.down_proj"]`` on Mixtral,
            Qwen3-MoE, GPT-OSS). Each expert gets its own rank-``r`` update. Set ``target_modules=[]`` to adapt only
            these. Not with ``lora_dropout``, ``use_dora``, ``lora_bias``, ``fan_in_fan_out`` or a data-driven init.
        trainable_token_indices: Token rows of an embedding that train in full beside the LoRA update (new
            tokens): a list of ids for the input embedding, or ``{embedding name: ids}``. peft's trainable tokens
            (``methods/trainable_tokens.py``) inside this adapter, saved as ``<path>.token_adapter.
            trainable_tokens_delta``; a head tied to the embedding follows its rows. Such an embedding cannot also be
            a ``target_modules`` target (nor in peft).
        layer_replication: ``[[start, end), ...]`` ranges of decoder layers stacked into a new, deeper layer list
            before the adapter is added (``[[0, 4], [2, 5]]`` turns layers 0-4 into 0 1 2 3 2 3 4), as peft does: the
            copies share the base weights, each copy gets its own adapter, and the model stays that deep (also after
            ``unload``). Such an adapter does not merge (the copies' updates would meet in one shared weight).
        alora_invocation_tokens: Activated LoRA (``methods/alora.py``): the token ids that invoke the adapter; it
            applies only from the start of their last occurrence in each row on, so everything before (and its KV
            cache) is the base model's. Linear / Conv1D targets only; not merged; not with DoRA or a data-driven
            init. ``forward`` / ``generate`` also take peft's ``alora_offsets`` (per row, counted from the end).
        ensure_weight_tying: Keep the adapters of tied layers (an LM head sharing the input embedding's weight,
            T5's ``encoder`` / ``decoder`` ``embed_tokens`` beside ``shared``) tied, as peft: with a tied module in
            ``target_modules`` the input embedding is a target too and every module sharing its table uses its one
            pair of LoRA parameters (a head transposed, :class:`TiedLoraHead`; another embedding as it is,
            :class:`TiedLoraEmbedding`), saved under each module's keys; with one in ``modules_to_save`` every
            module tied to it gets a copy too, all copies sharing one weight. Merging changes the table once. Without it each tied module trains apart (peft's default). For
            ``trainable_token_indices`` tied modules always follow the rows. Warns where there is nothing to tie.
        kasa_config: KaSA (``KasaConfig``, ``methods/lora_kasa.py``): the base weight loses its ``r`` weakest singular
            directions and the update is ``B diag(ΔΣ) A``. nn.Linear only.
        velora_config: VeLoRA (``VeloraConfig``, ``methods/lora_velora.py``): ``A``'s backward keeps compressed
            activations. Linear / Conv1D.
        monteclora_config: MonteCLoRA (``MontecloraConfig``, ``methods/lora_monteclora.py``): ``A`` is a Monte Carlo
            average of perturbations while training. Linear / Conv1D.
        use_bdlora: BD-LoRA (``BdLoraConfig``, ``methods/lora_bdlora.py``): a block-diagonal ``A`` or ``B``. nn.Linear.
        use_qalora: QALoRA (``methods/lora_qalora.py``): ``A`` reads the input pooled over ``qalora_group_size``
            features. Linear / Conv1D, quantized or not.
        qalora_group_size: Features pooled into one by QALoRA.
        arrow_config: Arrow (``ArrowConfig``, ``methods/lora_arrow.py``): this adapter routes each token over the
            layer's other LoRA adapters; ``deltatune.create_arrow_model`` builds one from a library. Not mergeable.
        Of these (and ``use_dora``), an adapter uses at most one.
        runtime_config: :class:`LoraRuntimeConfig` (or its dict), left out of ``adapter_config.json`` as in peft.
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
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    layer_replication: list[list[int]] | None = None
    ensure_weight_tying: bool = False
    kasa_config: KasaConfig | dict | None = None
    velora_config: VeloraConfig | dict | None = None
    monteclora_config: MontecloraConfig | dict | None = None
    use_bdlora: BdLoraConfig | dict | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    alora_invocation_tokens: list[int] | None = None
    arrow_config: ArrowConfig | dict | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: EvaConfig | None = None
    corda_config: CordaConfig | None = None
    lora_ga_config: LoraGAConfig | None = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)

    # peft LoRA features not implemented here; a file that switches one on is refused (see config.py).
    _unsupported: ClassVar[dict[str, Any]] = {
        **dict.fromkeys(
            (
                "megatron_config",
            )
        ),
    }

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        del out["runtime_config"]  # how this run computes, not what the adapter is (peft leaves it out too)
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if not isinstance(self.runtime_config, LoraRuntimeConfig):
            raise ConfigError(f"runtime_config must be a LoraRuntimeConfig, got {type(self.runtime_config).__name__}")
        check_patterns(self.r, self.rank_pattern, self.alpha_pattern)
        check_scale("lora_alpha", self.lora_alpha)
        check_dropout("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        niter = re.fullmatch(r"pissa_niter_(\d{1,6})", init) if isinstance(init, str) else None
        if init not in _INIT_SCHEMES and not (niter and int(niter.group(1)) <= _MAX_PISSA_NITER):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; use one of {list(_INIT_SCHEMES)} or 'pissa_niter_N' "
                f"with N <= {_MAX_PISSA_NITER}"
            )
        if self.use_dora and isinstance(init, str) and init not in ("gaussian", "orthogonal"):
            raise ConfigError(f"use_dora cannot be combined with init_lora_weights={init!r}")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True cannot be combined with use_dora=True (nor in peft); pass one of them")
        if self.lora_bias and not isinstance(init, bool):  # peft's rule: the bias has no data-driven init
            raise ConfigError(
                f"lora_bias=True supports init_lora_weights=True or False only, got init_lora_weights={init!r}"
            )
        self._check_target_parameters()
        lora_variants.check_config(self)
        self._init_subconfigs()
        self.alora_invocation_tokens = check_invocation_tokens(self, rewrites_base_weights(self))
        replication = self.layer_replication
        if replication is not None and not (
            isinstance(replication, (list, tuple)) and replication
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                          for i in p) and 0 <= p[0] < p[1]
                    for p in replication)
        ):
            raise ConfigError(f"layer_replication must be a non-empty list of [start, end) layer ranges with "
                              f"0 <= start < end, got {replication!r}")
        if replication is not None:
            self.layer_replication = [list(p) for p in replication]
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            if not tokens or not all(isinstance(k, str) and k for k in tokens):
                raise ConfigError(f"trainable_token_indices must map embedding names to token ids, got {tokens!r}")
            self.trainable_token_indices = {k: check_token_indices(f"trainable_token_indices[{k!r}]", v)
                                            for k, v in tokens.items()}
        elif tokens is not None:
            self.trainable_token_indices = check_token_indices("trainable_token_indices", tokens)

    @property
    def rewriting_option(self) -> str | None:
        """The option that rewrites base weights when it is not the init scheme (for messages; ``resolve.py``)."""
        return "kasa_config (which truncates the base weight)" if self.kasa_config is not None else None

    @property
    def ties_modules_to_save(self) -> bool:
        """Whether the ``modules_to_save`` copies of tied layers share one weight (read by ``add_modules_to_save``)."""
        return ties_modules_to_save(self)

    def _init_subconfigs(self) -> None:
        """The init schemes' sub-configs as their classes (a dict as read from JSON converted; LoftQ's kept a dict,
        peft's type for it), then their combinations with ``init_lora_weights`` (``lora_init.check_config``)."""
        loftq = lora_init.subconfig("loftq_config", self.loftq_config or None, LoftQConfig)
        self.loftq_config = dataclasses.asdict(loftq) if loftq is not None else {}
        for name, cls in (("eva_config", EvaConfig), ("corda_config", CordaConfig), ("lora_ga_config", LoraGAConfig)):
            setattr(self, name, lora_init.subconfig(name, getattr(self, name), cls))
        if self.init_lora_weights == "eva" and self.eva_config is None:  # peft's defaults for these two
            self.eva_config = EvaConfig()
        if self.init_lora_weights == "corda" and self.corda_config is None:
            self.corda_config = CordaConfig()
        if self.init_lora_weights == "mica":  # MiCA is itself a variant in peft, which allows one per adapter
            clash = next((f for f in ("alora_invocation_tokens", *lora_variants.VARIANTS)
                          if getattr(self, f, None) not in (None, False, [])), None)
            if clash is not None:
                raise ConfigError(f"init_lora_weights='mica' cannot be combined with {clash} (nor in peft)")
        lora_init.check_config(self)

    def _check_target_parameters(self) -> None:
        """peft's limits for parameter targets: no module to apply dropout to the input of, nor a layer DoRA or a
        bias could belong to; data-driven inits read a layer's ``weight``."""
        names = self.target_parameters
        if names is None:
            return
        if isinstance(names, str):  # peft: "must be a list of strings"; a regex is not implemented there either
            raise TypeError(f"target_parameters must be a list of parameter names, not a string: {names!r}")
        if not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"target_parameters must be non-empty strings, got {names!r}")
        if isinstance(names, (set, tuple)):  # a set in meaning: the nesting follows the model's parameter order
            self.target_parameters = names = sorted(names)
        if not names:
            return
        clashes = {"lora_dropout": self.lora_dropout != 0, "use_dora": self.use_dora, "lora_bias": self.lora_bias,
                   "fan_in_fan_out": self.fan_in_fan_out, "alora_invocation_tokens": self.alora_invocation_tokens}
        for name, clash in clashes.items():
            if clash:
                raise ConfigError(
                    f"target_parameters cannot be combined with {name}={getattr(self, name)!r} (nor in peft): a "
                    f"parameter target has no layer input to drop out nor a layer output to rescale or bias"
                )
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"target_parameters supports init_lora_weights=True, False or 'gaussian', got "
                f"{self.init_lora_weights!r}"
            )


class LoraDelta(Delta):
    """Shared LoRA logic; subclasses supply the layer-type specifics (how A and B apply, the canonical weight layout
    ``(out, ...)`` and how to read it from the base layer). A DoRA adapter's delta holds a
    :class:`~deltatune.methods.dora.DoraVariant` in ``dora`` (``None`` for plain LoRA), which each hook whose math
    DoRA changes hands over to."""

    # Dimension of the base output that indexes output channels (DoRA's magnitude broadcasts along it).
    channel_dim: ClassVar[int] = -1

    def __init__(self, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__()
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dora: DoraVariant | None = None
        self.alora: ActivatedLora | None = None  # aLoRA: the update applies from the invocation tokens on
        self.replicated = False  # the adapter of a layer_replication copy: its base weight is shared, it never merges

    # --- what a layer type supplies -------------------------------------------------------------------------
    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled) in the layer's output layout."""
        raise NotImplementedError

    def lora_weight(self) -> torch.Tensor:
        """``B A`` (unscaled) in the canonical ``(out, in, ...)`` layout."""
        raise NotImplementedError

    def factors(self) -> LowRank:
        """The update as ``scaling · B A``: the parameters ``A`` ``(r, in, ...)`` and ``B`` ``(out, r, ...)``
        themselves (writing into them changes the adapter), in the layout of the canonical weight."""
        return LowRank(self.lora_A.weight, self.lora_B.weight, self.scaling)

    @staticmethod
    def base_weight(base_layer: nn.Module) -> torch.Tensor:
        """The base-layer weight this delta updates, in its stored layout."""
        return base_layer.weight

    @staticmethod
    def canonical(weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base weight as ``(out, in, ...)``; an involution (applying it twice gives the stored layout)."""
        return weight

    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + scaling · B A x`` for an ``x`` already through :meth:`adapter_input`. Layer types whose update is a
        plain matrix product override this with a fused one."""
        return accumulate(out, self.lora_forward(x), self.scaling)

    def add_lora_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scaling · B A`` for a canonical ``(out, in, ...)`` weight (overridden where one op does it)."""
        return torch.add(weight, self.lora_weight(), alpha=self.scaling)

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base layer applied without its bias (DoRA under dropout)."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of the factors (read from ``A``, not ``next(self.parameters())``: this runs on every forward,
        and walking the module tree there cost more than the rank-r product it prepares)."""
        a = self.lora_A
        return (a if isinstance(a, torch.Tensor) else a.weight).dtype

    def dropout_active(self) -> bool:
        """Whether dropout changes anything now (``p = 0`` is an ``nn.Identity`` that is never called)."""
        return self.training and isinstance(self.dropout, nn.Dropout)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the adapter's dtype with dropout applied (only while it does something: training, ``p > 0``);
        integer inputs (token ids) pass unchanged."""
        if not x.is_floating_point():
            return x
        x = x.to(self.adapter_dtype)
        return self.dropout(x) if self.dropout_active() else x

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.canonical(self.lora_weight() * self.scaling, base_layer)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = self.adapter_input(x)
        if self.dora is not None:
            return self.dora.forward(self, x, base_out, base_layer)
        if self.alora is not None:
            return self.alora.apply(base_out, self.lora_forward(x) * self.scaling)
        return self.add_update(base_out, x)

    def weighted_forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, weight: torch.Tensor
    ) -> torch.Tensor:
        """``base_out + weight · scaling · B A x``: a per-token weight ``(..., 1)`` commutes with the linear factors
        (X-LoRA scales the input, ``B A (w x)``, which is the same). Not for DoRA or ``lora_bias`` (not additive in
        ``x`` alone), which are refused."""
        if self.dora is not None or self.lora_bias is not None:
            raise AdapterStateError(
                f"a LoRA adapter with {'use_dora' if self.dora is not None else 'lora_bias'}=True cannot be weighted "
                f"per token (its update is not B A x alone); use plain LoRA adapters"
            )
        update = self.lora_forward(self.adapter_input(x))  # (..., out)
        return accumulate(base_out, update * weight.to(update.dtype), self.scaling)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """Plain-LoRA groups add ``scaling · B A x`` of their rows straight into those rows of ``out`` (one gather
        of the group's inputs, one indexed add; no copy of the whole output per adapter). DoRA groups, whose output
        is a rescaling rather than an addition, take the generic path."""
        for delta, rows in groups:
            if delta.alora is not None:  # its rows' own invocation offsets
                update = delta.lora_forward(delta.adapter_input(x.index_select(0, rows))) * delta.scaling
                out = out.index_copy(0, rows, delta.alora.apply(out.index_select(0, rows), update, len(x), rows))
            elif delta.dora is None:
                update = delta.lora_forward(delta.adapter_input(x.index_select(0, rows)))  # (rows, ..., out)
                out = index_accumulate(out, rows, update, delta.scaling)
        return super().batched_forward([(d, rows) for d, rows in groups if d.dora is not None], x, out, base_layer)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.dora is not None:
            return self.dora.merge_weight(self, weight, base_layer)
        return super().merge_weight(weight, base_layer)

    @property
    def lora_bias(self) -> torch.Tensor | None:
        """B's bias ``(out,)`` under ``lora_bias=True`` (the layer types that have one keep it on ``lora_B``)."""
        b = getattr(self, "lora_B", None)
        return getattr(b, "bias", None)

    def check_mergeable(self, base_layer: nn.Module) -> None:
        if self.alora is not None:
            self.alora.check_mergeable()
        if self.replicated:
            raise AdapterStateError(
                "this adapter uses layer_replication: the copies of a layer share its weight, so their updates cannot "
                "be merged into it (peft refuses this too); keep the adapter unmerged"
            )
        if self.lora_bias is not None and getattr(base_layer, "bias", None) is None:
            raise AdapterStateError(
                f"this adapter has lora_bias=True but the {type(base_layer).__name__} it adapts has no bias to fold "
                f"it into (peft cannot merge it either); keep the adapter unmerged"
            )

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        b = self.lora_bias
        return bias if b is None else bias + (b * self.scaling).to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        b = self.lora_bias
        return bias if b is None else bias - (b * self.scaling).to(bias.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.dora is not None:
            return self.dora.unmerge_weight(self, weight, base_layer)
        return super().unmerge_weight(weight, base_layer)


class LoraLinear(LoraDelta):
    """LoRA on ``nn.Linear`` and transformers ``Conv1D`` (whose weight is stored transposed)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool,
                 lora_bias: bool = False) -> None:
        super().__init__(r, alpha, dropout, use_rslora)
        out_features, in_features = self.canonical(self.base_weight(base_layer), base_layer).shape
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias)

    @staticmethod
    def canonical(weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.T if isinstance(base_layer, Conv1D) else weight

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight, self.lora_B.bias)

    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.lora_B.bias is not None:  # lora_bias: B x A + b in the general path; the fused addmm has no bias
            return super().add_update(out, x)
        return add_low_rank(out, F.linear(x, self.lora_A.weight), self.lora_B.weight, self.scaling)  # xa: (..., r)

    def lora_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in)

    def gatherable(self) -> bool:
        """Whether this delta's rows can join the gathered batched matmul of a mixed batch: plain LoRA without
        ``lora_bias``, no dropout mask to draw, both factors in one dtype."""
        return (self.dora is None and self.alora is None and not self.dropout_active() and self.lora_B.bias is None
                and self.lora_A.weight.dtype == self.lora_B.weight.dtype)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """Gatherable groups go through two batched matmuls for all adapters at once
        (:func:`deltatune.kernels.add_low_rank_rows`); everything else as in :meth:`LoraDelta.batched_forward`."""
        gathered: list[tuple[Delta, torch.Tensor]] = []
        rest: list[tuple[Delta, torch.Tensor]] = []
        dtype = None  # the gathered adapters' one dtype: that of the first gatherable delta
        for delta, rows in groups:
            if delta.gatherable() and dtype in (None, delta.lora_A.weight.dtype):
                dtype = delta.lora_A.weight.dtype
                gathered.append((delta, rows))
            else:
                rest.append((delta, rows))
        if not gathered or not out.is_contiguous():
            return super().batched_forward(groups, x, out, base_layer)
        updates = [(d.factors(), rows) for d, rows in gathered]
        return super().batched_forward(rest, x, add_low_rank_rows(updates, x, out), base_layer)

    def add_lora_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.addmm(weight, self.lora_B.weight, self.lora_A.weight, alpha=self.scaling)  # (out, in)

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return F.linear(x, self.canonical(base_layer.weight, base_layer).to(x.dtype))


class LoraVariantLinear(LoraLinear):
    """LoRA on a Linear / Conv1D whose adapter uses a variant (``methods/lora_variants.py``): the update, its weight
    and the layer's output are the variant's (``variant``, set by :func:`_build`); the fused and batched plain-LoRA
    paths, which read ``A`` and ``B`` as plain factors, are not taken."""

    variant: LoraVariant

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.lora_forward(self, x)

    def lora_weight(self) -> torch.Tensor:
        return self.variant.lora_weight(self)

    add_update = LoraDelta.add_update
    add_lora_weight = LoraDelta.add_lora_weight

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.variant.forward(self, x, base_out, base_layer)

    def attach(self, layer: AdapterLayer, name: str) -> None:
        self.variant.joined(self, layer.deltas)

    def gatherable(self) -> bool:
        return False

    def factors(self) -> LowRank:
        raise AdapterStateError(f"add_weighted_adapter cannot combine adapters with {self.variant.field}: their "
                                f"update is not the plain product B A it combines")

    def check_mergeable(self, base_layer: nn.Module) -> None:
        super().check_mergeable(base_layer)
        if self.variant.merge_refusal is not None:
            raise AdapterStateError(self.variant.merge_refusal)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        return Delta.batched_forward.__func__(cls, groups, x, out, base_layer)  # each group's own forward


class LoraConv(LoraDelta):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base kernel, stride and padding; B a 1×…×1 conv.

    On a grouped convolution (``groups = g``) B is grouped too, as in peft: output group ``j`` reads only channels
    ``j·r/g … (j+1)·r/g - 1`` of A's output (``r`` must divide by ``g``). A stays a full convolution, so the update
    mixes input groups, which a grouped weight cannot hold: such an adapter works unmerged only.
    """

    channel_dim = 1

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, dropout: float, use_rslora: bool,
                 lora_bias: bool = False):
        super().__init__(r, alpha, dropout, use_rslora)
        conv = type(base_layer)
        self.lora_A = conv(
            base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride, base_layer.padding,
            base_layer.dilation, bias=False,
        )
        self.lora_B = conv(r, base_layer.out_channels, 1, 1, groups=base_layer.groups, bias=lora_bias)  # (out, r/g, 1…)
        self.groups = base_layer.groups

    def check_mergeable(self, base_layer: nn.Module) -> None:
        if base_layer.groups > 1:
            raise AdapterStateError(
                f"LoRA on a grouped convolution (groups={base_layer.groups}) changes the layer across groups, which "
                f"its grouped weight cannot hold (peft does not merge it either); keep the adapter unmerged"
            )

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def lora_weight(self) -> torch.Tensor:
        """``B A`` as a weight of the base's shape ``(out, in/g, *k)``: the factors flattened to ``(·, r)`` and
        ``(r, ·)``, multiplied, reshaped. Without groups this is the update exactly; on a grouped convolution the
        update mixes input groups and has no such weight (so it never merges), and this is peft's stand-in, which
        DoRA's per-channel norm reads, so that magnitudes interchange with peft's."""
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in, *k), (out, r/g, 1...)
        out, in_per_group = b.shape[0], a.shape[1] // self.groups
        return (b.reshape(-1, self.r) @ a.reshape(self.r, -1)).reshape(out, in_per_group, *a.shape[2:])

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_layer._conv_forward(x, base_layer.weight.to(x.dtype), None)


class LoraMultiheadAttention(LoraLinear):
    """LoRA on ``nn.MultiheadAttention``: one low-rank update of the packed q/k/v in-projection ``(3·E, E)`` here
    and one of ``out_proj``, as peft lays them out (``lora_A`` ``(r, E)``, ``lora_B`` ``(3·E, r)``; the ``out_proj``
    update is a :class:`LoraLinear` in an adapter layer around ``out_proj``, see :meth:`attach`).

    The module reads both weights directly instead of calling a layer, so the update cannot be added to its output:
    the deltas run the base module themselves (:meth:`run_layer`) on ``W + scaling · B A`` for both weights, which is
    also what merging stores. Hence, as in peft, ``lora_dropout`` has no effect here. Mixed-adapter batches are not
    supported (nor are they in peft).
    """

    def __init__(self, base_layer: nn.MultiheadAttention, out_proj: LoraLinear, r: int, alpha: float, dropout: float,
                 use_rslora: bool) -> None:
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # Held, not registered: its parameters live (and are saved) in the adapter layer around out_proj.
        object.__setattr__(self, "out_proj", out_proj)

    @staticmethod
    def base_weight(base_layer: nn.Module) -> torch.Tensor:
        return base_layer.in_proj_weight  # (3E, E)

    def attach(self, layer: AdapterLayer, name: str) -> None:
        mha = layer.base_layer
        if not isinstance(mha.out_proj, AdapterLayer):
            mha.out_proj = AdapterLayer(mha.out_proj)  # the module still reads out_proj.weight through the wrapper
        mha.out_proj.add_delta(name, self.out_proj)

    @classmethod
    def run_layer(cls, deltas: Sequence[LoraMultiheadAttention], base_layer: nn.Module, x: torch.Tensor, *args,
                  **kwargs) -> torch.Tensor:
        """The attention module run (``torch.func.functional_call``) on its in-projection and ``out_proj`` weights
        with every delta in ``deltas`` merged in, differentiably; the out_proj update is that delta's own, held in the
        adapter layer around ``out_proj``."""
        out_layer = base_layer.out_proj
        in_weight, out_weight = base_layer.in_proj_weight, out_layer.base_layer.weight  # (3E, E), (E, E)
        for delta in deltas:
            if any(out_layer.deltas[n] is delta.out_proj for n in out_layer.merged_adapters):
                raise AdapterStateError(
                    "this adapter is merged into out_proj of a MultiheadAttention but not into its in-projection; "
                    "merge and unmerge through the model (merge_adapter / unmerge_adapter) so both move together"
                )
            in_weight = delta.merge_weight(in_weight, base_layer)
            out_weight = delta.out_proj.merge_weight(out_weight, out_layer.base_layer)
        weights = {"in_proj_weight": in_weight, "out_proj.base_layer.weight": out_weight}
        return torch.func.functional_call(base_layer, weights, (x, *args), kwargs)

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"in_proj_weight": self.merge_weight(params["in_proj_weight"], base_layer)}  # out_proj: its own layer

    def unmerged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"in_proj_weight": self.unmerge_weight(params["in_proj_weight"], base_layer)}

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        raise AdapterStateError(
            "adapter_names (mixed-adapter batches) is not supported for LoRA on nn.MultiheadAttention (nor in peft); "
            "run one adapter per batch"
        )


class LoraEmbedding(LoraDelta):
    """LoRA on ``nn.Embedding``: ``ΔW = (B A)ᵀ``, looked up like the base table. With DoRA (as peft) the "output
    channels" are the embedding dimensions: the magnitude ``(dim,)`` rescales each dimension of the looked-up rows by
    ``m / ‖W₀ + ΔW‖`` taken over the vocabulary.

    A scaled embedding (Gemma's, whose forward returns ``embed_scale · W[x]``) scales the update's rows too
    (``common.embed_scale``, read at each call as peft does): unmerged, ``embed_scale · (W₀ + ΔW)[x]``, which is
    what the merged table ``W₀ + ΔW`` gives; ``ΔW`` and DoRA's norm stay unscaled."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__(r, alpha, dropout, use_rslora)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, r))
        self._lookup = dict(
            padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
            scale_grad_by_freq=base_layer.scale_grad_by_freq, sparse=base_layer.sparse,
        )
        # Held, not registered (its embed_scale is read at each call, so it follows the module's .to() and edits)
        object.__setattr__(self, "_embedding", base_layer)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.lora_embedding_A.dtype

    def factors(self) -> LowRank:
        return LowRank(self.lora_embedding_A, self.lora_embedding_B, self.scaling)  # (r, num_embeddings), (dim, r)

    @staticmethod
    def canonical(weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.T  # (num_embeddings, dim) <-> (dim, num_embeddings)

    def _lookup_a(self, x: torch.Tensor) -> torch.Tensor:
        """``embed_scale · A[x]`` ``(..., r)``: the scale applied to the rank-r rows, before ``B``, where it costs
        least; no dropout on token ids."""
        rows = F.embedding(x, self.lora_embedding_A.T, **self._lookup)
        scale = embed_scale(self._embedding)
        return rows if scale is None else rows * scale.to(rows.dtype)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._lookup_a(x) @ self.lora_embedding_B.T

    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_low_rank(out, self._lookup_a(x), self.lora_embedding_B, self.scaling)

    def lora_weight(self) -> torch.Tensor:
        return self.lora_embedding_B @ self.lora_embedding_A  # (dim, num_embeddings)

    def base_no_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        out = F.embedding(x, base_layer.weight, **self._lookup)  # (..., dim)
        scale = embed_scale(base_layer)
        return out if scale is None else out * scale.to(out.dtype)


class _Transposed(nn.Module):
    """A factor read as the transpose of another delta's parameter: a tied head's ``A`` / ``B`` are its embedding's
    ``B`` / ``A``, the very parameters, so the pair trains one tensor each."""

    bias = None

    def __init__(self, tied: nn.Parameter) -> None:
        super().__init__()
        self.tied = tied

    @property
    def weight(self) -> torch.Tensor:
        return self.tied.T


class _FollowsSource:
    """A tied twin's merge: nothing of its own. Its weight is the very tensor of its source's, into which the source's
    layer merges (and unmerges) the one update, so the table changes once however many modules share it. With DoRA
    each module keeps its own magnitude (as peft), so the one table cannot hold them all: such an adapter does not
    merge (the twin refuses, which refuses the whole merge before any weight changes)."""

    dora: DoraVariant | None
    follows_source = True

    def check_mergeable(self, base_layer: nn.Module) -> None:
        if self.dora is not None:
            raise AdapterStateError(
                "use_dora=True with ensure_weight_tying: the tied modules share one table but each rescales it by its "
                "own DoRA magnitude, so no single merged table reproduces them all; keep the adapter unmerged"
            )
        super().check_mergeable(base_layer)

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight


class TiedLoraHead(_FollowsSource, LoraLinear):
    """LoRA on an ``nn.Linear`` head whose weight is the input embedding's (``ensure_weight_tying``): its update is
    the embedding's, ``ΔW_head = B_h A_h = A_eᵀ B_eᵀ = (B_e A_e)ᵀ = ΔE``, so head and table stay one matrix, also
    merged. As peft: ``A_h = B_eᵀ`` ``(r, dim)``, ``B_h = A_eᵀ`` ``(vocab, r)``, the embedding's scaling, the config's
    dropout on the head's input; saved under the head's own ``lora_A.weight`` / ``lora_B.weight`` too."""

    def __init__(self, source: LoraEmbedding) -> None:
        LoraDelta.__init__(self, source.r, 1.0, 0.0, False)
        self.scaling = source.scaling
        self.dropout = source.dropout
        self.lora_A = _Transposed(source.lora_embedding_B)  # weight: (r, dim)
        self.lora_B = _Transposed(source.lora_embedding_A)  # weight: (vocab, r)

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        own = {k: v for k, v in super().saved_state_dict().items() if not k.endswith(".tied")}  # DoRA's magnitude
        return {**own, "lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}

    def state_from_saved(
        self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        names = {"lora_A.weight": "lora_A.tied", "lora_B.weight": "lora_B.tied"}
        return {names.get(k, k): v.T if k in names else v for k, v in saved.items()}


class TiedLoraEmbedding(_FollowsSource, LoraEmbedding):
    """LoRA on an ``nn.Embedding`` whose table is another LoRA embedding's (T5 / mT5: ``encoder.embed_tokens`` and
    ``decoder.embed_tokens`` beside ``shared``) under ``ensure_weight_tying``: it holds the source's very
    ``lora_embedding_A`` ``(r, vocab)`` / ``lora_embedding_B`` ``(dim, r)`` (one pair of parameters for the whole
    tie, so training keeps them one), looks rows up through its own module (its ``padding_idx``, ``embed_scale``),
    and is saved under its own path too, the keys peft writes for each tied embedding."""

    def __init__(self, source: LoraEmbedding, base_layer: nn.Embedding) -> None:
        with torch.device("meta"):  # the factors are the source's, set below
            super().__init__(base_layer, source.r, 1.0, 0.0, False)
        self.scaling = source.scaling
        self.lora_embedding_A = source.lora_embedding_A
        self.lora_embedding_B = source.lora_embedding_B


def make_tied_delta(source: Delta, base_layer: nn.Module, name: str) -> TiedLoraHead | TiedLoraEmbedding:
    """``LayerMethod.make_tied_delta`` under ``ensure_weight_tying``: module ``name``, whose weight is a LoRA
    embedding's table, shares that embedding's LoRA: an LM head as :class:`TiedLoraHead`, another embedding (T5's
    ``embed_tokens``) as :class:`TiedLoraEmbedding`. The source is the model's input embedding wherever the model
    names one (:func:`find_lora_targets` makes it a target, as peft does).

    With DoRA the twin has a magnitude of its own (peft's), taken from the table: ``‖W₀ + ΔW‖`` per output row of a
    head ``(vocab,)``, per dimension of an embedding ``(dim,)``.

    Raises:
        TargetError: the tied module is neither an ``nn.Linear`` nor an ``nn.Embedding`` of the table's shape, or the
            LoRA sits on a head of a model without ``get_input_embeddings`` (peft ties from the input embedding).
    """
    if not isinstance(source, LoraEmbedding):
        raise TargetError(
            f"ensure_weight_tying=True: {name} shares its weight with a LoRA target that is not an embedding; the "
            f"tied adapter is built from the input embedding's LoRA (as in peft), so add the input embedding to "
            f"target_modules, or leave ensure_weight_tying off"
        )
    vocab, dim = source.lora_embedding_A.shape[1], source.lora_embedding_B.shape[0]
    shape = tuple(getattr(base_layer, "weight", torch.empty(0)).shape)
    if type(base_layer) not in (nn.Linear, nn.Embedding) or shape != (vocab, dim):
        raise TargetError(
            f"ensure_weight_tying=True: {name} ({type(base_layer).__name__}) is tied to a LoRA embedding, but only "
            f"an nn.Linear head or an nn.Embedding of the embedding's shape can share its LoRA factors; leave "
            f"ensure_weight_tying off"
        )
    twin = TiedLoraHead(source) if type(base_layer) is nn.Linear else TiedLoraEmbedding(source, base_layer)
    if source.dora is not None:
        twin.dora = DoraVariant.for_delta(twin, base_layer)
    return twin


class LoraParameter(LoraDelta):
    """LoRA on one ``nn.Parameter`` of a module (``target_parameters``): a 2-D weight ``(out, in)``, or a 3-D stack
    of ``E`` expert weights, each expert with its own rank-``r`` update ``ΔW_e = scaling · B_e A_e``.

    Why a parameter and not a layer: transformers' MoE blocks (Mixtral, Qwen3-MoE, GPT-OSS) keep all experts of one
    projection in one tensor and index it inside their own forward, so there is no per-expert ``nn.Linear`` to wrap;
    the module is run (``run_layer``) on ``W + ΔW`` instead, differentiably, and a merge adds ``ΔW`` to the tensor.

    peft's layout, kept for its saved keys: ``lora_A.weight`` is ``(E·r, in)`` with expert ``e`` in rows
    ``e·r .. e·r+r-1``; ``lora_B.weight`` is ``(out, r·E)`` with expert ``e`` in columns ``e, e+E, e+2E, ...``
    (``(out, r, E)`` flattened). A 3-D stack is ``(E, out, in)`` (used as ``x Wₑᵀ``), or ``(E, in, out)`` for a module
    with ``is_transposed=True`` (GPT-OSS: ``x Wₑ``); a 2-D weight is ``(out, in)``.
    """

    def __init__(self, param: torch.Tensor, parameter_name: str, transposed: bool, r: int, alpha: float,
                 use_rslora: bool) -> None:
        super().__init__(r, alpha, 0.0, use_rslora)
        self.parameter_name = parameter_name
        self.num_experts = param.shape[0] if param.dim() == 3 else 1
        self.stacked = param.dim() == 3
        self.transposed = transposed and self.stacked
        out_features, in_features = param.shape[-2:][::-1] if self.transposed else param.shape[-2:]
        self.lora_A = nn.Linear(in_features, r * self.num_experts, bias=False)
        self.lora_B = nn.Linear(r * self.num_experts, out_features, bias=False)

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``ΔW = scaling · lhs @ rhs`` in the parameter's own layout, batched over experts:
        ``B_e (E, out, r) @ A_e (E, r, in)``, or ``A_eᵀ (E, in, r) @ B_eᵀ (E, r, out)`` for a transposed stack."""
        e = self.num_experts
        a = self.lora_A.weight.view(e, self.r, -1)  # (E, r, in)
        b = self.lora_B.weight.view(-1, self.r, e).permute(2, 0, 1)  # (E, out, r)
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + ΔW`` in one fused op (no separate ``ΔW`` the size of the whole expert stack)."""
        lhs, rhs = self.expert_factors()
        lhs, rhs = lhs.to(weight.dtype), rhs.to(weight.dtype)
        if not self.stacked:
            return torch.addmm(weight, lhs[0], rhs[0], alpha=self.scaling)
        return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling)

    def lora_weight(self) -> torch.Tensor:
        lhs, rhs = self.expert_factors()
        product = lhs @ rhs
        return product if self.stacked else product[0]

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.lora_weight() * self.scaling

    def factors(self) -> LowRank:
        raise AdapterStateError(
            "an adapter with target_parameters has per-expert factors, which add_weighted_adapter cannot combine "
            "(peft refuses it too)"
        )

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        weight = params[self.parameter_name]
        return {self.parameter_name: self.add_to(weight)}

    def unmerged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        weight = params[self.parameter_name]
        return {self.parameter_name: weight - self.delta_weight(base_layer).to(weight.dtype)}

    @classmethod
    def run_layer(cls, deltas: Sequence[LoraParameter], base_layer: nn.Module, x: torch.Tensor, *args,
                  **kwargs) -> torch.Tensor:
        """The module run on its parameter plus every active delta's update (``torch.func.functional_call``, so the
        module's forward, whichever experts implementation it dispatches to, reads ``W + ΔW``). ``base_layer`` may
        be the adapter layer of the module's next parameter: the path then goes through it, so that layer's update
        applies too."""
        name = deltas[0].parameter_name
        weight = getattr(base_layer, name)  # the innermost module's tensor, through any wrappers
        for delta in deltas:
            weight = delta.add_to(weight)
        path, module = name, base_layer
        while isinstance(module, AdapterLayer):
            path, module = "base_layer." + path, module.base_layer
        return torch.func.functional_call(base_layer, {path: weight}, (x, *args), kwargs)

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        raise AdapterStateError(
            "adapter_names (mixed-adapter batches) is not supported for target_parameters (nor in peft); run one "
            "adapter per batch"
        )


def make_parameter_delta(config: LoraConfig, module: nn.Module, parameter_name: str, name: str) -> LoraParameter:
    """The LoRA delta for parameter ``parameter_name`` of ``module`` (full name ``name``, which rank/alpha pattern
    keys match, as in peft), initialised like ``nn.Linear`` LoRA."""
    param = module.get_parameter(parameter_name)
    r = pattern_value(config.rank_pattern, name, config.r)
    alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
    transposed = bool(getattr(module, "is_transposed", False))  # transformers' experts flag (GPT-OSS: True)
    with torch.device("meta"):
        delta = LoraParameter(param, parameter_name, transposed, r, alpha, config.use_rslora)
    delta.to_empty(device=param.device).to(adapter_dtype(param.dtype))
    if param.device.type != "meta":
        _init_ab(delta, config.init_lora_weights)
    return delta


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
    bias = delta.lora_bias  # (out,): zero, or under scheme False torch's default layer init, U(±1/√fan_in), as peft
    if bias is not None:
        bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(b)[0]) if scheme is False else 0.0
        nn.init.uniform_(bias, -bound, bound)


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


@torch.no_grad()
def _apply_init(delta: LoraDelta, base_layer: nn.Module, init: lora_init.Init) -> None:
    """Put a ``lora_init`` scheme's factors into ``delta`` and its residual into the base weight."""
    factors = delta.factors()
    factors.a.copy_(init.a)
    factors.b.copy_(init.b)
    if init.freeze_b:  # MiCA: saved like any factor, never trained (peft's frozen_peft_weight_names)
        delta.frozen = tuple(n for n, p in delta.named_parameters() if p is factors.b)
    if init.weight is not None:
        weight = base_layer.weight
        weight.copy_(delta.canonical(init.weight, base_layer).to(weight.dtype))


# First match wins: base layer types -> the delta class that knows their shapes.
_LAYER_CLASSES: tuple[tuple[tuple[type[nn.Module], ...], type[LoraDelta]], ...] = (
    ((nn.Linear, Conv1D), LoraLinear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), LoraConv),
    ((nn.Embedding,), LoraEmbedding),
    ((nn.MultiheadAttention,), LoraMultiheadAttention),
)


def _init_from_base(config: LoraConfig) -> bool:
    """Whether the init scheme is computed from the base weight (PiSSA / OLoRA), which then keeps the residual
    ``W₀ − BA``."""
    scheme = config.init_lora_weights
    return isinstance(scheme, str) and (scheme.startswith("pissa") or scheme in ("olora", *lora_init.REWRITING))


def rewrites_base_weights(config: LoraConfig) -> bool:
    """Whether building the adapter writes to the base weight (PiSSA / OLoRA's residual, KaSA's truncation): a failed
    load must put the base weights back."""
    return _init_from_base(config) or config.kasa_config is not None


def check_target(config: LoraConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a module this config cannot adapt although its type is supported. Resolution calls this for every
    target before the first :func:`make_delta`, because PiSSA / OLoRA initialisation rewrites the base weight.

    Raises:
        TargetError: a grouped convolution whose groups do not divide the rank, DoRA on MultiheadAttention,
            lora_bias on an embedding or MultiheadAttention, a MultiheadAttention with separate q/k/v weights or a non-Linear
            ``out_proj``, or
            PiSSA / OLoRA on a layer other than Linear/Conv1D.
    """
    scheme = config.init_lora_weights
    if isinstance(base_layer, nn.modules.conv._ConvNd) and base_layer.groups > 1:
        groups, r = base_layer.groups, pattern_value(config.rank_pattern, name, config.r)
        if r % groups:
            raise TargetError(
                f"{name}: LoRA on a convolution with groups={groups} needs a rank divisible by {groups} (peft's rule), "
                f"got r={r}; choose another r (or a rank_pattern entry for this layer) or leave it out of target_modules"
            )
    if isinstance(base_layer, nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise TargetError(
                f"{name}: LoRA on nn.MultiheadAttention needs one packed in_proj_weight (kdim = vdim = embed_dim); "
                f"this one has separate q/k/v weights, which peft does not support either"
            )
        if not isinstance(unwrap(base_layer.out_proj), nn.Linear):
            raise TargetError(f"{name}: LoRA on nn.MultiheadAttention needs its out_proj to be an nn.Linear")
        if config.use_dora:
            raise TargetError(f"{name}: DoRA is not supported on nn.MultiheadAttention (nor in peft)")
    if config.lora_bias and isinstance(base_layer, (nn.Embedding, nn.MultiheadAttention)):
        raise TargetError(
            f"{name}: lora_bias=True supports Linear, Conv1D and Conv layers, not {type(base_layer).__name__} "
            f"(peft refuses it there too); leave the layer out of target_modules or set lora_bias=False"
        )
    linear_like = isinstance(base_layer, (nn.Linear, Conv1D))
    lora_variants.check_target(config, base_layer, name, linear_like)
    if config.alora_invocation_tokens and not linear_like:
        raise TargetError(f"{name}: alora_invocation_tokens supports Linear and Conv1D layers only (as peft), not "
                          f"{type(base_layer).__name__}; leave the layer out of target_modules")
    if scheme in lora_init.CHECKED:
        lora_init.check_target(config, base_layer, name, pattern_value(config.rank_pattern, name, config.r))
    elif _init_from_base(config) and not linear_like:
        raise TargetError(f"{name}: init_lora_weights={scheme!r} supports Linear and Conv1D layers only")


def make_delta(config: LoraConfig, base_layer: nn.Module, name: str) -> LoraDelta:
    """Build and initialise the LoRA delta for ``base_layer`` (module ``name``, which :func:`check_target` has
    accepted), honouring rank/alpha patterns."""
    cls = next(c for types, c in _LAYER_CLASSES if isinstance(base_layer, types))
    if cls is LoraLinear and lora_variants.selected(config) is not None:
        cls = LoraVariantLinear
    r = pattern_value(config.rank_pattern, name, config.r)
    alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
    parts = ()
    if cls is LoraMultiheadAttention:  # out_proj takes the attention module's rank and alpha, as in peft
        parts = (_build(LoraLinear, config, unwrap(base_layer.out_proj), r, alpha),)
    return _build(cls, config, base_layer, r, alpha, *parts, name=name)


def _build(cls: type[LoraDelta], config: LoraConfig, base_layer: nn.Module, r: int, alpha: float,
           *parts: LoraDelta, name: str = "") -> LoraDelta:
    """A ``cls`` delta for ``base_layer``, initialised; ``parts`` go to its constructor before ``r``."""
    weight = cls.base_weight(base_layer)
    dtype = adapter_dtype(weight.dtype)
    # lora_bias only where check_target allows it (Linear, Conv1D, Conv): the other classes take no such argument
    extra = {"lora_bias": True} if config.lora_bias else {}
    with torch.device("meta"):  # no default init on the CPU: the factors are allocated where the base is, then set
        delta = cls(base_layer, *parts, r, alpha, config.lora_dropout, config.use_rslora, **extra)
    delta.to_empty(device=weight.device).to(dtype)
    scheme = config.init_lora_weights
    if scheme in lora_init.SCHEMES:
        if weight.device.type != "meta":
            _apply_init(delta, base_layer, lora_init.initialise(
                config, base_layer, delta.canonical(weight, base_layer), delta.r, delta.scaling))
    elif _init_from_base(config):
        _init_from_weight(delta, base_layer, scheme)
    elif weight.device.type != "meta":
        _init_ab(delta, scheme)
    if config.use_dora:
        delta.dora = DoraVariant.for_delta(delta, base_layer)
    if isinstance(delta, LoraVariantLinear):
        delta.variant = lora_variants.selected(config).attach(config, delta, base_layer, name)
    if config.alora_invocation_tokens:
        delta.alora = ActivatedLora(config.alora_invocation_tokens)
    delta.replicated = bool(config.layer_replication)
    return delta


# peft's EMBEDDING_LAYER_NAMES: ensure_weight_tying ties only where an entry names one of these (GPT-2's ``wte`` in
# target_modules stays untied there, with its warning, so files stay readable by peft)
_TIED_NAMES = ("embed_tokens", "lm_head")


def _names_tied_layer(entries: str | Sequence[str] | None) -> bool:
    """Whether ``target_modules`` / ``modules_to_save`` name a layer peft ties: an entry whose last part is one of
    :data:`_TIED_NAMES`, or a regex matching one."""
    if isinstance(entries, str):
        return any(re.fullmatch(entries, n) for n in _TIED_NAMES)
    return any(str(e).rpartition(".")[2] in _TIED_NAMES for e in entries or ())


def ties_modules_to_save(config: LoraConfig) -> bool:
    """``ensure_weight_tying`` with a tied layer named in ``modules_to_save``: their copies share one weight."""
    return config.ensure_weight_tying and _names_tied_layer(config.modules_to_save)


def ties_targets(config: LoraConfig) -> bool:
    """``LayerMethod.ties_weights``: ``ensure_weight_tying`` with a tied layer named in ``target_modules`` (and none
    in ``modules_to_save``, which peft ties first): the head's LoRA is the embedding's."""
    return (config.ensure_weight_tying and not ties_modules_to_save(config)
            and _names_tied_layer(config.target_modules))


def find_lora_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str] | str | None, list[str]]:
    """``LayerMethod.find_targets``: the modules ``target_modules`` selects; under :func:`ties_targets` the model's
    input embedding leads them whenever its table is a selected module's (peft adds it to the targets): so a tie is
    rooted there, and every other module sharing the table (the LM head, T5's ``encoder`` / ``decoder``
    ``embed_tokens`` beside ``shared``) is its twin (``make_tied_delta``), also where only a twin was named.

    Raises:
        ConfigError: ``exclude_modules`` excludes that input embedding.
    """
    patterns, names = find_targets(model, config)
    if not ties_targets(config):
        return patterns, names
    root = input_embedding_name(model)[0]
    try:
        table = getattr(unwrap(model.get_submodule(root)), "weight", None)
    except AttributeError:  # no get_input_embeddings and no module named embed_tokens
        return patterns, names
    selected = {id(getattr(unwrap(model.get_submodule(n)), "weight", None)) for n in names}
    if table is None or id(table) not in selected:
        return patterns, names
    if config.exclude_modules is not None and name_matches(root, config.exclude_modules):
        raise ConfigError(
            f"ensure_weight_tying=True ties {sorted(set(names) - {root})} to the input embedding {root!r}, which "
            f"carries the one LoRA of the tied table, but exclude_modules excludes it (peft fails there too); "
            f"leave {root!r} out of exclude_modules, or ensure_weight_tying off"
        )
    return patterns, [root, *(n for n in names if n != root)]


def check_weight_tying(config: LoraConfig, model: nn.Module, targets: Mapping[str, nn.Module]) -> LoraConfig:
    """``ensure_weight_tying`` (``LayerMethod.resolve_config``): warns as peft does where the flag has nothing to
    tie (no module of the model shares its weight with another, or none of those is in ``target_modules`` /
    ``modules_to_save``). Where one is, ``resolve`` ties the head to the embedding's LoRA (``make_tied_delta``) and
    ``inject.add_modules_to_save`` the copies.

    Raises:
        ConfigError: tied modules in both ``target_modules`` and ``modules_to_save``, which cannot both hold them.
    """
    if not config.ensure_weight_tying:
        return config
    owners: dict[int, list[str]] = {}
    for name, module in iter_candidates(model):
        weight = getattr(unwrap(module), "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    tied = {name for names in owners.values() if len(names) > 1 for name in names}
    saved = find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    in_targets, in_saved = tied.intersection(targets), tied.intersection(saved)
    if in_targets and in_saved:
        raise ConfigError(
            f"ensure_weight_tying=True with tied modules both in target_modules ({sorted(in_targets)}) and in "
            f"modules_to_save ({sorted(in_saved)}); keep the tied pair in one of them"
        )
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      stacklevel=2)
    elif not ties_targets(config) and not ties_modules_to_save(config):
        warnings.warn(f"You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      f"`modules_to_save` or `target_modules` (as peft, only layers named {_TIED_NAMES} are tied)",
                      stacklevel=2)
    return config


def resolve_config(config: LoraConfig, model: nn.Module, targets: Mapping[str, nn.Module]) -> LoraConfig:
    """``LayerMethod.resolve_config``: the checks against the model, ``ensure_weight_tying`` and KaSA's rule that
    KaSA and other adapters do not share a model."""
    _check_kasa_model(config, model)
    return check_weight_tying(config, model, targets)


def token_targets(config: LoraConfig, model: nn.Module) -> list[str]:
    """The embeddings ``trainable_token_indices`` trains rows of (``LayerMethod.extra_targets``): the input
    embedding for a list, the modules each key names (exact name or dotted suffix) for a dict.

    Raises:
        TargetError: a key matching nothing, an index beyond the vocabulary, an embedding in ``modules_to_save``
            or one another adapter adapts with LoRA itself (peft refuses both).
    """
    tokens = config.trainable_token_indices
    if tokens is None:
        return []
    if not isinstance(tokens, dict):
        tokens = {input_embedding_name(model)[0]: tokens}
    names = []
    for key, indices in tokens.items():
        found = [n for n, _ in iter_candidates(model) if name_matches(n, [key])]
        if not found:
            raise TargetError(f"trainable_token_indices names {key!r}, which matches no module of "
                              f"{type(model).__name__}")
        for name in found:
            module = model.get_submodule(name)
            check_rows(indices, unwrap(module), name, "trainable_token_indices")
            if name_matches(name, list(config.modules_to_save or [])):
                raise TargetError(f"{name}: in modules_to_save and in trainable_token_indices; train the embedding "
                                  f"fully or some of its rows, not both (peft refuses this too)")
            if isinstance(module, AdapterLayer) and any(isinstance(d, LoraDelta) for d in module.deltas.values()):
                raise TargetError(f"{name}: another adapter adapts this embedding with LoRA, so "
                                  f"trainable_token_indices cannot wrap it (nor in peft)")
            names.append(name)
    _check_tied_token_rows(config, model, names)
    return names


def _check_tied_token_rows(config: LoraConfig, model: nn.Module, names: Sequence[str]) -> None:
    """Modules sharing one table train its rows together (the others follow the first: ``resolve`` ties them), so
    ``trainable_token_indices`` must give them one list of rows.

    Raises:
        ConfigError: two entries give different rows to modules of one table (peft refuses this under
            ``ensure_weight_tying``; without it peft trains them apart, which one table cannot hold once merged).
    """
    rows: dict[int, tuple[str, list[int]]] = {}
    for name in names:
        weight = getattr(unwrap(model.get_submodule(name)), "weight", None)
        first, indices = rows.setdefault(id(weight), (name, _token_indices_for(config, name)))
        if list(_token_indices_for(config, name)) != list(indices):
            raise ConfigError(
                f"trainable_token_indices gives {first}: {list(indices)} and {name}: "
                f"{list(_token_indices_for(config, name))}, but they share one weight, whose rows train together; "
                f"give tied layers the same indices"
            )


def _token_indices_for(config: LoraConfig, name: str) -> list[int]:
    tokens = config.trainable_token_indices
    if not isinstance(tokens, dict):
        return tokens
    return next(v for k, v in tokens.items() if name_matches(name, [k]))


def make_token_delta(config: LoraConfig, base_layer: nn.Module, name: str, source: Delta | None) -> Delta:
    """The trainable-tokens delta of a ``trainable_token_indices`` embedding, or of a module tied to one."""
    indices = _token_indices_for(config, name) if source is None else []
    return make_token_adapter(base_layer, name, indices, source)


def mutated_init_to_lora(
    config: LoraConfig, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], source: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Turn a PiSSA/OLoRA adapter into a plain LoRA adapter for the *original* base (peft's
    ``path_initial_model_for_weight_conversion``, ``LoraModel.subtract_mutated_init``).

    Those inits move ``s B0 A0`` out of the base weight (``W_res = W - s B0 A0``), so after training the model computes
    ``W_res + s B A`` and its change from the original base is ``ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]``: a LoRA
    of rank ``2r`` whose factors are the trained and initial ones stacked (``A`` ``[r, in]`` -> ``[2r, in]``, ``B``
    ``[out, r]`` -> ``[out, 2r]``), with ``lora_alpha`` (and the patterns) doubled so the scale stays ``s`` (``√2`` with
    rsLoRA, whose scale is ``alpha / √r``). Tensors other than the factors (trained biases, ``modules_to_save``
    heads) are absolute values, kept as they are.

    Args:
        config: The adapter's config.
        trained: Its saved-format tensors now.
        initial: The saved-format tensors of the same adapter right after creation (before any training).
        source: Where ``initial`` came from, named in errors.

    Returns:
        The plain-LoRA config (``init_lora_weights=True``) and tensors.

    Raises:
        ConfigError: rsLoRA with a rank or alpha pattern (peft refuses it too), or ``initial`` does not hold the same
            factors.
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "path_initial_model_for_weight_conversion is not supported with use_rslora and a rank_pattern or "
            "alpha_pattern together (the doubled rank changes the scale per pattern)"
        )
    out = dict(trained)
    for key, value in trained.items():
        dim = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
        if dim is None:
            continue
        start = initial.get(key)
        if start is None or start.shape != value.shape:
            raise ConfigError(
                f"{source}: has no initial {key!r} of shape {list(value.shape)}; save the adapter right after "
                f"creating it and pass that directory"
            )
        start = start.to(dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, start if dim == 0 else -start], dim=dim)
    factor = math.sqrt(2) if config.use_rslora else 2
    plain = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True,
        loftq_config={}, eva_config=None, corda_config=None, lora_ga_config=None,  # the init is spent
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )
    return plain, out


METHOD = LayerMethod(
    config_class=LoraConfig,
    make_delta=make_delta,
    layer_types=tuple(t for types, _ in _LAYER_CLASSES for t in types),
    check_target=check_target,
    rewrites_base_weights=rewrites_base_weights,
    make_parameter_delta=make_parameter_delta,
    extra_targets=token_targets,
    make_extra_delta=make_token_delta,
    prepare_model=replicate_layers,
    restore_model=restore_layers,
    resolve_config=resolve_config,
    make_tied_delta=make_tied_delta,
    ties_weights=ties_targets,
    find_targets=find_lora_targets,
    model_functions={"_get_kasa_loss": kasa_loss, "_get_monteclora_loss": monteclora_loss},
)

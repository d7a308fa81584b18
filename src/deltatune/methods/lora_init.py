"""LoRA initialisations beyond the default (peft's ``init_lora_weights`` values), as pure tensor math plus the
calibration runs that feed the data-driven ones.

Each scheme turns a base weight ``W`` (canonical ``(out, in)`` layout, fp32) into the factors ``A`` ``(r, in)`` and
``B`` ``(out, r)``, and for some a new base weight, so that the adapter starts somewhere better than ``B = 0``:

* ``"orthogonal"`` (peft's; Datta, 2024, "Rethinking LoRA initialisations"): ``A`` and ``B`` built from the odd and
  even rows of one random orthogonal ``r × r`` matrix, so ``B A = 0`` exactly (the rows are orthogonal) while neither
  factor is zero. Base weight untouched; ``r`` even; Linear / Conv1D.
* ``"mica"`` (MiCA, arXiv 2604.01694): ``B`` = the ``r`` left singular vectors of ``W`` with the *smallest* singular
  values, ``A = 0``; ``B`` is frozen and only ``A`` trains (the update lives in the minor subspace). Linear, Conv1D,
  Embedding.
* ``"corda"`` (CorDA, arXiv 2406.05223, §3.2): the SVD of ``W C`` with ``C`` the covariance of the layer's inputs
  over a calibration run (:func:`preprocess_corda`); ``A``, ``B`` from the top (IPM, "instruction-previewed") or
  bottom (KPM, "knowledge-preserved") ``r`` components, and ``W`` keeps the rest: ``W ← W − s B A``.
* ``"lora_ga"`` (LoRA-GA, arXiv 2407.05000, §3.2): ``A``, ``B`` from the SVD of the full fine-tuning gradient of
  ``W`` over a few batches (:func:`preprocess_loraga`), so the first step of LoRA follows full fine-tuning's; ``W ←
  W − s B A``.
* ``"loftq"`` (LoftQ, arXiv 2310.08659, Alg. 1): alternate ``Q = quant(W − B A)`` and ``B A = SVD_r(W − Q)``; the
  base weight becomes the dequantized ``Q``. :func:`replace_lora_weights_loftq` does the one-step version on a model
  already quantized with bitsandbytes.

The schemes that rewrite ``W`` are saved as peft saves them (``init_lora_weights`` names the scheme; the file holds
``A``, ``B`` as trained), so an adapter applies to the *residual* base it was trained on; ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` turns it into a plain LoRA for the original base
(``methods.lora.mutated_init_to_lora``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, TargetError
from ..layers import unwrap
from ..targeting import pattern_value

__all__ = [
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraGAConfig",
    "preprocess_corda",
    "preprocess_loraga",
    "replace_lora_weights_loftq",
]

# init_lora_weights values handled here (besides lora.py's True / False / gaussian / pissa / olora).
SCHEMES = ("orthogonal", "mica", "corda", "lora_ga", "loftq")
# ...and those whose targets check_target vets: EVA builds a default LoRA first (lora_eva.py fills it in later).
CHECKED = (*SCHEMES, "eva")
# The ones that keep a residual in the base weight (a failed load must restore it).
REWRITING = ("corda", "lora_ga", "loftq")
# Module attributes where a calibration run leaves its per-layer results for get_peft_model to consume.
_CORDA_ATTR = "_deltatune_corda"
_LORAGA_ATTR = "_deltatune_loraga_grad"


# --- sub-configs (peft's classes, fields and defaults) -------------------------------------------------------------

@dataclass
class LoftQConfig:
    """LoftQ's settings (``LoraConfig.loftq_config``, stored there as a dict, as peft does).

    Attributes:
        loftq_bits: 4 (bitsandbytes nf4, blocks of 64) or 8 (bitsandbytes LLM.int8 row-wise absmax).
        loftq_iter: Alternating quantize / SVD steps (LoftQ Alg. 1's ``T``).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8) or isinstance(self.loftq_bits, bool):
            raise ConfigError(f"loftq_config: loftq_bits must be 4 or 8, got {self.loftq_bits!r}")
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or not 1 <= self.loftq_iter <= 64:
            raise ConfigError(f"loftq_config: loftq_iter must be an integer in [1, 64], got {self.loftq_iter!r}")


@dataclass
class EvaConfig:
    """EVA's settings (``LoraConfig.eva_config``; arXiv 2410.07170; ``methods/lora_eva.py``).

    Attributes:
        rho: A layer may get up to ``rho · r`` ranks in the redistribution (``>= 1``; 1: no redistribution).
        tau: A component has converged when its cosine similarity with the previous batch's is at least ``tau``.
        use_label_mask: Leave out the tokens whose label is ``label_mask_value`` (prompt tokens).
        label_mask_value: See ``use_label_mask``.
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: Multiply a layer's alpha by ``new_r / r``, so that its scale ``alpha / r`` stays.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rho, (int, float)) or isinstance(self.rho, bool) or not self.rho >= 1.0:
            raise ConfigError(f"eva_config: rho must be >= 1.0, got {self.rho!r}")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"eva_config: tau must be between 0.0 and 1.0, got {self.tau!r}")


@dataclass
class CordaConfig:
    """CorDA's settings (``LoraConfig.corda_config``).

    Attributes:
        cache_file: Where :func:`preprocess_corda` keeps the cropped SVD (``U``, ``S``, ``V`` per layer): read instead
            of recomputing when it exists, written otherwise.
        covariance_file: Where it keeps the input covariances (reusable for another rank): read when it exists.
        corda_method: ``"ipm"`` (the top-``r`` components: fast convergence) or ``"kpm"`` (the bottom ``r``: keeps the
            pre-trained knowledge in the frozen part).
        verbose: Accepted for peft's files; deltatune prints no progress.
        use_float16_for_covariance: Accumulate covariances in the layer input's dtype instead of fp32.
        prune_temporary_fields: Accepted for peft's files; deltatune keeps no temporary fields on the modules.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise ConfigError(f"corda_config: corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")


@dataclass
class LoraGAConfig:
    """LoRA-GA's settings (``LoraConfig.lora_ga_config``; arXiv 2407.05000 §3.2-3.3).

    Attributes:
        direction: Which of the gradient's top ``2r`` singular directions go to ``A`` (rows of ``Vᵀ``) and ``B``
            (columns of ``U``): ``"ArB2r"`` (A the first ``r``, B the next ``r``; the paper's choice), ``"A2rBr"``,
            ``"ArBr"`` (alternating) or ``"random"``.
        scale: ``"stable"`` (B times ``out^¼ / √γ``, §3.3), ``"weight_svd"`` (B scaled to ``W``'s top singular
            value), ``"gd_scale"`` (both divided by the LoRA scaling) or ``"unit"``.
        stable_gamma: ``γ`` of the stable scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        if self.direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ConfigError(f"lora_ga_config: unknown direction {self.direction!r}")
        if self.scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ConfigError(f"lora_ga_config: unknown scale {self.scale!r}")
        gamma = self.stable_gamma
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma <= 0:
            raise ConfigError(f"lora_ga_config: stable_gamma must be positive, got {self.stable_gamma!r}")


def subconfig(name: str, value: Any, cls: type) -> Any:
    """``value`` (an instance, a dict as read from JSON, or ``None``) as a ``cls`` instance or ``None``.

    Raises:
        ConfigError: naming the field and the keys ``cls`` does not have.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{name} has unknown fields {unknown}; {cls.__name__} has {sorted(known)}")
    return cls(**value)


def check_config(config: Any) -> None:
    """The combinations of ``init_lora_weights`` and the sub-configs (called by ``LoraConfig.__post_init__``, which
    has normalised the sub-configs). A sub-config beside another init scheme is refused by name; beside
    ``init_lora_weights=True`` / ``False`` it is kept with a warning, as peft does: peft's conversion of a CorDA /
    LoRA-GA adapter to plain LoRA (``path_initial_model_for_weight_conversion``) writes such files.

    Raises:
        ConfigError: naming the fields.
    """
    init = config.init_lora_weights
    owners = {"loftq_config": "loftq", "eva_config": "eva", "corda_config": "corda", "lora_ga_config": "lora_ga"}
    for name, scheme in owners.items():
        value = getattr(config, name, None)
        if value and init != scheme and isinstance(init, bool):
            warnings.warn(f"{name} is set but init_lora_weights={init!r}: it is not used (as in peft)", stacklevel=4)
        elif value and init != scheme:
            raise ConfigError(f"{name} is set but init_lora_weights={init!r}; it is used only with "
                              f"init_lora_weights={scheme!r} (remove it or change init_lora_weights)")
    if init == "loftq" and not config.loftq_config:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config (e.g. LoftQConfig(loftq_bits=4)), as in peft")
    if init == "lora_ga" and config.lora_ga_config is None:
        raise ConfigError("init_lora_weights='lora_ga' needs lora_ga_config=LoraGAConfig(...), as in peft")
    if init == "orthogonal":
        odd = {r for r in (config.r, *config.rank_pattern.values()) if r % 2}
        if odd:
            raise ConfigError(f"init_lora_weights='orthogonal' needs even ranks (half of A's and B's directions "
                              f"each), got r / rank_pattern values {sorted(odd)}")


def check_target(config: Any, base_layer: nn.Module, name: str, r: int) -> None:
    """Refuse a target the scheme cannot initialise, before any layer changes (``lora.check_target`` calls this).

    Raises:
        TargetError: a layer type the scheme has no meaning for (as peft), a MiCA rank above the weight's smaller
            side, or a CorDA / LoRA-GA target without its calibration data.
    """
    scheme = config.init_lora_weights
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)  # (peft's Embedding / Conv reject these inits)
    if scheme == "mica":
        layer_types = (nn.Linear, Conv1D, nn.Embedding)
    if type(base_layer) is nn.MultiheadAttention or not isinstance(base_layer, layer_types):
        kinds = "Linear, Conv1D and Embedding" if scheme == "mica" else "Linear and Conv1D"
        raise TargetError(f"{name}: init_lora_weights={scheme!r} supports {kinds} layers only (as peft); leave "
                          f"{type(base_layer).__name__} layers out of target_modules")
    if scheme == "mica" and r > min(base_layer.weight.shape):
        raise TargetError(f"{name}: MiCA needs r <= {min(base_layer.weight.shape)} (the weight's smaller side, "
                          f"{tuple(base_layer.weight.shape)}), got r={r}")
    attr, run = {"corda": (_CORDA_ATTR, "preprocess_corda(model, config, run_model)"),
                 "lora_ga": (_LORAGA_ATTR, "preprocess_loraga(model, config, train_step)")}.get(scheme, (None, None))
    if attr is not None and base_layer.weight.device.type != "meta" and not hasattr(base_layer, attr):
        raise TargetError(
            f"{name}: init_lora_weights={scheme!r} needs the calibration data of {run}, run on this model before "
            f"get_peft_model; none is attached to this layer. (A trained adapter of this kind loads onto the residual "
            f"base it was trained on with init_lora_weights=True, or onto the original base after saving it with "
            f"path_initial_model_for_weight_conversion.)"
        )


# --- the schemes: (canonical weight, rank, scaling, ...) -> factors ------------------------------------------------

@dataclass
class Init:
    """What a scheme produced for one layer: ``a`` ``(r, in)``, ``b`` ``(out, r)``, the new base weight
    (canonical ``(out, in)``; ``None``: unchanged) and whether ``B`` is frozen (MiCA)."""

    a: torch.Tensor
    b: torch.Tensor
    weight: torch.Tensor | None = None
    freeze_b: bool = False


def initialise(config: Any, base_layer: nn.Module, weight: torch.Tensor, r: int, scaling: float) -> Init:
    """Run ``config.init_lora_weights`` for one layer whose canonical weight is ``weight`` ``(out, in)``. Consumes
    the calibration data :func:`preprocess_corda` / :func:`preprocess_loraga` left on ``base_layer``."""
    scheme = config.init_lora_weights
    w = weight.detach().float()
    if scheme == "orthogonal":
        return orthogonal_factors(r, w.shape[1], w.shape[0])
    if scheme == "mica":
        return mica_factors(w, r)
    if scheme == "corda":
        return corda_factors(w, base_layer.__dict__.pop(_CORDA_ATTR), scaling)
    if scheme == "lora_ga":
        grad = base_layer.__dict__.pop(_LORAGA_ATTR)
        return lora_ga_factors(w, _canonical_grad(grad, base_layer), r, scaling, config.lora_ga_config)
    if scheme == "loftq":
        settings = LoftQConfig(**config.loftq_config)
        return loftq_factors(w, r, settings.loftq_bits, settings.loftq_iter)
    raise ValueError(f"not an init_lora_weights handled here: {scheme!r}")


def _canonical_grad(grad: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
    """A gradient of ``base_layer.weight`` in the canonical ``(out, in)`` layout."""
    return grad.float().T if isinstance(base_layer, Conv1D) else grad.float()


def orthogonal_factors(r: int, in_features: int, out_features: int) -> Init:
    """``Q`` orthogonal ``(r, r)`` (QR of a Gaussian); ``A = (G₁ Q_odd)ᵀ / 10`` and ``B = G₂ᵀ Q_even / 10`` with
    Gaussian ``G₁`` ``(in, r/2)``, ``G₂`` ``(r/2, out)``: ``B A = G₂ᵀ (Q_even Q_oddᵀ) G₁ᵀ / 100 = 0``, since distinct
    rows of ``Q`` are orthogonal. Draws in peft's order from the global CPU generator."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(in_features, r // 2).mm(q[0::2]).T / 10.0  # (r, in)
    b = torch.randn(r // 2, out_features).T.mm(q[1::2]) / 10.0  # (out, r)
    return Init(a, b)


def mica_factors(weight: torch.Tensor, r: int) -> Init:
    """MiCA: ``B`` = the last ``r`` columns of ``U`` (``W = U S Vᵀ``, ``S`` descending), ``A = 0``; frozen ``B``."""
    u = torch.linalg.svd(weight, full_matrices=False)[0]  # (out, k)
    return Init(torch.zeros(r, weight.shape[1]), u[:, -r:], freeze_b=True)


def corda_factors(weight: torch.Tensor, eigens: dict[str, torch.Tensor], scaling: float) -> Init:
    """CorDA from the cropped decomposition ``W C ≈ U diag(S) Vhᵀ`` (``V = (Vh C⁻¹)ᵀ``, so ``U diag(S) Vᵀ`` is the
    matching part of ``W`` itself): ``A = √(S/s) Vᵀ``, ``B = U √(S/s)``, and ``W`` keeps ``W − s B A``."""
    u, s, v = (eigens[k].to(weight.device, torch.float32) for k in ("U", "S", "V"))  # (out, r), (r,), (in, r)
    root = torch.sqrt(s / scaling)
    a, b = v.T * root[:, None], u * root
    return Init(a, b, weight - scaling * (b @ a))


def lora_ga_factors(weight: torch.Tensor, grad: torch.Tensor, r: int, scaling: float, config: LoraGAConfig) -> Init:
    """LoRA-GA (§3.2): the gradient's top ``2r`` singular triplets (randomised SVD, ``q = min(4r, …)``, 4 power
    iterations), split between ``A`` (rows of ``Vᵀ``) and ``B`` (columns of ``U`` times their singular values) as
    ``config.direction`` says, scaled as ``config.scale`` says; ``W`` keeps ``W − s B A``."""
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    vh = v.T
    picks = {
        "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
        "A2rBr": (slice(r, 2 * r), slice(0, r)),
        "ArB2r": (slice(0, r), slice(r, 2 * r)),
    }
    if config.direction == "random":
        chosen = torch.randperm(2 * r)[:r]
        rows_a = cols_b = chosen
    else:
        rows_a, cols_b = picks[config.direction]
    a = vh[rows_a]  # (r, in)
    s_b = s[cols_b]
    b = u[:, cols_b] * s_b  # (out, r)
    if config.scale == "stable":
        b = b * (weight.shape[0] ** 0.25 / config.stable_gamma ** 0.5)
    elif config.scale == "weight_svd":
        top = torch.svd_lowrank(weight, q=r, niter=4)[1][0]
        if s_b[0] > 0:
            b = b * (top / s_b[0])
    elif config.scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return Init(a, b, weight - scaling * (b @ a))


def _quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` through bitsandbytes' quantizer and back: nf4 in blocks of 64 without double quantization (4 bits),
    or LLM.int8's row-wise absmax (8 bits), what a model loaded with those settings holds."""
    import bitsandbytes.functional as bnbf

    if bits == 4:
        codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bnbf.dequantize_4bit(codes, state).float()
    codes, row_max, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
    return bnbf.int8_vectorwise_dequant(codes, row_max).float()


def _svd_split(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, L)`` with ``L R`` the best rank-``r`` approximation of ``weight``, the singular values split evenly:
    ``L = U √S``, ``R = √S Vᵀ``."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r])
    return root[:, None] * vh[:r], u[:, :r] * root


def loftq_factors(weight: torch.Tensor, r: int, bits: int, iters: int) -> Init:
    """LoftQ Alg. 1: ``Q_t = quant(W − L_{t−1} R_{t−1})``, ``L_t R_t = SVD_r(W − Q_t)``; ``A = R``, ``B = L``, base
    ``= Q_T`` dequantized. As in peft the factors approximate ``W − Q`` at scale 1: with ``lora_alpha ≠ r`` the model
    starts at ``Q + s L R``."""
    target = weight
    for step in range(iters):
        q = _quantize_roundtrip(target, bits)
        a, b = _svd_split(weight - q, r)
        target = weight - b @ a
    return Init(a, b, q)


# --- calibration runs ----------------------------------------------------------------------------------------------

def _targets(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """The Linear / Conv1D modules ``get_peft_model(model, config)`` would adapt (the same resolution, of a copy of
    the config without the scheme, whose data does not exist yet), by name."""
    from ..registry import get_method  # by name: lora.py imports this module
    from ..resolve import resolve

    plain = dataclasses.replace(config, init_lora_weights=True, corda_config=None, lora_ga_config=None)
    resolved = resolve(model, plain, get_method("LORA"))
    return {n: m for n, m in resolved.targets.items() if isinstance(m, (nn.Linear, Conv1D))}


def _load_cache(path: str | None) -> dict[str, torch.Tensor] | None:
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_cache(path: str | None, tensors: dict[str, torch.Tensor]) -> None:
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(tensors, path)


@torch.no_grad()
def preprocess_corda(
    model: nn.Module, lora_config: Any, run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """CorDA's calibration (peft's function of that name): the covariance ``C = mean over calls of X̂ᵀ X̂`` of each
    target's inputs while ``run_model()`` runs the model on a sample of the task (``X̂ = X / |max X|`` per call, the
    rows of all sequences of the call), then the SVD of ``W (C + λI)`` with the smallest damping ``λ`` (1%, 2%, 4% …
    of the mean diagonal) whose inverse is accurate, cropped to the layer's rank. Leaves the result on each target
    for ``get_peft_model(model, lora_config)``; the files in ``lora_config.corda_config`` are read when present and
    written otherwise (peft's layout).

    Args:
        model: The model the adapter will be added to.
        lora_config: A ``LoraConfig`` with ``init_lora_weights="corda"``.
        run_model: Runs the calibration forward passes; needed unless a cache or covariance file exists.
        hooked_model: Another model with the same module names to take the inputs from (default: ``model``).

    Raises:
        ConfigError: not a CorDA config, or no ``run_model`` and no file to read.
        ValueError: non-finite inputs or covariance, or a target the run never reached.
    """
    if getattr(lora_config, "init_lora_weights", None) != "corda":
        raise ConfigError("preprocess_corda needs a LoraConfig with init_lora_weights='corda'")
    settings = lora_config.corda_config
    targets = _targets(model, lora_config)
    cache = _load_cache(settings.cache_file)
    if cache is None:
        covariances = _load_cache(settings.covariance_file)
        if covariances is None:
            if run_model is None:
                raise ConfigError("preprocess_corda needs run_model (a function that runs the model on calibration "
                                  "data) unless corda_config names an existing cache_file or covariance_file")
            covariances = _input_covariances(hooked_model or model, list(targets), run_model,
                                             settings.use_float16_for_covariance)
            _save_cache(settings.covariance_file, covariances)
        cache = {}
        for name, module in targets.items():
            if name not in covariances:
                raise ValueError(f"preprocess_corda: {name} received no input during run_model")
            r = pattern_value(lora_config.rank_pattern, name, lora_config.r)
            u, s, v = _corda_decomposition(_canonical(module), covariances[name], r, settings.corda_method)
            cache.update({f"{name}.eigens.U_WC": u, f"{name}.eigens.S_WC": s, f"{name}.eigens.V_WC": v})
        _save_cache(settings.cache_file, cache)
    for name, module in targets.items():
        module.__dict__[_CORDA_ATTR] = {k: cache[f"{name}.eigens.{k}_WC"] for k in ("U", "S", "V")}


def _canonical(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if isinstance(module, Conv1D) else weight


def _input_covariances(model: nn.Module, names: list[str], run_model: Callable[[], None],
                       keep_dtype: bool) -> dict[str, torch.Tensor]:
    """``{name: mean over forward calls of X̂ᵀ X̂}`` for the named modules' inputs during ``run_model()``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if keep_dtype else x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            x = x / x.max().abs()  # peft's normalisation: by |largest value| (not the largest magnitude)
            if not torch.isfinite(x).all():
                raise ValueError(f"preprocess_corda: non-finite input to {name}; check the calibration data")
            cov = x.T @ x  # (in, in)
            sums[name] = sums[name] + cov if name in sums else cov
            counts[name] = counts.get(name, 0) + 1
        return record

    model.eval()
    handles = [unwrap(model.get_submodule(n)).register_forward_hook(hook(n)) for n in names]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _corda_decomposition(weight: torch.Tensor, covariance: torch.Tensor, r: int,
                         method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` cropped to ``r`` (top for IPM, bottom for KPM) of ``W C' = U diag(S) Vh`` with ``V = (Vh
    C'⁻¹)ᵀ``, ``C' = C + λ I``: ``(out, r)``, ``(r,)``, ``(in, r)``."""
    cov = covariance.float()
    if not torch.isfinite(cov).all():
        raise ValueError("preprocess_corda: non-finite covariance")
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    while True:
        damped = cov + eye * (cov.diagonal().mean() * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    v = (vh @ inverse).T  # (in, k)
    keep = slice(0, r) if method == "ipm" else slice(-r, None)
    return u[:, keep].contiguous(), s[keep].contiguous(), v[:, keep].contiguous()


def preprocess_loraga(
    model: nn.Module, lora_config: Any, train_step: Callable[[], None], cache_file: str | None = None
) -> None:
    """LoRA-GA's gradient estimate (peft's function of that name): with only the targets' weights requiring
    gradients, run ``train_step()`` (forward and backward passes over a few batches; gradients accumulate), and keep
    each weight's gradient divided by the number of backward passes that reached it, for ``get_peft_model`` (peft
    counts calls of the layer instead, the same for a layer called once per forward).
    Gradients and ``requires_grad`` flags of the model are as before afterwards. ``cache_file`` is read when it exists
    and written otherwise (peft's layout).

    Raises:
        ConfigError: not a LoRA-GA config.
        ValueError: no target, or a target that ``train_step`` never reached.
    """
    if getattr(lora_config, "init_lora_weights", None) != "lora_ga":
        raise ConfigError("preprocess_loraga needs a LoraConfig with init_lora_weights='lora_ga' and lora_ga_config")
    targets = _targets(model, lora_config)
    if not targets:
        raise ValueError("preprocess_loraga: no Linear / Conv1D target (LoRA-GA supports those only)")
    grads = _load_cache(cache_file)
    if grads is None:
        grads = _average_gradients(model, targets, train_step)
        _save_cache(cache_file, grads)
    for name, module in targets.items():
        key = f"{name}._peft_loraga_grad"
        if key not in grads:
            raise ValueError(f"preprocess_loraga: no gradient reached {name} during train_step")
        module.__dict__[_LORAGA_ATTR] = grads[key]


def _average_gradients(model: nn.Module, targets: dict[str, nn.Module],
                       train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = {name: m.weight.grad for name, m in targets.items()}
    calls = dict.fromkeys(targets, 0)
    handles = []
    for name, module in targets.items():
        def count(grad: torch.Tensor, name: str = name) -> None:
            calls[name] += 1
        handles.append(module.weight.register_hook(count))  # once per backward pass that reaches the weight
    was_training = model.training
    try:
        for param in flags:
            param.requires_grad_(False)
        for module in targets.values():
            module.weight.grad = None
            module.weight.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            train_step()
        return {f"{name}._peft_loraga_grad": m.weight.grad.detach() / calls[name]
                for name, m in targets.items() if calls[name] and m.weight.grad is not None}
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for name, module in targets.items():
            module.weight.grad = saved[name]
        model.train(was_training)


# --- LoftQ on a model quantized already ----------------------------------------------------------------------------

def _safetensors_reader(model_path: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """A function reading one tensor by name from ``model_path`` (a ``model.safetensors`` file, or a directory with
    one or with a sharded index)."""
    from safetensors import safe_open

    path = os.fspath(model_path)
    if os.path.isdir(path):
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(single):
            files = {None: single}
        elif os.path.exists(index):
            import json

            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors nor model.safetensors.index.json")
    else:
        files = {None: path}

    def read(name: str) -> torch.Tensor:
        file = files.get(name, files.get(None))
        if file is None:
            raise KeyError(name)
        with safe_open(file, framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    return read


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module, model_path: str | os.PathLike | None = None, adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """LoftQ's one-step form for a model already quantized to 4 bits with bitsandbytes (peft's function of that
    name): for each LoRA layer on a ``Linear4bit``, read the original weight ``W`` from ``model_path`` and set ``A``,
    ``B`` to the rank-``r`` SVD split of ``W − dequant(Q)``, so that ``Q + B A`` starts nearer ``W``.

    Args:
        peft_model: A deltatune ``PeftModel`` with a LoRA adapter on 4-bit layers.
        model_path: The unquantized checkpoint (``model.safetensors`` or its directory); default: the local
            snapshot of ``config._name_or_path`` in the Hugging Face cache.
        adapter_name: Which adapter's factors to replace.
        callback: ``callback(peft_model, module_name) -> bool`` after each layer; ``False`` puts that layer's previous
            factors back (greedy: keep a layer only where it helps).

    Raises:
        ValueError: no LoRA adapter ``adapter_name`` on a bitsandbytes 4-bit layer.
        KeyError: a layer's weight is not in the checkpoint.
    """
    from .. import quant
    from ..layers import adapter_layers

    if model_path is None:
        from huggingface_hub import snapshot_download

        name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("replace_lora_weights_loftq: pass model_path (the model has no _name_or_path)")
        model_path = snapshot_download(name, local_files_only=True)
    read = _safetensors_reader(model_path)
    base = peft_model.get_base_model()
    prefix = getattr(base, "base_model_prefix", "") or ""
    found = False
    for name, layer in adapter_layers(base):
        delta = layer.deltas[adapter_name] if adapter_name in layer.deltas else None
        handler = quant.handler_for(layer.base_layer)
        if delta is None or handler is None or handler.name != "bitsandbytes 4-bit":
            continue
        found = True
        try:
            original = read(f"{name}.weight")
        except Exception:
            original = read(f"{name.removeprefix(prefix + '.')}.weight")
        dequantized = layer.delta_base.weight.float()  # (out, in)
        factors = delta.factors()
        a, b = _svd_split(original.float().to(dequantized.device) - dequantized, delta.r)
        before = factors.a.detach().clone(), factors.b.detach().clone()
        factors.a.copy_(a)
        factors.b.copy_(b)
        if callback is not None and not callback(peft_model, name):
            factors.a.copy_(before[0])
            factors.b.copy_(before[1])
    if not found:
        raise ValueError(f"replace_lora_weights_loftq: no LoRA adapter {adapter_name!r} on a bitsandbytes 4-bit layer")

"""Which base model an adapter belongs to: a fingerprint saved with the weights and checked when they load.

peft and its peers load a LoRA trained on one checkpoint onto any model with the same shapes (a different fine-tune,
revision or resized vocabulary) and compute plausible nonsense. ``save_pretrained`` therefore records, in the
safetensors metadata under :data:`METADATA_KEY` (peft, vLLM and every safetensors reader ignore metadata, so the file
stays peft's), the base's class, ``model_type`` and vocabulary size, and for every base weight the adapter targets its
shape and a sample of its values: :data:`_SAMPLE` x :data:`_SAMPLE` entries at fixed rows and columns, stored as
bfloat16. Values are compared by their relative L2 difference against :data:`TOLERANCE`, so a dtype change (float32 ->
bfloat16 / float16) of the same weights still matches and other weights do not. Weights that are not floating point
(quantized storage) and weights with an adapter merged into them are compared by nothing but their presence.

The sample is taken with the adapter built, i.e. after any initialisation that rewrites the base (PiSSA / OLoRA keep
``W - BA`` there), which a load reproduces before the check.
"""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any

import torch
from torch import nn

from . import quant
from .errors import AdapterLoadError, PeftWarning
from .layers import AdapterLayer, adapter_layers

METADATA_KEY = "deltatune.base_model"
_VERSION = 1
_SAMPLE = 4  # rows and columns sampled per weight: 16 values, 32 bytes
# Largest relative L2 difference of the samples that still counts as the same weights: bfloat16 rounds by < 0.4%;
# a different fine-tune or checkpoint of the same architecture differs by far more in at least some weights.
TOLERANCE = 0.02


class BaseModelMismatchWarning(PeftWarning):
    """An adapter is loaded onto a base model other than the one it was saved with (see :mod:`deltatune.fingerprint`)."""


def base_fingerprint(base: nn.Module, adapter_name: str, values: bool = True) -> dict[str, Any]:
    """The fingerprint of ``base`` as adapter ``adapter_name`` sees it (see the module docstring); without
    ``values``, shapes only (for an adapter saved to apply to other weights than the ones ``base`` holds)."""
    weights = {}
    for path, layer in adapter_layers(base):
        if adapter_name in layer.deltas:
            weight, merged = _base_weight(layer)
            if weight is not None:  # (a quantized weight: its shape, on the meta device)
                sample = _sample(weight) if values and not merged else None
                weights[_canonical(path)] = {"shape": list(weight.shape), "sample": sample}
    return {"version": _VERSION, **_identity(base), "weights": weights}


def check_base(saved: str | None, base: nn.Module, source: str, strict: bool) -> None:
    """Compare a saved fingerprint (the metadata string, ``None`` when the file has none) with ``base``.

    Raises:
        AdapterLoadError: the base differs and ``strict`` is set (otherwise a :class:`BaseModelMismatchWarning`).
    """
    if saved is None:
        return  # saved by peft or another tool: nothing to compare
    try:
        fingerprint = json.loads(saved)
        differences = _differences(fingerprint, base)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        differences = ["its base-model fingerprint is unreadable"]
    if not differences:
        return
    what = f"{source} was saved with a different base model: {'; '.join(differences)}"
    if strict:
        raise AdapterLoadError(f"{what}. Load it onto the base it was trained on (strict_base=True refuses others)")
    warnings.warn(
        f"{what}. It may compute something other than it was trained to. Load it onto the base it was trained on, "
        f"pass strict_base=True to refuse such loads, or silence this with warnings.filterwarnings('ignore', "
        f"category=deltatune.BaseModelMismatchWarning).",
        BaseModelMismatchWarning, stacklevel=3,
    )


def describe(saved: str | None) -> dict[str, Any] | None:
    """A summary of a saved fingerprint for ``deltatune inspect`` (``None`` when there is none or it is unreadable)."""
    try:
        fingerprint = json.loads(saved) if saved is not None else None
        weights = fingerprint["weights"]
        return {"architecture": fingerprint.get("architecture"), "model_type": fingerprint.get("model_type"),
                "vocab_size": fingerprint.get("vocab_size"), "weights": len(weights),
                "sampled": sum(1 for w in weights.values() if w.get("sample"))}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _identity(base: nn.Module) -> dict[str, Any]:
    config = getattr(base, "config", None)
    embeddings = getattr(base, "get_input_embeddings", None)
    try:
        vocab = embeddings().num_embeddings if embeddings is not None else None
    except (AttributeError, NotImplementedError):
        vocab = None
    if vocab is None:
        vocab = getattr(config, "vocab_size", None)
    return {"architecture": type(base).__name__, "model_type": getattr(config, "model_type", None),
            "vocab_size": vocab}


def _canonical(path: str) -> str:
    """A module path without the ``base_layer`` steps that nested adapter layers add."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def _base_weight(module: nn.Module) -> tuple[torch.Tensor | None, bool]:
    """The innermost base layer's floating-point weight (``None`` if it has none) and whether its values are not to be
    sampled: an adapter is merged into it, or it is quantized (then only its dense shape counts, as a meta tensor,
    so that an adapter moves between a quantized base and the full-precision one without a mismatch)."""
    merged = False
    while isinstance(module, AdapterLayer):
        merged = merged or module.merged
        module = module.base_layer
    if quant.is_quantized(module):
        return torch.empty(module.out_features, module.in_features, device="meta"), True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
        return None, merged
    return weight, merged


def _sampled(weight: torch.Tensor) -> torch.Tensor:
    """:data:`_SAMPLE` x :data:`_SAMPLE` values at evenly spaced rows and columns of ``weight`` viewed as
    ``[shape[0], rest]``, in float32."""
    matrix = weight.detach().reshape(weight.shape[0], -1) if weight.ndim else weight.detach().reshape(1, 1)
    rows = torch.linspace(0, matrix.shape[0] - 1, _SAMPLE).round().long().unique()
    cols = torch.linspace(0, matrix.shape[1] - 1, _SAMPLE).round().long().unique()
    return matrix[rows.to(matrix.device)][:, cols.to(matrix.device)].float().cpu()


def _sample(weight: torch.Tensor) -> str:
    return base64.b64encode(_sampled(weight).to(torch.bfloat16).view(torch.int16).numpy().tobytes()).decode()


def _unsample(text: str) -> torch.Tensor:
    raw = bytearray(base64.b64decode(text, validate=True))
    return torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).float()


def _differences(saved: dict[str, Any], base: nn.Module) -> list[str]:
    """What differs between a saved fingerprint and ``base``, one phrase each."""
    out = []
    now = _identity(base)
    for key in ("architecture", "model_type", "vocab_size"):
        if saved.get(key) is not None and now[key] is not None and saved[key] != now[key]:
            out.append(f"{key} {saved[key]!r} when saved, {now[key]!r} now")
    missing, reshaped, changed = [], [], []
    for path, entry in saved["weights"].items():
        try:
            weight, merged = _base_weight(base.get_submodule(path))
        except AttributeError:
            missing.append(path)
            continue
        if weight is None:
            continue
        if list(weight.shape) != list(entry["shape"]):
            reshaped.append(f"{path} {entry['shape']} -> {list(weight.shape)}")
        elif entry.get("sample") and not merged:
            was, now_ = _unsample(entry["sample"]), _sampled(weight).flatten().to(torch.bfloat16).float()
            if was.shape != now_.shape:
                raise ValueError("sample size")
            relative = float((was - now_).norm() / was.norm().clamp_min(1e-12))
            if relative > TOLERANCE:
                changed.append((relative, path))
    total = len(saved["weights"])
    if missing:
        out.append(f"{len(missing)} of {total} targeted modules are missing (first: {missing[0]})")
    if reshaped:
        out.append(f"{len(reshaped)} of {total} targeted weights have other shapes (first: {reshaped[0]})")
    if changed:
        worst = max(changed)
        out.append(f"{len(changed)} of {total} targeted weights hold other values (largest relative difference "
                   f"{worst[0]:.2g}, in {worst[1]})")
    return out

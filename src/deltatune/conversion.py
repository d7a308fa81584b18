"""Any weight-updating adapter as a LoRA: :func:`convert_to_lora` and :func:`save_as_lora` (peft's names and
results).

A layer method's merged update of a Linear (or GPT-2 ``Conv1D``) layer is a matrix ``ΔW`` (out, in), whatever the
method computes it from (Kronecker or Hadamard factors, shared random projections, a spectrum, rotations). Its
truncated SVD ``ΔW ≈ U_k diag(S_k) V_kᵀ`` is the best rank-``k`` approximation in the Frobenius norm
(Eckart–Young), written as LoRA factors ``B = U_k diag(S_k)`` (out, k) and ``A = V_kᵀ`` (k, in) with ``lora_alpha = r``,
so the scaling is 1. A LoRA adapter runs where other methods do not (vLLM, mixed batches in any tool); the price is
the approximation error of the ranks kept. ``ΔW`` comes from the delta's own ``merged_params`` on the unmerged
weights in float32, so every method that can merge converts, with no per-method code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checkpoint import LAYER_KEY_PREFIX
from .config import PeftConfig
from .errors import AdapterStateError, ConfigError
from .files import adapter_files, write_adapters
from .functional import get_peft_model_state_dict
from .layers import AdapterLayer, adapter_layers, save_wrappers
from .model import PeftModel
from .registry import LayerMethod, get_method
from .resolve import rewriting_option

__all__ = ["convert_to_lora", "save_as_lora"]


def convert_to_lora(
    model: nn.Module, rank: int | float, adapter_name: str = "default", progressbar: bool = False,
    compile_kwargs: dict | None = None,
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The LoRA config and ``adapter_model.safetensors`` tensors that approximate adapter ``adapter_name`` of
    ``model`` (a ``PeftModel`` or a model with injected adapters), layer by layer.

    Args:
        rank: An ``int``: the rank of every layer. A ``float`` in ``(0, 1]``: per layer, the fewest singular values
            whose squared sum reaches that share of the total (the "energy"); the ranks go to ``rank_pattern``.
        progressbar, compile_kwargs: Accepted for peft's signature; the conversion is a few SVDs of small layers'
            updates, so there is no progress bar and nothing to compile (``compile_kwargs`` must be ``None``).

    Raises:
        ConfigError: a rank that is not a positive int or a float in ``(0, 1]``, an int rank above a layer's smaller
            side, a config with ``bias`` other than ``"none"``, ``compile_kwargs``.
        AdapterStateError: no such layer adapter (a prompt adapter has no weights to convert), a merged layer, a
            layer that is not Linear / Conv1D, an adapter that cannot merge (it says why), an update of a bias.
    """
    _check_rank(rank)
    if compile_kwargs is not None:
        raise ConfigError("convert_to_lora: compile_kwargs is not supported (the conversion runs no compiled code)")
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    prefix = LAYER_KEY_PREFIX if isinstance(model, PeftModel) else ""
    source = getattr(model, "peft_config", {}).get(adapter_name)
    method = get_method(source.peft_type) if source is not None else None
    if isinstance(method, LayerMethod) and method.rewrites_base_weights and method.rewrites_base_weights(source):
        raise ConfigError(f"convert_to_lora: adapter {adapter_name!r} was built with {rewriting_option(source)}, which "
                          f"rewrote the base weights; a LoRA converted from it would only be right on those rewritten "
                          f"weights (save it with path_initial_model_for_weight_conversion for a LoRA on the original)")
    if source is not None and getattr(source, "bias", "none") != "none":
        raise ConfigError(f"convert_to_lora: adapter {adapter_name!r} has bias={source.bias!r}; a LoRA adapter cannot "
                          f"carry the bias terms it trained (only bias='none' converts)")
    layers = [(name, layer) for name, layer in adapter_layers(root) if adapter_name in layer.deltas]
    if not layers:
        raise AdapterStateError(f"convert_to_lora: the model has no layer adapter named {adapter_name!r} (prompt "
                                f"adapters have no weight update to convert)")

    config = _lora_config(source, rank)
    targets: set[str] = set(config.target_modules) if isinstance(config.target_modules, (list, set)) else set()
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in _factors(layers, adapter_name, rank):
        effective = a.shape[0]
        if effective != rank or isinstance(config.target_modules, str):  # its own rank, or no list to join
            config.rank_pattern[name] = config.alpha_pattern[name] = effective
        if effective == rank or source is None:  # (a source's targets already cover the layers in the patterns)
            targets.add(name)
        tensors[f"{prefix}{name}.lora_A.weight"] = a
        tensors[f"{prefix}{name}.lora_B.weight"] = b
    if not isinstance(config.target_modules, str):
        config.target_modules = sorted(targets)
    tensors.update(_saved_copies(model, root, adapter_name))
    return config, tensors


def save_as_lora(
    path: str | os.PathLike, model: nn.Module, rank: int | float, adapter_name: str = "default",
    progressbar: bool = False, compile_kwargs: dict | None = None,
) -> None:
    """:func:`convert_to_lora`, written to ``path`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in one
    atomic step (a crash leaves the old files or the new, never a mix)."""
    config, tensors = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs)
    write_adapters(path, {"": adapter_files(config.to_json_string(), tensors)})


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConfigError(f"convert_to_lora: rank must be an int or a float threshold in (0, 1], got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ConfigError(f"convert_to_lora: a float rank is an energy threshold and must be in (0, 1], got {rank}")
    if isinstance(rank, int) and rank < 1:
        raise ConfigError(f"convert_to_lora: rank must be a positive integer, got {rank}")


def _lora_config(source: PeftConfig | None, rank: int | float) -> PeftConfig:
    """The converted adapter's config: the source's targets (and layer selection, base model), ``r = lora_alpha``
    (scaling 1; for a threshold the per-layer ranks are all in the patterns)."""
    lora_config = get_method("LORA").config_class
    r = rank if isinstance(rank, int) else 1
    kwargs: dict = {"r": r, "lora_alpha": r, "rank_pattern": {}, "alpha_pattern": {}}
    if source is None:
        return lora_config(target_modules=[], **kwargs)
    kwargs["base_model_name_or_path"] = source.base_model_name_or_path
    if getattr(source, "layers_to_transform", None) is not None:
        kwargs["layers_to_transform"] = source.layers_to_transform
        kwargs["layers_pattern"] = source.layers_pattern
    if getattr(source, "modules_to_save", None):
        kwargs["modules_to_save"] = list(source.modules_to_save)
    targets = source.target_modules
    return lora_config(target_modules=targets if isinstance(targets, str) else list(targets or []), **kwargs)


@torch.no_grad()
def _factors(layers: list[tuple[str, AdapterLayer]], adapter_name: str,
             rank: int | float) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(name, (A, B))`` per layer: ``A`` (k, in) and ``B`` (out, k) in the delta's dtype, ``B @ A ≈ ΔW``."""
    for name, layer in layers:
        update = _update(name, layer, adapter_name)  # (out, in) float32
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        if isinstance(rank, float):
            energy = torch.cumsum(s.square(), dim=0)
            k = int(torch.searchsorted(energy, rank * energy[-1])) + 1  # the first k whose share reaches the threshold
            k = min(k, s.numel())
        elif rank > s.numel():
            raise ConfigError(f"convert_to_lora: rank {rank} exceeds layer {name!r}'s update of shape "
                              f"{tuple(update.shape)}; choose at most {s.numel()}")
        else:
            k = rank
        dtype = next(layer.deltas[adapter_name].parameters(), update).dtype
        yield name, (vh[:k].to(dtype).contiguous(), (u[:, :k] * s[:k]).to(dtype).contiguous())


def _update(name: str, layer: AdapterLayer, adapter_name: str) -> torch.Tensor:
    """``ΔW`` (out, in) in float32: what merging the adapter into the unmerged layer would add to its weight."""
    base = layer.base_layer
    if not isinstance(base, (nn.Linear, Conv1D)) and not isinstance(layer.delta_base, nn.Linear):
        raise AdapterStateError(f"convert_to_lora: layer {name!r} is a {type(base).__name__}; only Linear and "
                                f"Conv1D layers convert to LoRA")
    if layer.merged:
        raise AdapterStateError(f"convert_to_lora: layer {name!r} has merged adapters {layer.merged_adapters}; "
                                f"unmerge first (unmerge_adapter())")
    layer.deltas[adapter_name].check_mergeable(layer.delta_base)
    params = {k: v.float() for k, v in layer._params(copy=True).items()}
    merged = layer._merged_params(adapter_name, dict(params), dict(params))
    if "bias" in merged and not torch.equal(merged["bias"], params["bias"]):
        raise AdapterStateError(f"convert_to_lora: adapter {adapter_name!r} changes the bias of {name!r}, which a "
                                f"LoRA adapter cannot carry")
    update = merged["weight"] - params["weight"]
    return update.T if isinstance(base, Conv1D) else update


def _saved_copies(model: nn.Module, root: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's trained copies of ``modules_to_save`` modules, under their saved keys."""
    prefix = LAYER_KEY_PREFIX if isinstance(model, PeftModel) else ""
    wrappers = [prefix + name + "." for name, _ in save_wrappers(root)]
    if not wrappers:
        return {}
    saved = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v for k, v in saved.items() if any(k.startswith(w) for w in wrappers)}

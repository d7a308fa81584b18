"""Hot-swapping a loaded LoRA adapter's weights in place (peft's ``peft.utils.hotswap``, same names and arguments).

Why in place: a server that switches adapters on one ``torch.compile``d model must not recompile at every switch.
Compiled code reads the adapter's parameters by identity, so the new adapter's factors are copied into the very same
tensors (same storage, same ``data_ptr()``), and what else differs between adapters is made data rather than code:

* the scale ``alpha / r`` (``/ √r`` with rsLoRA) becomes a 0-dim tensor per layer
  (:func:`prepare_model_for_compiled_hotswap`), filled in place by the swap; a Python float would be a constant of
  the compiled graph;
* ranks: the same function zero-pads every layer's factors to ``target_rank`` (the largest rank to be swapped in);
  an adapter of lower rank fills the leading rows of ``A`` / columns of ``B`` and leaves zeros behind, which adds
  nothing (``B A`` is unchanged by zero rank components).

Without preparation a swap still works on an eager model (scales are plain numbers then, and a larger rank replaces
the factors' storage). Layers the new adapter does not target have their factors zeroed (the update vanishes);
an adapter that targets a layer the loaded one does not is refused, as are configs that differ in what the weights
alone cannot carry (peft's list: ``use_rslora``, ``lora_dropout``, ``alpha_pattern``, ``use_dora``; here also
``lora_bias`` and ``alora_invocation_tokens``). Every check runs before the first tensor is written.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from . import checkpoint
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .layers import AdapterLayer, adapter_layers
from .targeting import pattern_value

__all__ = ["hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"]

# Config fields whose difference the swapped weights cannot carry (peft's CONFIG_KEYS_TO_CHECK for LoRA, plus two
# whose meaning lives outside the tensors here).
_MUST_MATCH = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "lora_bias", "alora_invocation_tokens",
               "kasa_config", "velora_config", "monteclora_config", "use_bdlora", "use_qalora", "qalora_group_size",
               "arrow_config")


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its parameters are the compiled code's), or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def _adapter_root(model: nn.Module) -> nn.Module:
    """The adapted model: a ``PeftModel``'s base model, or any module holding deltatune adapter layers."""
    model = _unwrap_compiled(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_deltas(root: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(layer path, delta)`` for every LoRA delta (of ``adapter_name``, or of every adapter) under ``root``."""
    from .methods.lora import LoraDelta  # not at import: `import deltatune` loads no method

    for path, layer in adapter_layers(root):
        for name, delta in layer.deltas.items():
            if isinstance(delta, LoraDelta) and adapter_name in (None, name):
                yield path, delta


def _scaling(config: Any, name: str) -> float:
    """The scale of layer ``name`` under a LoRA ``config`` (its rank / alpha patterns, rsLoRA), as ``make_delta``."""
    r = pattern_value(config.rank_pattern, name, config.r)
    alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _factor_names(delta: Any) -> tuple[str, str]:
    """The parameter names of ``A`` (rank on dim 0) and ``B`` (rank on dim 1) inside ``delta``."""
    return ("lora_embedding_A", "lora_embedding_B") if hasattr(delta, "lora_embedding_A") else (
        "lora_A.weight", "lora_B.weight")


def _fixed_rank(delta: Any) -> str | None:
    """Why ``delta``'s factors cannot change rank by padding, or ``None``: ``target_parameters`` interleave the
    experts' factors, a LoRA variant (``lora_variants.py``) may shape them its own way (BD-LoRA's blocks)."""
    if delta.parameter_name is not None:
        return "target_parameters adapters interleave the experts' factors"
    variant = getattr(delta, "variant", None)
    return None if variant is None else f"{variant.field} shapes its factors its own way"


def _groups(delta: Any) -> int:
    """Groups of a grouped convolution's LoRA (B is grouped: A's rank rows come in ``groups`` blocks); else 1."""
    return getattr(delta, "groups", 1)


def _pad_into(destination: torch.Tensor, value: torch.Tensor, rank_dim: int, groups: int) -> None:
    """Write the lower-rank factor ``value`` into ``destination`` (zeros elsewhere). For A on a grouped convolution
    (``rank_dim`` 0, ``groups > 1``) each group's block of rank rows goes to the start of that group's larger block,
    so B's group ``j`` still reads its own components."""
    destination.zero_()
    if rank_dim == 1:
        destination[:, : value.shape[1]].copy_(value)
        return
    small, large = value.shape[0] // groups, destination.shape[0] // groups
    for g in range(groups):
        destination[g * large: g * large + small].copy_(value[g * small: (g + 1) * small])


def _padded(param: torch.Tensor, rank: int, rank_dim: int, groups: int) -> nn.Parameter:
    """A new parameter: ``param`` zero-padded to ``rank`` along ``rank_dim`` (B of a grouped convolution holds
    ``rank / groups`` per output group)."""
    shape = list(param.shape)
    shape[rank_dim] = rank // groups if rank_dim == 1 else rank
    out = param.new_zeros(shape)
    _pad_into(out, param.detach(), rank_dim, groups)
    return nn.Parameter(out, requires_grad=param.requires_grad)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make the loaded LoRA adapters swappable without recompiling: scales become 0-dim tensors and, with
    ``target_rank``, every factor is zero-padded to that rank (outputs unchanged). Call it after loading the first
    adapter and before ``torch.compile``.

    Args:
        model: A ``PeftModel`` (or a module with deltatune LoRA layers).
        target_rank: The largest rank that will be swapped in; ``None`` keeps the ranks.
        config: A ``LoraConfig`` or ``{name: LoraConfig}`` (e.g. ``model.peft_config``) whose ``r`` and
            ``rank_pattern`` values are set to ``target_rank``, as peft does.
        check_compiled: What to do when ``model`` is already compiled: ``"error"``, ``"warn"`` or ``"ignore"``.

    Raises:
        ValueError: an already compiled model (``check_compiled="error"``), no LoRA layer, a layer whose rank is
            above ``target_rank`` (or, for a grouped convolution, does not divide it), a ``target_parameters`` layer
            whose rank would change; nothing is changed then.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise ValueError("prepare_model_for_compiled_hotswap must be called before the model is compiled")
        if check_compiled == "warn":
            import warnings

            warnings.warn("prepare_model_for_compiled_hotswap was called on a compiled model: expect a recompilation",
                          stacklevel=2)
    deltas = list(_lora_deltas(_adapter_root(model)))
    if not deltas:
        raise ValueError("prepare_model_for_compiled_hotswap found no LoRA layer; load the first adapter first")
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
            raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
        for path, delta in deltas:
            if delta.r > target_rank:
                raise ValueError(f"{path}: the adapter's rank {delta.r} is above target_rank={target_rank}; pass the "
                                 f"largest rank of the adapters to be swapped in")
            if target_rank % _groups(delta):
                raise ValueError(f"{path}: a grouped convolution (groups={_groups(delta)}) needs a target_rank "
                                 f"divisible by its groups, got {target_rank}")
            if _fixed_rank(delta) and delta.r != target_rank:
                raise ValueError(f"{path}: cannot be padded to another rank ({_fixed_rank(delta)}); use "
                                 f"target_rank={delta.r} or none")
    for _, delta in deltas:
        weight = getattr(delta, _factor_names(delta)[0].split(".")[0])
        device = (weight if isinstance(weight, torch.Tensor) else weight.weight).device
        if not isinstance(delta.scaling, torch.Tensor):
            delta.scaling = torch.tensor(float(delta.scaling), device=device)
        if target_rank is not None and delta.r != target_rank:
            for rank_dim, param_name in enumerate(_factor_names(delta)):
                owner_name, _, attr = param_name.rpartition(".")
                owner = delta.get_submodule(owner_name) if owner_name else delta
                setattr(owner, attr, _padded(getattr(owner, attr), target_rank, rank_dim, _groups(delta)))
            _set_rank(delta, target_rank)
    if target_rank is None or not config:
        return
    for lora_config in (config.values() if isinstance(config, Mapping) else [config]):
        lora_config.r = target_rank
        lora_config.rank_pattern = dict.fromkeys(lora_config.rank_pattern, target_rank)


def _set_rank(delta: Any, rank: int) -> None:
    """Record the factors' (padded) rank on the delta and its factor modules."""
    delta.r = rank
    for module in (getattr(delta, "lora_A", None), getattr(delta, "lora_B", None)):
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd):
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, config: Any,
    parameter_prefix: str = "lora_",
) -> None:
    """Swap the tensors of loaded adapter ``adapter_name`` for ``state_dict`` (saved-format keys, as in
    ``adapter_model.safetensors``) of an adapter with ``config``, in place, all or nothing.

    Args:
        model: A ``PeftModel`` (compiled or not) or a module with deltatune LoRA layers.
        state_dict: The new adapter's tensors.
        adapter_name: The loaded adapter whose weights are replaced; it keeps its name.
        config: The new adapter's ``LoraConfig``: its ranks and alphas give the new scales.
        parameter_prefix: peft's argument; only ``"lora_"`` (LoRA) is supported.

    Raises:
        ValueError: another ``parameter_prefix``, or the adapter is merged.
        AdapterLoadError: a tensor for a layer the loaded adapter does not adapt (or a base-model tensor), a shape
            that does not fit, or a rank above the padded ``target_rank`` of a prepared model.
    """
    if parameter_prefix != "lora_":
        raise ValueError(f"hot-swapping supports LoRA only (parameter_prefix='lora_'), got {parameter_prefix!r}")
    root = _adapter_root(model)
    deltas = dict(_lora_deltas(root, adapter_name))
    if not deltas:
        raise AdapterStateError(f"no loaded LoRA adapter named {adapter_name!r} to hot-swap")
    if any(adapter_name in layer.merged_adapters for _, layer in adapter_layers(root)):
        raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before hot-swapping it")
    layers = {k[len(checkpoint.LAYER_KEY_PREFIX):]: v for k, v in state_dict.items()
              if k.startswith(checkpoint.LAYER_KEY_PREFIX)}
    if len(layers) != len(state_dict):
        bad = next(k for k in state_dict if not k.startswith(checkpoint.LAYER_KEY_PREFIX))
        raise AdapterLoadError(f"hot-swap: key {bad!r} is not a layer adapter tensor")
    mapping = checkpoint.to_model_keys(layers, checkpoint.adapter_holders(root), adapter_name)
    params = dict(root.named_parameters())
    marker = f".deltas.{adapter_name}."
    owned = (marker, f".modules_to_save.{adapter_name}.")  # the adapter's deltas and trained copies
    unknown = [k for k, target in mapping.items() if target not in params or not any(m in target for m in owned)]
    if unknown:
        raise AdapterLoadError(f"hot-swap: the new adapter has {len(unknown)} tensor(s) for layers or parameters the "
                               f"loaded adapter {adapter_name!r} does not have, first {unknown[0]!r}; hot-swapping "
                               f"needs the same (or fewer) target modules; load it with load_adapter instead")
    plan = []  # (parameter, new value, how), checked in full before any write
    for key, target in mapping.items():
        path, _, rest = target.partition(marker)
        delta, value, param = deltas.get(path), layers[key], params[target]
        rank_dim = None  # which dim of this tensor is the rank, for a LoRA factor whose rank may change
        if delta is not None and not _fixed_rank(delta) and rest in _factor_names(delta):
            rank_dim = _factor_names(delta).index(rest)
        if value.shape == param.shape:
            plan.append((param, value, "copy", None))
        elif rank_dim is None or value.dim() != param.dim() or any(
                a != b for i, (a, b) in enumerate(zip(value.shape, param.shape, strict=True)) if i != rank_dim):
            raise AdapterLoadError(f"hot-swap: shape mismatch for {key!r}: new {list(value.shape)}, loaded "
                                   f"{list(param.shape)}")
        elif value.shape[rank_dim] < param.shape[rank_dim]:
            plan.append((param, value, "pad", (rank_dim, _groups(delta))))
        elif isinstance(delta.scaling, torch.Tensor):  # prepared for compilation: the storage must stay
            rank = value.shape[rank_dim] * (_groups(delta) if rank_dim else 1)
            raise AdapterLoadError(f"hot-swap: {key!r} has rank {rank}, above the {delta.r} the model was prepared "
                                   f"for; call "
                                   f"prepare_model_for_compiled_hotswap with a target_rank of at least the largest "
                                   f"rank before compiling")
        else:
            plan.append((param, value, "replace", None))
    new_scaling = {path: _scaling(config, path) for path in deltas}
    loaded = {id(param) for param, *_ in plan}
    with torch.no_grad():
        for path, delta in deltas.items():  # layers the new adapter does not target: no update
            for name in _factor_names(delta):
                param = delta.get_parameter(name)
                if id(param) not in loaded:
                    param.zero_()
        for param, value, how, extra in plan:
            value = value.to(dtype=param.dtype, device=param.device)
            if how == "copy":
                param.copy_(value)
            elif how == "pad":
                _pad_into(param, value, *extra)
            else:
                param.data = value.clone()
        for path, delta in deltas.items():
            if not _fixed_rank(delta):
                _set_rank(delta, delta.get_parameter(_factor_names(delta)[0]).shape[0])
            if isinstance(delta.scaling, torch.Tensor):
                delta.scaling.fill_(new_scaling[path])
            else:
                delta.scaling = new_scaling[path]


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace the weights of loaded adapter ``adapter_name`` with those of the saved adapter at
    ``model_name_or_path`` (a directory or hub id), in place (see the module docstring); the adapter keeps its name
    and ``model.peft_config[adapter_name]`` becomes the new adapter's config.

    Args:
        model: A ``PeftModel``, compiled or not.
        model_name_or_path: The adapter to swap in.
        adapter_name: The loaded adapter to replace, e.g. ``"default"``.
        torch_device: Where to read the tensors to (they are copied next to the loaded ones either way).
        kwargs: Hub keywords (``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``).

    Raises:
        ConfigError: the new adapter is not LoRA, or its config differs in a field the weights cannot carry.
        TypeError: an unknown keyword.
        AdapterLoadError / ValueError: see :func:`hotswap_adapter_from_state_dict`.
    """
    from .model import PeftModel, _hub_kwargs, _read_adapter, _remap

    peft_model = _unwrap_compiled(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"hotswap_adapter needs a PeftModel, got {type(peft_model).__name__}")
    hub = _hub_kwargs("hotswap_adapter", kwargs)
    if adapter_name not in peft_model.peft_config:
        raise AdapterStateError(f"no adapter {adapter_name!r} to hot-swap; have {list(peft_model.peft_config)}")
    config, config_source, tensors, source, _ = _read_adapter(model_name_or_path, None, False, hub)
    old = peft_model.peft_config[adapter_name]
    for which, value in (("loaded", old), ("new", config)):
        if getattr(value.peft_type, "value", value.peft_type) != "LORA":
            raise ConfigError(f"hot-swapping supports LoRA adapters only; the {which} adapter is "
                              f"{getattr(value.peft_type, 'value', value.peft_type)}")
    differ = [k for k in _MUST_MATCH if getattr(old, k, None) != getattr(config, k, None)]
    if differ:
        values = ", ".join(f"{k}: {getattr(old, k, None)!r} vs {getattr(config, k, None)!r}" for k in differ)
        raise ConfigError(f"{config_source}: cannot hot-swap into {adapter_name!r}: the configs differ in {differ} "
                          f"({values})")
    if torch_device is not None:
        tensors = {k: v.to(torch_device) for k, v in tensors.items()}
    tensors = _remap(peft_model.get_base_model(), config, tensors, None)
    try:
        hotswap_adapter_from_state_dict(peft_model, tensors, adapter_name, config)
    except AdapterLoadError as exc:
        raise AdapterLoadError(f"{source}: {exc}") from None
    config = copy.deepcopy(config)
    config.inference_mode = old.inference_mode
    peft_model.peft_config[adapter_name] = config

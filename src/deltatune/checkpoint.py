"""The adapter-file contract: which tensors an adapter owns and under which saved keys, both directions.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (the default adapter
at the top, any other adapter in a sub-folder named after it; ``files`` reads and writes them). Saved keys are the
module paths under the wrapper with the adapter name removed: in memory
``base_model.model.<path>.deltas.<adapter>.lora_A.weight`` is saved as ``base_model.model.<path>.lora_A.weight``, and
a ``modules_to_save`` copy ``base_model.model.<path>.modules_to_save.<adapter>.weight`` is saved as
``base_model.model.<path>.weight`` — exactly the keys peft writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from . import prompt
from .config import PeftConfig
from .errors import AdapterLoadError, AdapterStateError, DeltatuneError
from . import quant
from .inject import build_deltas, undo_scope
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper, adapter_layers
from .registry import LayerMethod, PromptMethod, RouterMethod, get_method
from .resolve import resolve
from .targeting import BiasScope

_CONTAINERS = {AdapterLayer: "deltas", ModulesToSaveWrapper: "modules_to_save"}
_WRAPPED = {AdapterLayer: "base_layer", ModulesToSaveWrapper: "original_module"}

# Saved keys follow where a PeftModel keeps each tensor (peft's layout). ``base_model`` is the wrapper's holder: the
# tensors all of one adapter's layers share (``LayerMethod.make_shared``) are saved once as ``base_model.<name>``, and
# a prompt adapter's ``modules_to_save`` heads as ``base_model.<path>`` (peft's prompt wrapper holds the model itself).
BASE_MODEL_PREFIX = "base_model."
# The holder's ``model`` is the adapted model: layer adapters are saved as ``base_model.model.<path>``.
LAYER_KEY_PREFIX = BASE_MODEL_PREFIX + "model."


# --- state dicts: pure functions over module trees and dicts --------------------------------------------------------

def adapter_holders(root: nn.Module) -> dict[str, nn.Module]:
    """The wrappers under ``root`` that hold adapters (``AdapterLayer`` and ``ModulesToSaveWrapper``), by path."""
    return {name: m for name, m in root.named_modules() if isinstance(m, tuple(_CONTAINERS))}


def layer_adapter_state_dict(
    root: nn.Module, adapter_name: str, biases: BiasScope = "none", save_embedding_layers: bool = False
) -> dict[str, torch.Tensor]:
    """The saved-format state dict of layer adapter ``adapter_name`` in ``root`` (keys relative to ``root``).

    Which tensors belong to the adapter comes from the wrappers themselves: the adapter's delta in each
    ``AdapterLayer``, its copy in each ``ModulesToSaveWrapper``, plus the biases ``biases`` selects
    (``targeting.trained_biases``) and, with ``save_embedding_layers``, the base weights of adapted embedding layers
    (needed when the vocabulary was resized).
    """
    out: dict[str, torch.Tensor] = {}
    holders = adapter_holders(root)
    # the adapted embeddings' tables, also saved under a head tied to one (ensure_weight_tying), as peft does
    tables = {id(h.base_layer.weight) for h in holders.values()
              if isinstance(h, AdapterLayer) and adapter_name in h.deltas and isinstance(h.base_layer, nn.Embedding)}
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name not in container:
            continue
        item = container[adapter_name]
        for key, value in (item.saved_state_dict() if isinstance(holder, AdapterLayer) else item.state_dict()).items():
            out[f"{path}.{key}"] = value
        if isinstance(holder, AdapterLayer):
            base = holder.base_layer
            if biases == "adapted" and getattr(base, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = base.bias
            if save_embedding_layers and id(getattr(base, "weight", None)) in tables:
                out[f"{path}.base_layer.weight"] = base.weight
    if biases == "all":
        # Biases inside containers belong to an adapter: this one's were saved above under adapter-free keys, and
        # another adapter's must not leak into this file under keys that name it.
        owned = {id(p) for h in holders.values() for p in getattr(h, _CONTAINERS[type(h)]).parameters()}
        for name, param in root.named_parameters():
            if name.endswith("bias") and name not in out and id(param) not in owned:
                out[name] = param
    return {k: v.detach() for k, v in out.items()}


def to_model_keys(saved_keys: Iterable[str], holders: Mapping[str, nn.Module], adapter_name: str) -> dict[str, str]:
    """Map saved keys to in-memory parameter names: insert ``<container>.<adapter>`` after the wrapper's path, or only
    ``<adapter>`` when the key already names the container (peft writes ``classifier.modules_to_save.bias`` for a
    ``modules_to_save`` bias under ``bias="all"``).

    Keys that address the wrapped module itself (``...base_layer.bias``, ``...original_module.weight``) or lie outside
    any wrapper are returned unchanged.
    """
    mapping = {}
    for key in saved_keys:
        parts = key.split(".")
        target = key
        for cut in range(len(parts) - 1, 0, -1):
            holder = holders.get(".".join(parts[:cut]))
            if holder is None:
                continue
            rest, container = parts[cut:], _CONTAINERS[type(holder)]
            if rest[0] == container:  # peft's bias="all" keys keep the container and drop only the adapter name
                target = ".".join([*parts[:cut], container, adapter_name, *rest[1:]])
            elif rest[0] != _WRAPPED[type(holder)]:
                target = ".".join([*parts[:cut], container, adapter_name, *rest])
            break
        mapping[key] = target
    return mapping


def remap_keys(state_dict: Mapping[str, torch.Tensor], key_mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """peft's ``key_mapping`` for a saved adapter: each key, without its ``base_model.model.`` (else ``base_model.``)
    prefix, is rewritten by the first ``{regex: replacement}`` pattern that matches it (``re.subn``), and the prefix
    is put back; used to load an adapter saved for a model whose modules have since been renamed.

    Raises:
        AdapterLoadError: a key without the ``base_model.`` prefix.
    """
    out = {}
    for key, value in state_dict.items():
        prefix = LAYER_KEY_PREFIX if key.startswith(LAYER_KEY_PREFIX) else BASE_MODEL_PREFIX
        if not key.startswith(prefix):
            raise AdapterLoadError(f"key_mapping: saved key {key!r} does not start with {BASE_MODEL_PREFIX!r}")
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            rest, count = re.subn(pattern, replacement, rest)
            if count:
                break
        out[prefix + rest] = value
    return out


def load_layer_adapter_state_dict(
    root: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, source: str = "adapter",
    shared_saved: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Copy a saved-format state dict into adapter ``adapter_name`` of ``root``, all or nothing. ``shared_saved``: the
    same file's shared tensors (``base_model.<name>`` keys without the prefix), which a delta that saves copies of
    them checks its own against (:meth:`~deltatune.layers.Delta.state_from_saved`).

    Every key is mapped and checked (exists, same shape) and every parameter of the adapter must be present before
    the first value is copied, so on error the model is exactly as before.

    Raises:
        AdapterLoadError: unknown keys, missing adapter parameters, or shape mismatches; the message names the first
            offending key (with both shapes) and what to do.
    """
    holders = adapter_holders(root)
    state_dict = _from_saved_formats(state_dict, holders, adapter_name, source, shared_saved or {})
    mapping = to_model_keys(state_dict, holders, adapter_name)
    # every path of a shared parameter (a tied twin's delta holds its source's; peft saves it under both paths)
    params = dict(root.named_parameters(remove_duplicate=False))
    params.update(root.named_buffers(remove_duplicate=False))
    unknown = [k for k, target in mapping.items() if target not in params]
    if unknown:
        raise AdapterLoadError(
            f"{source}: {len(unknown)} saved tensor(s) do not fit this model, first {unknown[0]!r}. The adapter was "
            f"probably saved for a different base model or with different target_modules.{_tied_hint(root, unknown)}"
        )
    # Outside the adapter's own tensors, a file may only carry what peft writes there: biases (``bias="all"`` /
    # ``"lora_only"``) and the base weights of adapted layers (resized embeddings). Anything else would silently
    # overwrite the base model.
    own = tuple(f".{container}.{adapter_name}." for container in _CONTAINERS.values())
    foreign = [
        k for k, t in mapping.items()
        if not any(marker in t for marker in own) and not t.endswith(("bias", ".base_layer.weight"))
    ]
    if foreign:
        raise AdapterLoadError(
            f"{source}: tensor {foreign[0]!r} would overwrite a base-model weight, which an adapter file must not do "
            f"({len(foreign)} such tensor(s)); the file is not a plain adapter. Load the full model instead."
        )
    for key, target in mapping.items():
        saved, current = tuple(state_dict[key].shape), tuple(params[target].shape)
        if saved != current:
            raise AdapterLoadError(_shape_message(source, key, saved, current, params[target]))
        if params[target].is_floating_point() and not state_dict[key].is_floating_point():
            raise AdapterLoadError(
                f"{source}: tensor {key!r} has dtype {state_dict[key].dtype} but the model's parameter is "
                f"{params[target].dtype}; a floating-point tensor is required. The file is corrupt or was not written "
                f"by an adapter library."
            )
    # every adapter parameter, with all the paths it has: one tensor shared by two deltas (a tied twin's rows) is
    # present when the file holds it under any of them (peft's LoRA writes trainable tokens under the source only)
    expected: dict[int, list[str]] = {}
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name in container:
            prefix = f"{path}.{_CONTAINERS[type(holder)]}.{adapter_name}."
            constants = getattr(container[adapter_name], "constants", ())  # never saved (Delta.constants)
            for n, p in container[adapter_name].named_parameters(remove_duplicate=False):
                if n not in constants:
                    expected.setdefault(id(p), []).append(prefix + n)
    loaded = set(mapping.values())
    missing = sorted(paths[0] for paths in expected.values() if not loaded.intersection(paths))
    if missing:
        raise AdapterLoadError(
            f"{source}: the file lacks {len(missing)} tensor(s) the adapter needs, first {missing[0]!r}; "
            f"the file is incomplete or was saved with a different config"
        )
    # one shared tensor (Lily's projectors, a tied twin's rows) saved under several paths must hold one value
    first_key: dict[int, str] = {}
    for key, target in mapping.items():
        other = first_key.setdefault(id(params[target]), key)
        dtype = params[target].dtype
        if other != key and not torch.equal(state_dict[key].to(dtype), state_dict[other].to(dtype)):
            raise AdapterLoadError(
                f"{source}: tensors {other!r} and {key!r} are one shared tensor of the adapter but hold different "
                f"values; the file is corrupt or was not saved from this adapter's config"
            )
    with torch.no_grad():
        for key, target in mapping.items():
            params[target].copy_(state_dict[key].to(dtype=params[target].dtype, device=params[target].device))


def _tied_hint(root: nn.Module, unknown: Iterable[str]) -> str:
    """Why keys of a module whose weight is an adapted module's (a tied table) can be in a file the config does not
    place: peft 0.21.2 saves an ``ensure_weight_tying`` adapter of T5 / GPT-2 with ``target_modules`` naming only the
    input embedding (``shared``, ``transformer.wte``), and trains T5's tied ``embed_tokens`` apart from it."""
    adapted = {id(layer.base_layer.weight): name for name, layer in adapter_layers(root)
               if isinstance(getattr(layer.base_layer, "weight", None), torch.Tensor)}
    modules = dict(root.named_modules())
    tied = {}
    for key in unknown:
        path = next((p for p in (key.rsplit(".", cut)[0] for cut in range(1, key.count(".") + 1)) if p in modules), "")
        owner = adapted.get(id(getattr(modules.get(path), "weight", None)))
        if path and owner is not None and owner != path:
            tied[path] = owner
    if not tied:
        return ""
    return (f" {sorted(tied)} share their weight with the adapted {sorted(set(tied.values()))}: a file peft saved "
            f"with ensure_weight_tying names only the input embedding in target_modules (and trains T5's tied "
            f"embeddings apart); to read it as peft built it, pass config= with these modules in target_modules and "
            f"ensure_weight_tying=False.")


def _from_saved_formats(
    state_dict: Mapping[str, torch.Tensor], holders: Mapping[str, nn.Module], adapter_name: str, source: str,
    shared_saved: Mapping[str, torch.Tensor],
) -> Mapping[str, torch.Tensor]:
    """``state_dict`` with each delta's own tensors passed through its :meth:`~deltatune.layers.Delta.
    state_from_saved` (a delta that saves in a format of its own turns it back into its ``state_dict()`` keys)."""
    owned: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        path = next((".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1) if ".".join(parts[:cut]) in holders),
                    None)
        holder = holders.get(path) if path is not None else None
        if (isinstance(holder, AdapterLayer) and adapter_name in holder.deltas
                and parts[len(path.split("."))] not in ("base_layer", "deltas")):
            owned.setdefault(path, {})[key[len(path) + 1:]] = value
        else:
            rest[key] = value
    if all(type(holders[p].deltas[adapter_name]).state_from_saved is Delta.state_from_saved for p in owned):
        return state_dict
    for path, saved in owned.items():
        try:
            state = holders[path].deltas[adapter_name].state_from_saved(saved, shared_saved)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"{source}: {path}: {exc}") from None
        rest.update({f"{path}.{k}": v for k, v in state.items()})
    return rest


def _shape_message(source: str, key: str, saved: tuple, current: tuple, tensor: torch.Tensor) -> str:
    msg = f"{source}: shape mismatch for {key!r}: saved {list(saved)}, model has {list(current)}."
    vocab_like = key.endswith(("embed_tokens.base_layer.weight", "lora_embedding_A")) or (
        len(saved) == 2 and len(current) == 2 and saved[1] == current[1] and saved[0] != current[0]
        and ("embed" in key or "lm_head" in key or "wte" in key or "shared" in key)
    )
    if vocab_like:
        msg += (
            " The base model's vocabulary size differs from the one the adapter was trained with; call "
            "model.resize_token_embeddings(<saved vocabulary size>) on the base model before loading."
        )
    else:
        msg += " The adapter was saved with another rank or for another base model; load it onto the model it was trained on."
    return msg


def shared_state_copies(
    holder: nn.Module, saved: Mapping[str, torch.Tensor], source: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check an adapter's saved shared tensors (keys ``<name>`` of ``base_model.<name>``) against its shared-state
    module (see ``LayerMethod.make_shared``) and return ``(destination, value)`` pairs to copy once the rest of the
    file has loaded, so that a failed load changes nothing.

    A saved tensor that the module regenerates instead of saving (a non-persistent buffer, e.g. VeRA's projections
    under ``save_projection=False``) is ignored with a warning, as peft does.

    Raises:
        AdapterLoadError: a persistent tensor is missing, or a saved one is unknown or of another shape.
    """
    expected = holder.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise AdapterLoadError(
            f"{source}: the file lacks '{BASE_MODEL_PREFIX}{missing[0]}', which the adapter's config says is saved "
            f"with it; the file is incomplete or was saved with a different config"
        )
    regenerated = {name for name, _ in holder.named_buffers()} - set(expected)
    copies = []
    for key, value in saved.items():
        if key in regenerated:
            warnings.warn(f"{source}: ignoring '{BASE_MODEL_PREFIX}{key}': the adapter's config regenerates it",
                          stacklevel=4)
            continue
        if key not in expected:
            raise AdapterLoadError(
                f"{source}: unexpected tensor '{BASE_MODEL_PREFIX}{key}'; not a tensor of this adapter"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterLoadError(_shape_message(source, BASE_MODEL_PREFIX + key, tuple(value.shape),
                                                  tuple(expected[key].shape), expected[key]))
        if expected[key].is_floating_point() and not value.is_floating_point():
            raise AdapterLoadError(
                f"{source}: tensor '{BASE_MODEL_PREFIX}{key}' has dtype {value.dtype} but a floating-point tensor is "
                f"required; the file is corrupt or was not written by an adapter library"
            )
        copies.append((expected[key], value))
    return copies


# --- the file of a PeftModel's adapter: layer adapters with their shared state, prompt adapters with their heads -----

# Module names that wrappers insert into a gathered state dict's keys (FSDP, activation checkpointing, torch.compile).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def gathered_values(
    saved: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], root: nn.Module, adapter_name: str,
    *, prefix: str, shared_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """``saved`` (an adapter's file tensors) with every value taken from ``state_dict``: a full state dict of the model
    gathered by FSDP or DeepSpeed ZeRO-3, whose live parameters are only shards. A tensor is found under the key the
    model's ``state_dict()`` gives it (wrapper segments such as ``_fsdp_wrapped_module.`` ignored) or under its key
    in the file, as peft accepts both.

    Args:
        root: The module the file's layer keys are relative to, after ``prefix`` (``base_model.model.`` for a
            ``PeftModel``, ``""`` for an injected module).
        shared_prefix: Where the model keeps the adapter's shared tensors (``base_model.<key>`` in the file):
            ``base_model.shared_state.<adapter>.`` for a ``PeftModel``.

    Raises:
        AdapterStateError: a tensor of the adapter is not in ``state_dict`` (nothing is returned).
    """
    clean = {}
    for key, value in state_dict.items():
        for segment in _WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        clean[key] = value
    layer_keys = [k[len(prefix):] for k in saved if k.startswith(prefix)]
    model_keys = {prefix + k: prefix + v for k, v in to_model_keys(layer_keys, adapter_holders(root), adapter_name).items()}
    if shared_prefix is not None:
        model_keys.update({k: shared_prefix + k[len(BASE_MODEL_PREFIX):] for k in saved if k not in model_keys})
    out, missing = {}, []
    for key in saved:
        found = key if key in clean else model_keys.get(key)
        if found in clean:
            out[key] = clean[found]
        else:
            missing.append(model_keys.get(key, key))
    if missing:
        raise AdapterStateError(f"state_dict lacks {len(missing)} tensor(s) of adapter {adapter_name!r}, first "
                                f"{missing[0]!r} (keys as the model's state_dict() names them, or as the file does)")
    return out


def layer_file_state(
    root: nn.Module,
    adapter_name: str,
    *,
    biases: BiasScope = "none",
    save_embedding_layers: bool | str = "auto",
    shared: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors a ``PeftModel`` saves for layer adapter ``adapter_name``, keyed as in its file.

    Args:
        root: The adapted model (``PeftModel.get_base_model()``); its layer tensors are saved as
            ``base_model.model.<path>``.
        biases: Which biases the file carries (``targeting.trained_biases`` of the config).
        save_embedding_layers: Also save the base weights of adapted embedding layers (a resized vocabulary);
            ``"auto"``: whenever the adapter adapts an embedding layer with a delta that does not hold the rows it
            changes itself (``Delta.saves_base_embedding``).
        shared: The adapter's shared-state module (``LayerMethod.make_shared``), saved once as ``base_model.<name>``.
    """
    if save_embedding_layers == "auto":
        save_embedding_layers = any(
            isinstance(layer.base_layer, nn.Embedding) and adapter_name in layer.deltas
            and layer.deltas[adapter_name].saves_base_embedding
            for _, layer in adapter_layers(root)
        )
    state = layer_adapter_state_dict(root, adapter_name, biases, bool(save_embedding_layers))
    out = {LAYER_KEY_PREFIX + k: v for k, v in state.items()}
    if shared is not None:
        out.update({BASE_MODEL_PREFIX + k: v.detach() for k, v in shared.state_dict().items()})
    return out


def load_layer_file_state(
    root: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str,
    source: str,
    shared: nn.Module | None = None,
) -> None:
    """Load what :func:`layer_file_state` saved into the existing adapter ``adapter_name`` of ``root``, all or nothing:
    the shared tensors are checked first and copied only once the layers have loaded.

    Raises:
        AdapterLoadError: a key outside ``base_model.model.`` that is not one of ``shared``'s, or anything
            :func:`load_layer_adapter_state_dict` / :func:`shared_state_copies` refuse.
    """
    shared_saved = {
        k[len(BASE_MODEL_PREFIX):]: v for k, v in state_dict.items()
        if shared is not None and k.startswith(BASE_MODEL_PREFIX) and not k.startswith(LAYER_KEY_PREFIX)
    }
    bad = next((
        k for k in state_dict
        if not k.startswith(LAYER_KEY_PREFIX) and k[len(BASE_MODEL_PREFIX):] not in shared_saved
    ), None)
    if bad is not None:
        raise AdapterLoadError(
            f"{source}: key {bad!r} does not start with {LAYER_KEY_PREFIX!r}; not a layer adapter file"
        )
    copies = shared_state_copies(shared, shared_saved, source) if shared is not None else []
    layers = {k[len(LAYER_KEY_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LAYER_KEY_PREFIX)}
    load_layer_adapter_state_dict(root, layers, adapter_name, source, shared_saved)
    with torch.no_grad():
        for destination, value in copies:
            destination.copy_(value.to(dtype=destination.dtype, device=destination.device))


def prompt_file_state(root: nn.Module, adapter_name: str, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a ``PeftModel`` saves for prompt adapter ``adapter_name``: the encoder's output table as
    ``prompt_embeddings`` (``PromptStrategy.table_shape``: ``[virtual tokens, token_dim]`` per transformer
    sub-module, or ``[virtual tokens, num_layers * 2 * token_dim]`` for a key/value prefix) and the
    ``modules_to_save`` heads of ``root`` (the adapted model) as ``base_model.<path>``."""
    heads = layer_adapter_state_dict(root, adapter_name)
    return {prompt.PROMPT_KEY: prompt.saved_table(encoder), **prompt.extra_state(encoder),
            **{BASE_MODEL_PREFIX + k: v for k, v in heads.items()}}


def load_prompt_file_state(
    root: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, encoder: nn.Module, source: str
) -> nn.Module:
    """Load what :func:`prompt_file_state` saved: the heads into their ``modules_to_save`` copies in ``root``, the
    table into ``encoder``.

    Returns:
        The encoder to use from now on (``prompt.load_prompt_embeddings``: a P-tuning or projected-prefix encoder,
        whose file holds only its output, continues as a plain table).

    Raises:
        AdapterLoadError: no ``prompt_embeddings``, a key outside ``base_model.``, or a tensor that does not fit.
    """
    if prompt.PROMPT_KEY not in state_dict:
        raise AdapterLoadError(f"{source}: no {prompt.PROMPT_KEY!r} tensor; not a prompt-learning adapter file")
    own = getattr(encoder, "extra_keys", ())  # tensors the encoder keeps beside the table (multitask factors)
    extra = {k: v for k, v in state_dict.items() if k in own}
    heads = {k: v for k, v in state_dict.items() if k != prompt.PROMPT_KEY and k not in own}
    bad = next((k for k in heads if not k.startswith(BASE_MODEL_PREFIX)), None)
    if bad is not None:
        raise AdapterLoadError(f"{source}: unexpected key {bad!r} in a prompt-learning adapter file")
    load_layer_adapter_state_dict(
        root, {k[len(BASE_MODEL_PREFIX):]: v for k, v in heads.items()}, adapter_name, source
    )
    return prompt.load_prompt_embeddings(encoder, state_dict[prompt.PROMPT_KEY], source, extra)


# --- load guards: nothing allocated for a config that does not fit its file, nothing changed by a failed load ------

def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors live on the meta device (shapes and dtypes only; nothing is allocated). A
    quantized layer becomes the dense ``nn.Linear`` its adapters see (``quant.delta_view``)."""
    handler = quant.handler_for(module)
    if handler is not None:
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                         dtype=handler.dtype(module))
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def check_planned_size(
    model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], source: str, config_source: str
) -> None:
    """Refuse, before allocating anything, a config that describes a far bigger adapter than the weights file holds.

    A corrupt or hostile ``adapter_config.json`` (``"r": 100000000``) would otherwise allocate (and initialise)
    gigabytes before the shape check could object. The adapter is built once on the meta device, which costs no
    memory; a valid file always holds at least every parameter the adapter has. Small differences and anything the
    dry run cannot do are left to the real construction and the key-by-key checks, whose messages are more precise.
    A prompt adapter's planned size is its saved table (``num_virtual_tokens × token_dim × ...``).
    """
    method = get_method(config.peft_type)
    if isinstance(method, RouterMethod):  # its own module; the experts are loaded (and checked) as adapters
        planned: int | None = method.planned_size(config)
    elif not isinstance(method, LayerMethod):  # a prompt method: the saved table is what loading allocates
        try:
            planned_config = copy.deepcopy(config)
            prompt.fill_dimensions(planned_config, model, method.strategy)
            planned = math.prod(method.strategy.table_shape(planned_config))
        except Exception:  # dimensions it cannot read: building the encoder reports them
            return
        _check_prompt_encoder_size(model, planned_config, method, config_source)
    else:
        planned = _planned_layer_size(model, config, method)
        if planned is None:
            return
    available = sum(t.numel() for t in tensors.values())
    if planned > max(2 * available, available + 2**20):
        raise AdapterLoadError(
            f"{config_source} describes an adapter of {planned:,} parameters but {source} holds only {available:,} "
            f"values; the config does not belong to these weights (check r, rank_pattern and target_modules, or "
            f"num_virtual_tokens and token_dim). Nothing was allocated."
        )


def _check_prompt_encoder_size(model: nn.Module, config: PeftConfig, method: PromptMethod, config_source: str) -> None:
    """A trainable load builds the method's encoder (P-tuning's MLP or LSTM, prefix tuning's projection) before the
    saved table replaces it; refuse, from a dry run on the meta device, an encoder larger than the base model itself
    (``encoder_hidden_size`` from a corrupt file) before it is allocated."""
    if config.inference_mode or getattr(config, "encoder_hidden_size", None) is None:
        return  # a plain table (inference, prompt tuning), checked above against the file
    try:
        with torch.device("meta"):
            encoder = method.make_encoder(config, None)
        size = sum(p.numel() for p in encoder.parameters())
    except Exception:  # anything the dry run cannot do: the real construction reports it
        return
    base = sum(p.numel() for p in model.parameters())
    if size > max(base, 2**20):
        raise AdapterLoadError(
            f"{config_source}: the trainable {config.peft_type.value} encoder it describes has {size:,} parameters, "
            f"more than the base model's {base:,}; check encoder_hidden_size and encoder_num_layers. Nothing was "
            f"allocated."
        )


def _planned_layer_size(model: nn.Module, config: PeftConfig, method: LayerMethod) -> int | None:
    """Parameters a layer method's adapter would have on ``model``, or ``None`` when the dry run cannot tell: the
    same resolution as the real construction, then the deltas built on meta-device copies of the targets."""
    try:
        resolved = resolve(model, config, method)
        on_meta = dataclasses.replace(
            resolved, targets={n: _meta_copy(b) for n, b in resolved.targets.items()},
            parameters={n: _meta_copy(b) for n, b in resolved.parameters.items()},
            extra={n: (_meta_copy(b), s) for n, (b, s) in resolved.extra.items()},
        )
        with torch.device("meta"):
            deltas, shared = build_deltas(on_meta, {})
    except Exception:  # bad targets, an op without a meta kernel...: the real construction reports it
        return None
    planned = sum(p.numel() for delta in deltas.values() for p in delta.parameters())
    if shared is not None:  # saved once per adapter
        planned += sum(t.numel() for t in shared.state_dict().values())
    return planned


@contextlib.contextmanager
def naming_source(source: str) -> Iterator[None]:
    """Re-raise deltatune errors from building an adapter with ``source`` (the config file) in the message, so that
    every loading error names the file it came from."""
    try:
        yield
    except DeltatuneError as exc:
        if source in str(exc):
            raise
        raise type(exc)(f"{source}: {exc}") from exc


@contextlib.contextmanager
def restore_base_on_error(model: nn.Module, config: PeftConfig) -> Iterator[None]:
    """Keep a failed load all-or-nothing. Structural changes made while building the adapter (LoRA's
    ``layer_replication``, ``inject.prepared_model``) are undone however late the load fails (``inject.undo_scope``
    around the whole load). For configs whose deltas rewrite the base weights when built
    (``LayerMethod.rewrites_base_weights``: LoRA's PiSSA / OLoRA keep the residual ``W₀ - BA`` in the base layer),
    the base state is snapshotted first and put back on error; other configs never touch base weights before the
    load succeeds, so they pay nothing."""
    method = get_method(config.peft_type)
    rewrites = isinstance(method, LayerMethod) and method.rewrites_base_weights is not None
    with undo_scope():
        if not (rewrites and method.rewrites_base_weights(config)):
            yield
            return
        # By tensor identity, not by name: a failure may leave wrappers around the very same base tensors.
        snapshot = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for tensor, saved in snapshot:
                    tensor.copy_(saved)
            raise

"""The adapter-file contract: which tensors an adapter owns and under which saved keys, both directions.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (the default adapter
at the top, any other adapter in a sub-folder named after it; ``files`` reads and writes them). Saved keys are the
module paths under the wrapper with the adapter name removed: in memory
``base_model.model.<path>.deltas.<adapter>.lora_A.weight`` is saved as ``base_model.model.<path>.lora_A.weight``, and
a ``modules_to_save`` copy ``base_model.model.<path>.modules_to_save.<adapter>.weight`` is saved as
``base_model.model.<path>.weight`` — exactly the keys peft writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import AdapterLoadError
from .layers import AdapterLayer, ModulesToSaveWrapper

_CONTAINERS = {AdapterLayer: "deltas", ModulesToSaveWrapper: "modules_to_save"}
_WRAPPED = {AdapterLayer: "base_layer", ModulesToSaveWrapper: "original_module"}

# Where a PeftModel's layer adapters sit in its state dict and in adapter files: under the wrapper's ``base_model``
# holder, whose ``model`` is the adapted model (peft's layout).
LAYER_KEY_PREFIX = "base_model.model."


# --- state dicts: pure functions over module trees and dicts --------------------------------------------------------

def _holders(root: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in root.named_modules() if isinstance(m, tuple(_CONTAINERS))}


def layer_adapter_state_dict(
    root: nn.Module, adapter_name: str, bias: str = "none", save_embedding_layers: bool = False
) -> dict[str, torch.Tensor]:
    """The saved-format state dict of layer adapter ``adapter_name`` in ``root`` (keys relative to ``root``).

    Which tensors belong to the adapter comes from the wrappers themselves: the adapter's delta in each
    ``AdapterLayer``, its copy in each ``ModulesToSaveWrapper``, plus the biases ``bias`` selects and, with
    ``save_embedding_layers``, the base weights of adapted embedding layers (needed when the vocabulary was resized).
    """
    out: dict[str, torch.Tensor] = {}
    holders = _holders(root)
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name not in container:
            continue
        item = container[adapter_name]
        for key, value in (item.saved_state_dict() if isinstance(holder, AdapterLayer) else item.state_dict()).items():
            out[f"{path}.{key}"] = value
        if isinstance(holder, AdapterLayer):
            base = holder.base_layer
            if bias.endswith("_only") and getattr(base, "bias", None) is not None:  # lora_only, oft_only, ...
                out[f"{path}.base_layer.bias"] = base.bias
            if save_embedding_layers and isinstance(base, nn.Embedding):
                out[f"{path}.base_layer.weight"] = base.weight
    if bias == "all":
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


def load_layer_adapter_state_dict(
    root: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, source: str = "adapter"
) -> None:
    """Copy a saved-format state dict into adapter ``adapter_name`` of ``root``, all or nothing.

    Every key is mapped and checked (exists, same shape) and every parameter of the adapter must be present before
    the first value is copied, so on error the model is exactly as before.

    Raises:
        AdapterLoadError: unknown keys, missing adapter parameters, or shape mismatches; the message names the first
            offending key (with both shapes) and what to do.
    """
    holders = _holders(root)
    mapping = to_model_keys(state_dict, holders, adapter_name)
    params = dict(root.named_parameters())
    params.update(root.named_buffers())
    unknown = [k for k, target in mapping.items() if target not in params]
    if unknown:
        raise AdapterLoadError(
            f"{source}: {len(unknown)} saved tensor(s) do not fit this model, first {unknown[0]!r}. The adapter was "
            f"probably saved for a different base model or with different target_modules."
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
    expected = set()
    for path, holder in holders.items():
        container = getattr(holder, _CONTAINERS[type(holder)])
        if adapter_name in container:
            prefix = f"{path}.{_CONTAINERS[type(holder)]}.{adapter_name}."
            constants = getattr(container[adapter_name], "constants", ())  # never saved (Delta.constants)
            expected.update(prefix + n for n, _ in container[adapter_name].named_parameters() if n not in constants)
    missing = sorted(expected - set(mapping.values()))
    if missing:
        raise AdapterLoadError(
            f"{source}: the file lacks {len(missing)} tensor(s) the adapter needs, first {missing[0]!r}; "
            f"the file is incomplete or was saved with a different config"
        )
    with torch.no_grad():
        for key, target in mapping.items():
            params[target].copy_(state_dict[key].to(dtype=params[target].dtype, device=params[target].device))


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


def shared_state_plan(
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
            f"{source}: the file lacks 'base_model.{missing[0]}', which the adapter's config says is saved with it; "
            f"the file is incomplete or was saved with a different config"
        )
    regenerated = {name for name, _ in holder.named_buffers()} - set(expected)
    plan = []
    for key, value in saved.items():
        if key in regenerated:
            warnings.warn(f"{source}: ignoring 'base_model.{key}': the adapter's config regenerates it", stacklevel=3)
            continue
        if key not in expected:
            raise AdapterLoadError(f"{source}: unexpected tensor 'base_model.{key}'; not a tensor of this adapter")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterLoadError(_shape_message(source, f"base_model.{key}", tuple(value.shape),
                                                  tuple(expected[key].shape), expected[key]))
        plan.append((expected[key], value))
    return plan

"""Will a serving engine load this adapter? Answered from the adapter's files alone, before deployment.

vLLM serves peft-format LoRA adapters (``--enable-lora``), and deltatune's plain LoRA, rsLoRA and rank/alpha-pattern
adapters reproduce their greedy tokens there. It refuses, at load time, everything else an adapter file can hold:
the list below is vLLM's (its ``PEFTHelper`` checks and its LoRA weight loader, verified with vLLM 0.32), so a
deployment fails here, with the reason and what to do, instead of on the server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, DeltatuneError
from .files import CONFIG_NAME, SAFETENSORS_NAME, read_json_file, read_safetensors_header, resolve_file
from .registry import LayerMethod, get_method

# The values vLLM's --max-lora-rank accepts.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# modules_to_save vLLM loads (classification heads); any other full module in the file is refused.
_VLLM_HEADS = {"classifier", "score"}


@dataclass
class VllmVerdict:
    """Whether vLLM loads an adapter.

    Attributes:
        loads: No problem found.
        problems: Each reason vLLM would refuse the adapter, with what to do instead.
        max_lora_rank: The smallest ``--max-lora-rank`` that admits the adapter's largest rank (``None`` when no
            allowed value does, or for a method that is not LoRA).
    """

    loads: bool
    problems: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None


def _mergeable(peft_type: Any) -> bool:
    """Whether adapters of ``peft_type`` can fold into the weights (a layer method not marked otherwise)."""
    try:
        method = get_method(str(peft_type))
    except DeltatuneError:
        return False
    return isinstance(method, LayerMethod) and method.mergeable


def vllm_verdict(
    config: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]], max_lora_rank: int | None = None
) -> VllmVerdict:
    """Check an adapter against vLLM's LoRA loader.

    Args:
        config: ``adapter_config.json`` as a dict.
        tensors: The safetensors header (name -> ``{"shape": [...], ...}``) of ``adapter_model.safetensors``.
        max_lora_rank: The server's ``--max-lora-rank``, if known (vLLM's default is 16).

    Returns:
        The verdict; ``problems`` is empty when vLLM loads the adapter.
    """
    method = config.get("peft_type")
    if method != "LORA":
        if _mergeable(method):
            advice = ("serve a merged model instead (deltatune merge), which needs no adapter support, or convert it "
                      "to a LoRA (deltatune.save_as_lora(path, model, rank), approximate below full rank)")
        else:
            advice = ("and its change is not a weight update, so it can neither be merged nor converted to a LoRA; "
                      "serve it with deltatune (PeftModel.generate)")
        return VllmVerdict(False, [f"{method} is not LoRA: vLLM serves LoRA adapters only; {advice}"])
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora): vLLM does not implement it; serve a merged model (deltatune merge)")
    if config.get("lora_bias"):
        problems.append("lora_bias: vLLM loads no LoRA bias; serve a merged model (deltatune merge)")
    for field_name, what in (("use_qalora", "QALoRA's pooled input"), ("arrow_config", "Arrow's per-token routing"),
                             ("kasa_config", "KaSA's truncated base weight")):
        if config.get(field_name):
            problems.append(f"{field_name}: vLLM does not implement {what}; serve a merged model (deltatune merge)")
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias={config['bias']!r}: vLLM loads no trained biases; train with bias='none' or serve a merged model"
        )
    extra = sorted(set(config.get("modules_to_save") or []) - _VLLM_HEADS)
    if extra:
        problems.append(
            f"modules_to_save {extra}: vLLM loads only {sorted(_VLLM_HEADS)} heads; serve a merged model"
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith("loftq"):
        problems.append(
            "init_lora_weights='loftq': the adapter fits the LoftQ-quantized base it was initialised on, not the "
            "original weights; serve that quantized model with it, or a merged model"
        )
    if init.startswith(("pissa", "olora", "corda", "lora_ga")):
        problems.append(
            f"init_lora_weights={config['init_lora_weights']!r}: the adapter only fits the residual base it was "
            f"trained on; save it with save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter "
            f"saved right after creation>) to get a plain LoRA for the original base"
        )
    conv = sorted(k for k, v in tensors.items() if ".lora_A." in k and len(v.get("shape", ())) != 2)
    if conv:
        problems.append(f"convolution targets ({conv[0]}, ...): vLLM adapts linear layers only; serve a merged model")
    resized = sorted(k for k in tensors if k.endswith(".base_layer.weight") or k.endswith("embed_tokens.weight"))
    if resized:
        problems.append(
            f"the file holds base weights ({resized[0]}): a resized vocabulary, which vLLM's LoRA loader refuses; "
            f"serve a merged model"
        )
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    rank = max(int(r) for r in ranks)
    needed = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)
    if needed is None:
        problems.append(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    elif max_lora_rank is not None and rank > max_lora_rank:
        problems.append(f"rank {rank} exceeds --max-lora-rank {max_lora_rank}; start vLLM with --max-lora-rank {needed}")
    return VllmVerdict(not problems, problems, needed)


def check_vllm(
    adapter: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
    max_lora_rank: int | None = None,
) -> VllmVerdict:
    """:func:`vllm_verdict` for a saved adapter (local directory or hub repo), from its config and the header of its
    safetensors file; no model is loaded and nothing is unpickled (an adapter with only ``adapter_model.bin`` is
    refused: vLLM reads safetensors).

    Raises:
        ConfigError: no ``adapter_config.json`` there.
    """
    hub = {"revision": revision, "subfolder": subfolder}
    config_path = resolve_file(os.fspath(adapter), CONFIG_NAME, **hub)
    if config_path is None:
        raise ConfigError(f"no {CONFIG_NAME} in {os.fspath(adapter)!r}; is this an adapter directory?")
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    weights = resolve_file(os.fspath(adapter), SAFETENSORS_NAME, **hub)
    if weights is None:
        return VllmVerdict(False, [f"no {SAFETENSORS_NAME}: vLLM reads safetensors; re-save the adapter"])
    header = {k: v for k, v in read_safetensors_header(weights).items() if k != "__metadata__"}
    return vllm_verdict(config, header, max_lora_rank)

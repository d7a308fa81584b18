"""What an adapter selects in a model: its target modules (one model walk, one clear error), the per-module values
of its patterns, and the biases it trains.

Three matching rules, each the one peft applies to the field it serves, so that a file selects the same modules in
both libraries:

* :func:`name_matches` — ``target_modules``, ``exclude_modules``, ``modules_to_save``. A list of names matches a
  module whose full dotted name equals an entry or ends with ``"." + entry`` (``"q_proj"`` never matches
  ``"k_q_proj"``); a string is a regular expression that must match the full name (``re.fullmatch``);
  ``"all-linear"`` (target_modules only) is expanded first to the leaf names of every ``nn.Linear`` / transformers
  ``Conv1D`` except the output head. (For ``modules_to_save`` peft checks a plain ``endswith``; the dot boundary
  kept here stops ``"classifier"`` from also selecting DistilBERT's ``pre_classifier``.)
* :func:`endswith_matches` — IA3's ``feedforward_modules``. A list entry is a plain ``str.endswith`` (no dot
  boundary: ``"output.dense"`` also matches ``attention.output.dense``); a string is ``re.fullmatch``. The vectors'
  shapes depend on it, so it must be exactly peft's, not the rule above.
* :func:`pattern_value` — ``rank_pattern`` / ``alpha_pattern``. Every key is a regular expression matched against a
  dotted suffix of the name (``(.*\\.)?(key)$``), and the first key in order that matches gives the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from torch import nn

from .errors import NoMatchingPeftModuleError, TargetError

ALL_LINEAR = "all-linear"

# Attention projections adapted by default when a config names no target modules (keyed by config.model_type).
DEFAULT_ATTENTION_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
}

# peft's FourierFT, C3A and WaveFT tables: the attention defaults, except that GPT-2 and GPTBigCode adapt the MLP's
# output projection (one square-ish ``mlp.c_proj`` per block instead of the fused, 3x-wide ``c_attn``).
DEFAULT_MLP_OUT_TARGETS: dict[str, list[str]] = {
    **DEFAULT_ATTENTION_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


def _linear_types() -> tuple[type[nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def name_matches(name: str, patterns: Sequence[str] | str) -> bool:
    """Whether the dotted module ``name`` is selected by ``patterns`` (list of names/dotted suffixes, or a regex)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def endswith_matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    """Whether ``name`` is selected by ``patterns`` under IA3's ``feedforward_modules`` rule (plain ``endswith`` for
    a list, ``re.fullmatch`` for a regex); ``None`` selects nothing."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name.endswith(p) for p in patterns or ())


def pattern_key_regex(key: str) -> str:
    """The regex a ``rank_pattern`` / ``alpha_pattern`` key stands for: ``key`` matching a dotted suffix."""
    return rf"(.*\.)?({key})$"


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that matches the end of module ``name`` (peft's rule: the key is a
    regex matched against a dotted suffix), else ``default``."""
    for key, value in patterns.items():
        if re.match(pattern_key_regex(key), name):
            return value
    return default


def layer_index(name: str, layers_pattern: Sequence[str] | str | None = None) -> int | None:
    """The transformer-layer index in a module name: the number after ``layers_pattern`` or, without a pattern, the
    first all-digit path segment (``model.layers.3.mlp`` -> 3; ``encoder.block.1.layer.0.SelfAttention.q`` -> 1)."""
    parts = name.split(".")
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for i, part in enumerate(parts[:-1]):
        if parts[i + 1].isdigit() and (patterns is None or part in patterns):
            return int(parts[i + 1])
    if patterns is None and parts and parts[0].isdigit():
        return int(parts[0])
    return None


def iter_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of ``model``, skipping the insides of adapter wrappers (their base layers and deltas)."""
    from .layers import AdapterLayer, ModulesToSaveWrapper

    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s) for s in skip):
            continue
        yield name, module
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            skip.append(name + ".")


def output_head_names(model: nn.Module) -> set[str]:
    """Full names of the modules that produce the model's output (never adapted by ``all-linear``)."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def expand_all_linear(model: nn.Module) -> list[str]:
    """``"all-linear"`` as the sorted leaf names of the model's linear layers, minus the output head.

    The expansion is what the resolved config records, so that peft and vLLM, which read names, select the same
    modules.
    """
    from .layers import unwrap

    heads = output_head_names(model)
    linear = _linear_types()
    leaves = set()
    for name, module in iter_candidates(model):
        if isinstance(unwrap(module), linear) and name not in heads:
            leaves.add(name.rsplit(".", 1)[-1])
    head_leaves = {h.rsplit(".", 1)[-1] for h in heads}
    return sorted(leaves - head_leaves)


def _target_patterns(
    model: nn.Module, config, default_targets: dict[str, list[str]] | None = None
) -> list[str] | str:
    """``config.target_modules`` as the resolved config records it: ``None`` becomes the default for the model type
    (``default_targets``, else :data:`DEFAULT_ATTENTION_TARGETS`) and ``"all-linear"`` the leaf names it expands to.

    Raises:
        TargetError: ``target_modules`` is ``None`` and the model type has no default.
    """
    patterns = config.target_modules
    if patterns is None and callable(default_targets):
        return default_targets(model)
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = default_targets if default_targets is not None else DEFAULT_ATTENTION_TARGETS
        if model_type not in table:
            raise TargetError(
                f"no default target_modules for model type {model_type!r}; pass target_modules explicitly, e.g. "
                f"one of {_candidate_leaves(model)[:20]} or 'all-linear'"
            )
        return list(table[model_type])
    if patterns == ALL_LINEAR:
        return expand_all_linear(model)
    return patterns


def find_targets(
    model: nn.Module, config, default_targets: dict[str, list[str]] | None = None
) -> tuple[list[str] | str | None, list[str]]:
    """The resolved ``target_modules`` (:func:`_target_patterns`) and the full names of the modules they select in
    ``model``, in model order; ``config`` is only read.

    Modules in ``config.modules_to_save`` (and everything inside them) are trained in full, so they are never also
    adapted, as in peft (e.g. a classification head under ``"all-linear"``). A config that also targets parameters
    (LoRA's ``target_parameters``) may select no module: ``target_modules=[]``, or ``None`` for a model type without
    default targets (then recorded as ``None``, as peft does).

    Raises:
        TargetError: no default targets; :class:`NoMatchingPeftModuleError` (a ``TargetError``) when nothing
            matches. The message lists the patterns and the model's candidate module names.
    """
    if getattr(config, "target_parameters", None):
        if config.target_modules == []:
            return [], []
        if config.target_modules is None:
            try:
                _target_patterns(model, config, default_targets)
            except TargetError:
                return None, []
    patterns = _target_patterns(model, config, default_targets)
    trained_in_full = [n for n, _ in iter_candidates(model) if name_matches(n, list(config.modules_to_save or []))]
    selected = []
    for name, _ in iter_candidates(model):
        if not name_matches(name, patterns) or any(name == t or name.startswith(t + ".") for t in trained_in_full):
            continue
        if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            if layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        selected.append(name)
    if not selected:
        extra = ""
        if config.layers_to_transform is not None:
            extra = f" in layers {config.layers_to_transform} (layers_pattern={config.layers_pattern!r})"
        raise NoMatchingPeftModuleError(
            f"target_modules {patterns!r}{extra} matched no module of {type(model).__name__}. "
            f"Module names that can be targeted include: {_candidate_leaves(model)[:40]}"
        )
    return patterns, selected


def find_parameter_targets(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(module name, parameter name)`` pairs that ``target_parameters`` ``names`` select, in model order and,
    within a module, in the order its parameters were registered (the order peft nests its wrappers in).

    peft's rule: ``"<module>.<parameter>"`` equals an entry or ends with ``"." + entry``
    (``"experts.gate_up_proj"`` selects ``model.layers.0.mlp.experts.gate_up_proj``). Only a module's own parameters
    count; a module already wrapped by adapter layers is matched through them.

    Raises:
        NoMatchingPeftModuleError: nothing matches; the message lists the parameter names that exist (3-D expert
            stacks first).
    """
    from .layers import unwrap

    selected = []
    for module_name, module in iter_candidates(model):
        for param_name, _ in unwrap(module).named_parameters(recurse=False):
            if name_matches(f"{module_name}.{param_name}", list(names)):
                selected.append((module_name, param_name))
    if not selected:
        raise NoMatchingPeftModuleError(
            f"target_parameters {list(names)!r} matched no parameter of {type(model).__name__}. Parameter names "
            f"that can be targeted include: {_candidate_parameters(model)[:40]}"
        )
    return selected


def _candidate_parameters(model: nn.Module) -> list[str]:
    """Distinct ``<module leaf>.<parameter>`` names of the model's parameters, the 3-D ones (fused MoE experts)
    first: what ``target_parameters`` most likely meant."""
    from .layers import unwrap

    seen: dict[str, int] = {}
    for module_name, module in iter_candidates(model):
        for param_name, param in unwrap(module).named_parameters(recurse=False):
            seen.setdefault(f"{module_name.rsplit('.', 1)[-1]}.{param_name}", param.dim())
    return sorted(seen, key=lambda n: seen[n] != 3)


def find_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full names of the modules selected by ``modules_to_save`` (exact names or dotted suffixes).

    Entries that match nothing are allowed only when another entry matches, because peft's task defaults list
    alternatives (``["classifier", "score"]``); when none matches, :class:`TargetError` lists what exists.
    """
    selected = [name for name, _ in iter_candidates(model) if name_matches(name, list(names))]
    selected = [n for n in selected if not any(n.startswith(s + ".") for s in selected)]
    if names and not selected:
        raise TargetError(
            f"modules_to_save {list(names)!r} matched no module of {type(model).__name__}; "
            f"top-level modules are {[n for n, _ in model.named_children()]}"
        )
    return selected


BiasScope = Literal["none", "all", "adapted"]


def trained_biases(config) -> BiasScope:
    """Which biases train and are saved with an adapter, from peft's ``bias`` field: ``"all"`` (every bias of the
    model), ``"adapted"`` for any ``"<method>_only"`` value (``lora_only``, ``oft_only``, ...: the biases of the
    adapted layers, as peft reads any ``_only`` value), else ``"none"`` (also for methods without the field)."""
    bias = getattr(config, "bias", "none")
    if bias == "all":
        return "all"
    return "adapted" if isinstance(bias, str) and bias.endswith("_only") else "none"


def _candidate_leaves(model: nn.Module) -> list[str]:
    """Distinct leaf names of modules that have weights of their own: what a user would most likely mean."""
    seen: dict[str, None] = {}
    for name, module in iter_candidates(model):
        if any(True for _ in module.parameters(recurse=False)) or hasattr(module, "base_layer"):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)

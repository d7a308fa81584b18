"""EVA, Explained Variance Adaptation (Paischer et al., arXiv 2410.07170): LoRA's ``A`` initialised with the top right
singular vectors of each layer's *inputs* on the fine-tuning data, and the rank budget redistributed across layers by
explained variance (peft's ``init_lora_weights="eva"``).

§3.1: feed mini-batches through the model; for each target layer, an incremental PCA of its input rows (Ross et al.,
2008, the sklearn ``IncrementalPCA`` update with a seeded randomised SVD) until the top components stop moving
(cosine similarity to the previous batch's ≥ ``tau`` for every component the layer is currently allotted). §3.2:
with ``rho · r`` components per layer, the ``Σ r`` components of largest explained-variance ratio over all layers are
kept, so a layer gets between 0 and ``rho · r`` ranks. Layers whose inputs are identical (q/k/v of one block) share
one PCA. Then ``A`` = the layer's components (rows), ``B = 0``: the model starts as the base model. A layer given rank
0 loses its adapter; with ``adjust_scaling_factors`` a layer's alpha is multiplied by ``new_r / r`` so its scale
``alpha / r`` stays the same.

:func:`get_eva_state_dict` computes ``{layer name: A}``; :func:`initialize_lora_eva_weights` loads it into a
``PeftModel`` built with ``init_lora_weights="eva"`` and records the new ranks in the adapter's ``rank_pattern`` /
``alpha_pattern`` (and the adapted layers in ``target_modules``), so the saved config rebuilds the same shapes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..layers import adapter_layers
from ..targeting import pattern_value

__all__ = ["get_eva_state_dict", "initialize_lora_eva_weights"]

_PEFT_PREFIX = "base_model.model."


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """The default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor],
                                              peft_config: Any) -> torch.Tensor:
    """The ``(batch, position)`` indices whose tokens count: attended to and, with ``use_label_mask``, not labelled
    ``label_mask_value`` (prompt tokens in instruction tuning)."""
    if not isinstance(model_input, Mapping):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs dict inputs (input_ids, attention_mask, ...)")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()  # (n, 2)


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor,
                                              layer_name: str) -> torch.Tensor:
    """The layer's input rows at the indices :func:`prepare_model_inputs_fn_language_modeling` kept: ``(n, in)``."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"{layer_name}: unsupported layer input {type(layer_input).__name__}; pass a "
                        f"prepare_layer_inputs_fn that returns a 2-D tensor")
    return layer_input


def _default_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


class _IncrementalPCA:
    """Incremental PCA of rows arriving in batches (Ross et al., 2008, as in sklearn): the previous components scaled
    by their singular values, the centred new batch and a mean-correction row are decomposed together, so the result
    is the PCA of all rows seen. The SVD is randomised (``q = 2k``, 4 power iterations) from a fixed seed, leaving the
    global generator alone; signs are fixed by each component's largest entry."""

    def __init__(self, n_components: int) -> None:
        self.k = n_components
        self.count = 0
        self.mean: torch.Tensor | None = None  # (in,) float64
        self.var: torch.Tensor | None = None  # (in,) float64
        self.components: torch.Tensor | None = None  # (k, in)
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.explained_variance_ratio: torch.Tensor | None = None  # (k,)

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32).clone()  # (n, in)
        n = x.shape[0]
        total = self.count + n
        batch_sum = x.sum(0, dtype=torch.float64)
        batch_mean = batch_sum / n
        centred = x - batch_mean
        batch_m2 = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / n
        if self.mean is None:
            mean, var = batch_sum / total, batch_m2 / total
            x.sub_(mean)  # in place: stays fp32
        else:
            old_sum = self.mean * self.count
            mean = (old_sum + batch_sum) / total
            ratio = self.count / n
            m2 = self.var * self.count + batch_m2 + ratio / total * (old_sum / ratio - batch_sum).square()
            var = m2 / total
            rows_mean = x.mean(0)
            x.sub_(rows_mean)
            correction = (self.count / total * n) ** 0.5 * (self.mean - rows_mean)  # (in,) fp64
            # the old components (as rows scaled by their singular values), the new rows, the shift of the mean;
            # the fp64 correction promotes the stack, as in peft
            x = torch.vstack((self.singular_values[:, None] * self.components, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(42)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=4)
        vt = v.mH
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(1)])
        vt = vt * signs[:, None]
        self.count, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vt[: self.k], s[: self.k]
        self.explained_variance_ratio = (s.square() / (var * total).sum())[: self.k]


class _LayerPCA:
    """One layer's PCA and whether each component has converged (cosine similarity with the previous step)."""

    def __init__(self, name: str, k: int, tau: float, prepare: Callable) -> None:
        self.name, self.k, self.tau, self.prepare = name, k, tau, prepare
        self.pca = _IncrementalPCA(k)
        self.converged = torch.zeros(k, dtype=torch.bool)
        self.model_input: Any = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        rows = self.prepare(args, self.model_input, self.name)
        if rows.shape[0] < self.k:  # too few rows for k components this batch: skipped, as in peft
            return
        previous = self.pca.components
        self.pca.partial_fit(rows)
        if previous is not None:
            self.converged = torch.nn.functional.cosine_similarity(self.pca.components, previous) >= self.tau


def _eva_targets(model: nn.Module, config: Any, adapter_name: str) -> dict[str, nn.Module]:
    """Name -> module to hook: a PeftModel's adapter layers holding LoRA on a Linear / Conv1D (peft's names, from the
    PeftModel), or the modules ``config`` would adapt in a plain model."""
    if hasattr(model, "peft_config"):
        base = model.get_base_model()
        return {_PEFT_PREFIX + name: layer for name, layer in adapter_layers(base)
                if adapter_name in layer.deltas and isinstance(layer.delta_base, (nn.Linear, Conv1D))
                and isinstance(getattr(layer.deltas[adapter_name], "lora_A", None), nn.Linear)}
    from ..registry import get_method  # by name: lora.py imports this module
    from ..resolve import resolve

    plain = dataclasses.replace(config, init_lora_weights=True, eva_config=None)
    resolved = resolve(model, plain, get_method("LORA"))
    return {n: model.get_submodule(n) for n, m in resolved.targets.items() if isinstance(m, (nn.Linear, Conv1D))}


def _move(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def _rank_distribution(pcas: dict[str, _LayerPCA], owner: dict[str, str], budget: int,
                       max_components: dict[str, int], shared: dict[str, str]) -> dict[str, int]:
    """§3.2: the ``budget`` largest explained-variance ratios over all layers' first ``max_components``; a layer's
    rank is how many of its own are among them. A layer sharing another's PCA never ranks above it."""
    keys, values = zip(*[(name, ratio) for name, source in owner.items()
                         for ratio in pcas[source].pca.explained_variance_ratio[: max_components[name]]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {name: counts.get(name, 0) for name in owner}
    for name, source in shared.items():
        if ranks[source] < ranks[name]:
            ranks[source], ranks[name] = ranks[name], ranks[source]
    return ranks


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's per-layer ``A`` (``(rank, in)``, ranks redistributed) from the inputs ``dataloader`` produces (peft's
    function: same arguments, same keys; ``show_progress_bar`` shows nothing here, and inputs are never gathered
    across processes, so ``gather_distributed_inputs=True`` is refused while ``torch.distributed`` is initialised).

    Args:
        model: A deltatune ``PeftModel`` with a LoRA adapter ``adapter_name`` (keys ``base_model.model.<path>``; run
            with the adapters disabled), or a plain model with ``peft_config`` (keys ``<path>``).
        dataloader: Batches for ``forward_fn``; cycled until every layer's components converge.
        peft_config: The ``LoraConfig`` (``init_lora_weights="eva"``) for a plain model.
        forward_fn: ``forward_fn(model, batch)``.
        prepare_model_inputs_fn: ``(batch, config) -> x`` handed to ``prepare_layer_inputs_fn``; default: the indices
            of the tokens that count. ``None``: the batch itself.
        prepare_layer_inputs_fn: ``(layer input, x, layer name) -> (rows, in)``, or one per layer name; ``None``:
            the input flattened to rows.

    Raises:
        ConfigError: no config, not an EVA config, an empty dataloader, or layer functions for unknown layers.
    """
    if gather_distributed_inputs and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("get_eva_state_dict does not gather inputs across processes here; pass "
                          "gather_distributed_inputs=False and a dataloader that gives every process all the data")
    if peft_config is None:
        if not hasattr(model, "peft_config"):
            raise ConfigError("get_eva_state_dict needs peft_config for a model without adapters")
        peft_config = model.peft_config[adapter_name]
    if getattr(peft_config, "eva_config", None) is None:
        raise ConfigError("get_eva_state_dict needs a LoraConfig with init_lora_weights='eva'")
    if len(dataloader) == 0:
        raise ConfigError("get_eva_state_dict: the dataloader is empty")
    eva = peft_config.eva_config
    targets = _eva_targets(model, peft_config, adapter_name)
    per_layer = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    unknown = sorted(set(per_layer or ()) - set(targets))
    if unknown:
        raise ConfigError(f"prepare_layer_inputs_fn names layers that are not EVA targets: {unknown}")

    def prepare_for(name: str) -> Callable:
        fn = per_layer.get(name) if per_layer is not None else prepare_layer_inputs_fn
        return fn or _default_layer_inputs

    def model_input(batch: Any) -> Any:
        return prepare_model_inputs_fn(batch, peft_config) if prepare_model_inputs_fn is not None else batch

    rho = eva.rho
    if rho > 1000:  # an unusually large rho: no layer can use more ranks than its largest side
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    ranks = {n: pattern_value(peft_config.rank_pattern, n.removeprefix(_PEFT_PREFIX), peft_config.r) for n in targets}
    max_components = {n: round(r * rho) for n, r in ranks.items()}
    budget = sum(ranks.values())
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    training = model.training
    disabled = model.disable_adapter() if hasattr(model, "peft_config") else _nothing()
    handles: dict[str, Any] = {}
    try:
        model.eval()
        with disabled:
            first = _move(next(iter(dataloader)), device)
            shared = _equal_inputs(model, targets, prepare_for, model_input(first), forward_fn, first)
            for group in _groups(shared):
                top = max(max_components[n] for n in group)
                for n in group:
                    max_components[n] = top
            pcas = {n: _LayerPCA(n, max_components[n], eva.tau, prepare_for(n)) for n in targets if n not in shared}
            owner = {n: shared.get(n, n) for n in targets}
            handles = {n: targets[n].register_forward_hook(p) for n, p in pcas.items()}
            allotted = dict(max_components)
            done = dict.fromkeys(pcas, False)
            for batch in itertools.cycle(dataloader):
                batch = _move(batch, device)
                x = model_input(batch)
                for name, pca in pcas.items():
                    converged = bool(pca.converged[: allotted[name]].all())
                    if not done[name] and converged:
                        handles.pop(name).remove()
                        done[name] = True
                        continue
                    if done[name] and not converged:
                        handles[name] = targets[name].register_forward_hook(pca)
                        done[name] = False
                    pca.model_input = x
                if all(done.values()):
                    break
                forward_fn(model, batch)
                if all(p.pca.components is not None for p in pcas.values()):
                    allotted = _rank_distribution(pcas, owner, budget, max_components, shared)
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)
    out = {}
    for name, rank in allotted.items():
        pca = pcas[owner[name]].pca
        a = pca.components[:rank]
        if eva.whiten:
            a = a / pca.singular_values[:rank].sqrt()[:, None]
        out[name] = a.to(device) if device is not None else a
    return out


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _equal_inputs(model: nn.Module, targets: dict[str, nn.Module], prepare_for: Callable[[str], Callable],
                  x: Any, forward_fn: Callable, batch: Any) -> dict[str, str]:
    """``{layer: first layer with the very same input rows}`` from one forward pass (q/k/v of one block)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            seen.setdefault(name, prepare_for(name)(args, x, name).detach().cpu())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    try:
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    shared: dict[str, str] = {}
    firsts: list[str] = []
    for name in targets:
        rows = seen.get(name)
        match = next((f for f in firsts if rows is not None and seen[f].shape == rows.shape
                      and torch.equal(seen[f], rows)), None)
        if match is None:
            firsts.append(name)
        else:
            shared[name] = match
    return shared


def _groups(shared: dict[str, str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for name, first in shared.items():
        groups.setdefault(first, [first]).append(name)
    return list(groups.values())


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Give adapter ``adapter_name`` of ``model`` EVA's ``A`` and ranks (peft's function): each adapted Linear /
    Conv1D layer gets the rank and ``A`` of ``eva_state_dict`` (computed from ``dataloader`` when not given) and
    ``B = 0``; a rank-0 layer loses its adapter; other LoRA layers are re-initialised as ``init_lora_weights=True``
    (warned). The adapter's config records the result (``target_modules``, ``rank_pattern``, ``alpha_pattern``).

    Raises:
        ConfigError: not a PeftModel, several active adapters, an adapter not made with ``init_lora_weights="eva"``,
            no data, or an ``A`` whose width is not the layer's input size.
    """
    import warnings

    from ..registry import get_method

    if not hasattr(model, "peft_config"):
        raise ConfigError("initialize_lora_eva_weights needs a PeftModel")
    if len(model.active_adapters) > 1:
        raise ConfigError("initialize_lora_eva_weights works with a single active adapter")
    config = model.peft_config[adapter_name]
    if getattr(config, "init_lora_weights", None) != "eva":
        raise ConfigError("initialize_lora_eva_weights needs an adapter made with init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    states = {k.removeprefix(_PEFT_PREFIX): v for k, v in eva_state_dict.items()}
    base = model.get_base_model()
    layers = [(n, l) for n, l in adapter_layers(base) if adapter_name in l.deltas]
    for name, layer in layers:  # all checked before any layer changes
        a, width = states.get(name), layer.deltas[adapter_name].factors().a.shape[1]
        if a is not None and (a.dim() != 2 or a.shape[0] and a.shape[1] != width):
            raise ConfigError(f"eva_state_dict[{name!r}] must be (rank, {width}) for this layer, got {tuple(a.shape)}")
    make_delta = get_method("LORA").make_delta
    plain = dataclasses.replace(config, init_lora_weights=True, eva_config=None, rank_pattern={}, alpha_pattern={})
    rank_pattern, alpha_pattern, kept, missing = {}, {}, [], []
    for name, layer in layers:
        old = layer.deltas[adapter_name]
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        a = states.pop(name, None)
        if a is None:
            missing.append(name)
            new_rank = r
        else:
            new_rank = a.shape[0]
            if new_rank == 0:
                layer.remove_delta(adapter_name)
                if not layer.deltas:
                    _replace(base, name, layer.base_layer)
                continue
            if new_rank != r and config.eva_config.adjust_scaling_factors:
                alpha *= new_rank / r
            kept.append(name)
        delta = make_delta(dataclasses.replace(plain, r=new_rank, lora_alpha=alpha), layer.delta_base, name)
        delta.train(old.training)
        if a is not None:
            delta.factors().a.copy_(a)
        layer.add_delta(adapter_name, delta)
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    model.peft_config[adapter_name] = dataclasses.replace(
        config, target_modules=kept + missing, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model._refresh()
    if missing:
        warnings.warn(f"EVA: {missing} were re-initialised with init_lora_weights=True (EVA covers LoRA on Linear and "
                      f"Conv1D layers only)", stacklevel=2)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

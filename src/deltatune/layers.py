"""The adapter-layer core shared by every layer method.

An :class:`AdapterLayer` replaces a target module in the model. It keeps the frozen module as ``base_layer`` and one
:class:`Delta` per adapter name in ``deltas``; the state it owns (which adapters are active, which are merged into the
base weight, whether adapters are disabled) is the same for every method and lives only here, and it routes the rows
of a mixed-adapter batch (the row plan of :mod:`deltatune.rows`) to their deltas. A method contributes a ``Delta``
subclass: its parameters, its forward, and how it turns into a weight.

:class:`ModulesToSaveWrapper` does the same for ``modules_to_save``: a frozen original plus one trainable copy per
adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from . import quant
from .errors import AdapterStateError
from .files import BASE_ADAPTER
from .rows import RowPlan, batch_adapters, current_row_plan

__all__ = [
    "BASE_ADAPTER", "AdapterLayer", "Delta", "ModulesToSaveWrapper", "RowPlan", "adapter_layers", "batch_adapters",
    "current_row_plan", "save_wrappers",
]


class Delta(nn.Module):
    """One adapter's trainable change to one layer. Subclasses implement ``forward`` and ``delta_weight``.

    ``forward(x, base_out, base_layer)`` returns the layer's new output given its input and the base layer's output.
    A delta that acts on the layer's *input* (IA3 on feed-forward layers, OFT's rotation) sets ``transforms_input``:
    its :meth:`transform_input` then runs before the base layer, and ``base_out`` is the base layer's output for the
    transformed input.

    Merging defaults to ``W + delta_weight`` with the bias unchanged; methods whose effect is not additive (DoRA,
    IA3) override ``merge_weight`` / ``unmerge_weight``, methods that change the bias ``merge_bias`` /
    ``unmerge_bias``, and a delta whose base layer names its weight otherwise ``merged_params`` / ``unmerged_params``.
    """

    transforms_input: bool = False
    # Parameters that never train and are not saved: constants peft registers as frozen parameters (AdaLoRA's
    # ``ranknum``), kept as parameters so that parameter counts agree with peft's.
    constants: ClassVar[tuple[str, ...]] = ()
    # Parameters (dotted names in the delta) that are saved but never train: peft's frozen_peft_weight_names (LoRA
    # with MiCA's init freezes B). Per instance, since an init scheme decides it.
    frozen: tuple[str, ...] = ()
    # The escape hatch for a base layer whose output cannot be changed from outside because it reads its weights
    # itself (nn.MultiheadAttention uses ``in_proj_weight`` and ``out_proj.weight`` directly). ``None``: the layer
    # runs as usual. A delta class that defines it as ``run_layer(deltas, base_layer, *args, **kwargs)`` runs the
    # whole layer with every delta in ``deltas`` (the layer's active, unmerged ones, all of that class) instead, and
    # its ``forward`` is never called.
    run_layer: ClassVar[Callable[..., torch.Tensor] | None] = None
    # Whether saving with save_embedding_layers="auto" writes the adapted embedding's base weight beside this delta
    # (so that a resized vocabulary travels with the adapter). False for a delta that holds the very rows it changes
    # (trainable tokens), which is the point of such an adapter, as in peft.
    saves_base_embedding: ClassVar[bool] = True
    # The base layer's parameter this delta adapts, for a parameter target (LoRA's ``target_parameters``: MoE expert
    # weights stored as fused 3-D ``nn.Parameter``s, which no layer type wraps); ``None``: the layer as a whole. Such
    # deltas run the layer through ``run_layer`` with the updated parameter and merge into that parameter. Several
    # targeted parameters of one module nest one adapter layer per parameter (the inner one first registered), which
    # is what puts peft's saved keys (``<path>.base_layer.lora_A.weight``) in the same places.
    parameter_name: str | None = None
    # An update computed from the base parameters as they were before any merge (HiRA's ``W0 ⊙ BA``, GLoRA's
    # ``W0 ⊙ A``): several such adapters merged into one layer must each read ``W0``, as they do unmerged, not what
    # earlier merges left. For such a delta the layer keeps its parameters from before its first merge while anything
    # is merged, passes them to ``merged_params(params, base_layer, original=...)``, and unmerges by restoring them
    # (then re-merging the adapters that stay merged), so no inverse is needed.
    merges_from_original: ClassVar[bool] = False
    # A tied twin (``LayerMethod.make_tied_delta``) whose merge adds nothing to its source's: the source's layer writes
    # the one update into the tensor both layers hold (LoRA's twins write nothing, trainable-tokens twins rewrite the
    # very rows their source writes). Any other delta's merge writes into its layer's parameters, and two layers that
    # hold one tensor cannot both do so (``AdapterLayer.merge_writes``). Per instance where a class serves both roles.
    follows_source: bool = False

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the base layer sees, for a delta with ``transforms_input``."""
        return x

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, layer: AdapterLayer, name: str) -> None:
        """Called when this delta joins ``layer`` as adapter ``name``. A delta that also adapts a submodule of the
        base layer installs that part here, in an adapter layer of its own (LoRA on MultiheadAttention puts the
        ``out_proj`` update where peft's saved keys have it: ``<path>.base_layer.out_proj.lora_A.weight``)."""

    @classmethod
    def batched_forward(
        cls, groups: Sequence[tuple[Delta, torch.Tensor]], x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """``out`` (the base output of the whole batch) with the rows of each ``(delta, rows)`` group changed by that
        group's delta: the mixed-adapter batch. Every delta in ``groups`` is an instance of ``cls``.

        This default works for any delta: it runs each group's own ``forward`` on that group's rows and writes all
        groups back with a single copy of ``out``. Methods override it with something faster where their update can
        be added into the rows in place.
        """
        if not groups:
            return out
        parts = [delta(x.index_select(0, rows), out.index_select(0, rows), base_layer) for delta, rows in groups]
        return out.index_copy(0, torch.cat([rows for _, rows in groups]), torch.cat(parts))

    def weighted_forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, weight: torch.Tensor
    ) -> torch.Tensor:
        """``base_out`` plus this delta's additive update scaled per token by ``weight`` (broadcast against the
        update, e.g. ``(B, T, 1)``): how a routing method (X-LoRA) mixes experts token by token
        (:attr:`AdapterLayer.token_weights`). Only methods whose update is additive implement it."""
        raise AdapterStateError(f"{type(self).__name__} cannot be weighted per token (it is not an additive update)")

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The additive change to ``base_layer.weight``, in that weight's own layout and dtype."""
        raise NotImplementedError

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """The base layer's parameters this delta changes when merged, by name, given their values so far in
        ``params`` (the base layer's own parameters by name; values the caller owns). The default folds
        :meth:`merge_weight` into ``weight`` and :meth:`merge_bias` into ``bias`` where the layer has one; a delta on
        a layer whose weight has another name overrides this pair (LoRA on MultiheadAttention: ``in_proj_weight``)."""
        merged = {"weight": self.merge_weight(params["weight"], base_layer)}
        if "bias" in params:
            merged["bias"] = self.merge_bias(params["bias"], base_layer)
        return merged

    def unmerged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`merged_params`, given the merged values in ``params``."""
        unmerged = {"weight": self.unmerge_weight(params["weight"], base_layer)}
        if "bias" in params:
            unmerged["bias"] = self.unmerge_bias(params["bias"], base_layer)
        return unmerged

    def merge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight + self.delta_weight(base_layer).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight - self.delta_weight(base_layer).to(weight.dtype)

    def merge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base layer's bias after merging (called only for a base layer that has one)."""
        return bias

    def unmerge_bias(self, bias: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return bias

    def check_mergeable(self, base_layer: nn.Module) -> None:
        """Raise :class:`AdapterStateError`, saying why, when this delta cannot be folded into ``base_layer`` at all
        (a nonlinear adapter; a bias update for a layer without a bias). Merging asks every layer before it changes
        any, so a refusal leaves the model as it was."""

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for this delta (keys relative to it): its ``state_dict()`` without the
        ``constants``, unless the file format differs further (AdaLoRA saves only the singular triplets it kept)."""
        return {k: v for k, v in self.state_dict().items() if k not in self.constants}

    def state_from_saved(
        self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`saved_state_dict` for a file format of the delta's own: ``saved`` (this delta's
        tensors in a file, keys relative to it) as ``state_dict()`` keys and values; unchanged by default. ``shared``
        holds the same file's shared tensors (``LayerMethod.make_shared``; keys without ``base_model.``), for a delta
        that saves copies of them (RandLoRA, as peft). Raises :class:`~deltatune.errors.AdapterLoadError` for
        tensors it cannot convert (VB-LoRA's top-k form) or copies that disagree."""
        return saved

    def train_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint holds for this delta besides the adapter file, so that a resumed run continues
        exactly (keys relative to the delta): nothing by default. A key that names a parameter holds it in full and
        replaces the file's tensor on resume (AdaLoRA's file keeps only the kept triplets, its optimizer state all of
        them); other keys are state kept outside the parameters (AdaLoRA's importance scores and allocation)."""
        return {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`train_state` returned; called after the parameters were loaded."""


class _Wrapper(nn.Module):
    """Attribute fallback shared by both wrappers: code that reads ``layer.weight`` or ``layer.in_features`` on a
    wrapped module (weight tying, dtype probes in modeling code) sees the wrapped module's attribute."""

    def _wrapped(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "original_module"):
                raise
            return getattr(self._wrapped(), name)


class AdapterLayer(_Wrapper):
    """A frozen ``base_layer`` plus named deltas, with the active / merged / disabled state every method shares."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # The quantized weights each merge into a quantized base replaced (``quant.py``), so that unmerging restores
        # them exactly; and the measured share of each such merge's effect that requantization lost.
        self._quantized_before: list[object] = []
        self.merge_errors: dict[str, float] = {}
        # The parameters before the first merge, kept while anything is merged when a delta here reads them
        # (Delta.merges_from_original).
        self._original: dict[str, torch.Tensor] | None = None
        # Per-token weights of some active deltas, set by a routing method (X-LoRA): called on every forward, it
        # returns ``{adapter name: weight}`` (``None``: none now), and those deltas run through
        # :meth:`Delta.weighted_forward`.
        self.token_weights: Callable[[AdapterLayer], Mapping[str, torch.Tensor] | None] | None = None
        self.set_base(base_layer)

    def set_base(self, base_layer: nn.Module) -> None:
        """Make ``base_layer`` the wrapped layer; what the deltas see of it is :attr:`delta_base`."""
        self.base_layer = base_layer
        # not a registered submodule: the view owns nothing and must not appear in state dicts
        object.__setattr__(self, "_view", quant.delta_view(base_layer))

    @property
    def delta_base(self) -> nn.Module:
        """What the deltas are built from and called with: the base layer, or for a quantized one its
        :class:`~deltatune.quant.DequantizedLinear` view (``weight`` dequantized on read; its forward is the
        quantized layer's)."""
        return self._view

    @property
    def quant_handler(self) -> quant.QuantHandler | None:
        view = self._view
        return view.handler if isinstance(view, quant.DequantizedLinear) else None

    def _wrapped(self) -> nn.Module:
        return self.base_layer

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_delta(self, name: str, delta: Delta) -> None:
        self.deltas[name] = delta
        delta.attach(self, name)

    def remove_delta(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.deltas[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.deltas]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The base layer's forward with the active deltas applied. The layer's input is the first positional
        argument; a module its parent calls by keyword only (transformers' attention modules: ``hidden_states=...``)
        is passed through as called, which suits deltas that run the whole layer (:attr:`Delta.run_layer`)."""
        if self.disabled:
            # adapter layers inside the base layer whose forward it never calls (MultiheadAttention's out_proj, see
            # Delta.attach) cannot undo their merge themselves
            for layer in (self, *(m for m in self.base_layer.modules() if isinstance(m, AdapterLayer))):
                if layer.merged_adapters:
                    layer.unmerge()
            return self.base_layer(*args, **kwargs)
        plan = current_row_plan()
        if plan is not None:
            if not args:
                raise AdapterStateError(
                    f"adapter_names (mixed-adapter batches) is not supported for the adapters on this "
                    f"{type(self.base_layer).__name__} ({sorted({type(d).__name__ for d in self.deltas.values()})}); "
                    f"run one adapter per batch"
                )
            return self._mixed_forward(plan, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        runs = self.delta_runs(names)
        runner = next((self.deltas[n] for n in names if self.deltas[n].run_layer is not None), None)
        if runner is not None:  # the deltas run the layer themselves (Delta.run_layer)
            if len(runs) > 1:
                raise AdapterStateError(
                    f"{type(runner).__name__} runs its {type(self.base_layer).__name__} itself and cannot be combined "
                    f"with other methods' adapters on it ({[type(self.deltas[n]).__name__ for n in names]}); "
                    f"activate them one at a time"
                )
            return runner.run_layer([self.deltas[n] for n in names], self.base_layer, *args, **kwargs)
        x, *args = args
        inputs = []  # the input each run sees: the layer's input transformed by the runs outside it
        for run in runs:
            inputs.append(x)
            for name in run:
                if self.deltas[name].transforms_input:
                    x = self.deltas[name].transform_input(x)
        out = self.base_layer(x, *args, **kwargs)
        view = self._view
        weights = self.token_weights(self) if self.token_weights is not None else None
        for run, x in zip(reversed(runs), reversed(inputs)):  # outputs: innermost run first
            for name in run:
                delta = self.deltas[name]
                weight = None if weights is None else weights.get(name)
                out = delta(x, out, view) if weight is None else delta.weighted_forward(x, out, view, weight)
        return out

    def delta_runs(self, names: Sequence[str]) -> list[list[str]]:
        """``names`` cut into runs of consecutive deltas of one class, outermost first: how deltas of different
        methods on one layer compose. Deltas of one class act as one layer of their method (input transforms in
        order, all of them seeing the layer's input; outputs folded in order, as peft's layer of that method does);
        runs nest like layers wrapped around each other (peft's ``PeftMixedModel``): a run sees the input as the
        runs before it transformed it (OFT's rotation), and its outputs apply after those of the runs after it."""
        runs: list[list[str]] = []
        for name in names:
            if runs and type(self.deltas[runs[-1][-1]]) is type(self.deltas[name]):
                runs[-1].append(name)
            else:
                runs.append([name])
        return runs

    def check_merge_order(self, names: Sequence[str]) -> None:
        """Raise :class:`AdapterStateError` when merging ``names`` would change what this layer computes because a
        merged delta transforms the input of an active delta inside it that stays unmerged (an OFT adapter loaded
        after a LoRA: merged alone, its rotation would no longer reach the LoRA). Merging inner runs alone is exact."""
        unmerged = [n for n in self.active_adapters if n not in self.merged_adapters]
        runs = self.delta_runs(unmerged)
        for i, run in enumerate(runs):
            merging = [n for n in run if n in names and self.deltas[n].transforms_input]
            kept = [n for inner in runs[i + 1:] for n in inner if n not in names]
            if merging and kept:
                raise AdapterStateError(
                    f"merging {merging} without {kept} would change the outputs: {merging} transform the input "
                    f"{kept} see; merge them together (or the inner ones first)"
                )

    def _merge_order(self, names: Sequence[str]) -> list[str]:
        """The unmerged deltas among ``names`` in the order merging must fold them in: as given for deltas of one
        class; across classes innermost run first (:meth:`delta_runs` of the active order), so that the merged weight
        computes what the nested forward does (an OFT rotation merged after a LoRA it wraps rotates ``W + ΔW``)."""
        pending = [n for n in dict.fromkeys(names) if n in self.deltas and n not in self.merged_adapters]
        if len({type(self.deltas[n]) for n in pending}) < 2:
            return pending
        active = [n for n in self.active_adapters if n in pending]
        ordered = active + [n for n in pending if n not in active]
        return [n for run in reversed(self.delta_runs(ordered)) for n in run]

    def _mixed_forward(self, plan: RowPlan, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each group of rows goes through its own adapter; rows marked ``__base__`` (or naming an adapter this layer
        does not hold) get the base output. Groups are handed to their delta class's ``batched_forward`` together, so
        a method can treat all of its adapters in one pass."""
        if self.merged_adapters:
            raise AdapterStateError("adapter_names cannot be used while adapters are merged; call unmerge_adapter()")
        out = self.base_layer(x, *args, **kwargs)
        by_class: dict[type[Delta], list[tuple[Delta, torch.Tensor]]] = {}
        input_side: list[tuple[Delta, torch.Tensor]] = []
        for name, rows in plan.groups(x.shape[0], x.device):
            if name != BASE_ADAPTER and name in self.deltas:
                delta = self.deltas[name]
                if delta.transforms_input:
                    input_side.append((delta, rows))
                else:
                    by_class.setdefault(type(delta), []).append((delta, rows))
        view = self._view
        for cls, groups in by_class.items():
            out = cls.batched_forward(groups, x, out, view)
        if input_side:  # these rows need the base layer run again on their own transformed input
            parts = []
            for delta, rows in input_side:
                x_rows = x.index_select(0, rows)
                parts.append(delta(x_rows, self.base_layer(delta.transform_input(x_rows), *args, **kwargs), view))
            out = out.index_copy(0, torch.cat([rows for _, rows in input_side]), torch.cat(parts))
        return out

    def _params(self, copy: bool) -> dict[str, torch.Tensor]:
        """The base layer's own parameters by name (what :meth:`Delta.merged_params` folds into), as their data;
        cloned with ``copy``. A quantized base gives its weight dequantized (a new tensor either way). For nested
        parameter-target layers these are the innermost module's parameters (the attribute fallback of the wrappers
        reaches them by name)."""
        owner = unwrap(self.base_layer)
        params = {n: p.data.clone() if copy else p.data for n, p in owner.named_parameters(recurse=False)}
        if self.quant_handler is not None:
            params["weight"] = self._view.weight
        return params

    @torch.no_grad()
    def check_finite_merge(self, names: Sequence[str]) -> None:
        """Raise :class:`AdapterStateError` if merging ``names`` would put NaN/inf into the base layer's parameters;
        the merged tensors are computed aside and the layer is not changed."""
        params = self._params(copy=True)  # name -> its value after the merges so far
        original = self._original_params(params)
        for name in self._merge_order(names):
            changed = self._merged_params(name, params, original)
            if not all(torch.isfinite(value).all() for value in changed.values()):
                raise AdapterStateError(
                    f"merging adapter {name!r} would put NaN/inf into the base weights; the model is unchanged"
                )
            params.update(changed)

    @torch.no_grad()
    def quantized_merge(self, names: Sequence[str]) -> tuple[object, dict[str, torch.Tensor], float]:
        """For a quantized base, computed aside (the layer is not changed): the quantized weight that merging
        ``names`` would store, the merged parameters (dense), and the measured error of that requantization
        (:func:`deltatune.quant.merge_error`)."""
        handler = self.quant_handler
        assert handler is not None
        params = self._params(copy=True)
        before = params["weight"]
        original = self._original_params(params)
        for name in self._merge_order(names):
            params.update(self._merged_params(name, params, original))
        stored = handler.quantize(self.base_layer, params["weight"])
        achieved = handler.dequantize_stored(self.base_layer, stored)
        return stored, params, quant.merge_error(before, params["weight"], achieved)

    @torch.no_grad()
    def merge(self, names: Sequence[str], safe_merge: bool = False) -> None:
        """Fold the named deltas into the base layer's parameters; ``safe_merge`` runs :meth:`check_finite_merge`
        first. A quantized base is dequantized, merged and requantized, and the measured error is recorded in
        :attr:`merge_errors`; its quantized weight before the merge is kept so that unmerging restores it exactly."""
        if safe_merge:
            self.check_finite_merge(names)
        handler = self.quant_handler
        if not self.merged_adapters and any(d.merges_from_original for d in self.deltas.values()):
            self._original = self._params(copy=True)
        for name in self._merge_order(names):
            if handler is None:
                params = self._params(copy=True)
                for key, value in self._merged_params(name, params, self._original_params(params)).items():
                    getattr(self.base_layer, key).data.copy_(value)
            else:
                stored, params, error = self.quantized_merge([name])
                bias = self.base_layer.bias
                self._quantized_before.append((handler.current(self.base_layer),
                                               None if bias is None else bias.data.clone()))
                handler.store(self.base_layer, stored)
                if bias is not None:
                    bias.data.copy_(params["bias"])
                self.merge_errors[name] = error
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, keep: int = 0) -> None:
        """Undo merges, last merged first, until ``keep`` remain merged."""
        handler = self.quant_handler
        if handler is None and self._original is not None and len(self.merged_adapters) > keep:
            # Delta.merges_from_original: back to the kept parameters, then merge again what stays merged
            remerge, self.merged_adapters = self.merged_adapters[:keep], []
            for key, value in self._original.items():
                getattr(self.base_layer, key).data.copy_(value)
            self._original = None
            self.merge(remerge)
            return
        while len(self.merged_adapters) > keep:
            name = self.merged_adapters.pop()
            if handler is not None:
                stored, bias = self._quantized_before.pop()
                handler.store(self.base_layer, stored)
                if bias is not None:
                    self.base_layer.bias.data.copy_(bias)
                self.merge_errors.pop(name, None)
                continue
            for key, value in self.deltas[name].unmerged_params(self._params(copy=False), self._view).items():
                getattr(self.base_layer, key).data.copy_(value)
        if not self.merged_adapters:
            self._original = None

    def merge_writes(self, names: Sequence[str]) -> dict[str, nn.Parameter]:
        """The base parameters, by name, that merging the deltas ``names`` of this layer writes into: a parameter
        target's own parameter (:attr:`Delta.parameter_name`), else every parameter of the base module (a merge may
        rewrite its bias too); none for deltas that follow a tied source (:attr:`Delta.follows_source`). The
        parameter objects themselves, so that layers sharing one (``layer_replication``'s copies, a head tied to the
        embedding) can be found by identity before anything is merged (``inject.merge``)."""
        own = dict(unwrap(self.base_layer).named_parameters(recurse=False))
        written: dict[str, nn.Parameter] = {}
        for name in names:
            delta = self.deltas[name]
            if not delta.follows_source:
                keys = own if delta.parameter_name is None else (delta.parameter_name,)
                written.update((key, own[key]) for key in keys)
        return written

    def _original_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters before any merge (:attr:`Delta.merges_from_original`): those kept at the first merge, or
        ``params`` themselves (a shallow copy) while nothing is merged."""
        if self._original is not None:
            return self._original
        return dict(params)

    def _merged_params(self, name: str, params: dict[str, torch.Tensor], original: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """``deltas[name].merged_params``, given ``original`` where the delta reads the unmerged parameters."""
        delta = self.deltas[name]
        if not delta.merges_from_original:
            return delta.merged_params(params, self._view)
        if self._original is None and self.merged_adapters:
            raise AdapterStateError(
                f"adapter {name!r} is merged from the layer's weights before any merge, which were not kept because "
                f"it joined after {self.merged_adapters} were merged; unmerge them first"
            )
        return delta.merged_params(params, self._view, original=original)


class ModulesToSaveWrapper(_Wrapper):
    """A frozen ``original_module`` plus one trainable copy per adapter in ``modules_to_save`` (peft's names, so that
    state-dict keys match peft's)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def _wrapped(self) -> nn.Module:
        return self.original_module

    def add_copy(self, name: str, memo: dict[int, Any] | None = None) -> None:
        """A trainable copy of the original for adapter ``name``; copies made with one shared ``memo`` share the
        parameters their originals share (tied modules stay tied: peft's ``ensure_weight_tying``)."""
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module, {} if memo is None else memo)

    def remove_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def _module_for(self, name: str | None) -> nn.Module:
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        plan = current_row_plan()
        if plan is None or self.disabled:
            return self._module_for(self.active_adapter)(x, *args, **kwargs)
        out = None
        for name, rows in plan.groups(x.shape[0], x.device):
            part = self._module_for(None if name == BASE_ADAPTER else name)(x[rows], *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise AdapterStateError(
                    f"adapter_names is not supported for modules_to_save module {type(self.original_module).__name__} "
                    f"whose output is a {type(part).__name__}"
                )
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out


def unwrap(module: nn.Module) -> nn.Module:
    """The layer an adapter sees: ``module`` itself, or the innermost ``base_layer`` of the adapter layers
    around it (a module that already holds another adapter's delta gets the new one beside it, on the same base;
    parameter targets nest one adapter layer per parameter, see ``Delta.parameter_name``)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module

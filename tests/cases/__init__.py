"""Every layer method's test cases, one module per method.

Each module ``tests/cases/<method>.py`` defines:

- ``MATRIX: list[MatrixCase]``: configurations the shared matrix (``tests/test_matrix.py``) runs on every family of
  :data:`tests.models.MATRIX_FAMILIES` the case names, the ``trust_remote_code`` model included;
- ``INTEROP: list[InteropCase]``: adapters ``tests/test_interop_peft.py`` exchanges with peft, both ways (empty for a
  deltatune-only format, with a comment saying so), built with :func:`interop_builder` on the models of
  :data:`INTEROP_FAMILIES` by name;
- ``FUZZ_SEEDS: dict[str, FuzzSeed]``: valid adapters on ``tiny_llama`` that ``tests/test_fuzz_loading.py`` mutates
  (every registered method needs one).

The suites import every module of this package, so a new method joins them all by adding one file here.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import nn

from tests.models import FAMILIES, MATRIX_FAMILIES, REMOTE_CODE, REMOTE_CODE_LINEAR, make_convnet_inputs, tiny_convnet

ALL_FAMILIES = tuple(sorted(MATRIX_FAMILIES))
#: The usual stand-in for per-model-type default targets on the remote-code model: its Linear layers.
REMOTE_TARGETS: dict[str, Any] = dict(target_modules=list(REMOTE_CODE_LINEAR))


#: The families whose adapted layers are ``nn.Linear``: GPT-2's ``Conv1D`` projections are no target of the methods
#: that adapt Linear layers only (in peft either).
LINEAR_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")
#: The tiny BERT's classifier logits barely move with only query/value adapted; its dense layers make a delta visible.
BERT_DENSE_TARGETS: dict[str, Any] = dict(target_modules=["query", "value", "dense"])


def linear_cases(config_class: str, *, families: tuple[str, ...] = LINEAR_FAMILIES,
                 bert_kwargs: dict[str, Any] = BERT_DENSE_TARGETS, defaults: dict[str, Any] | None = None,
                 **options: Any) -> Callable[..., MatrixCase]:
    """The case builder of a method that adapts Linear layers (and GPT-2's Conv1D where ``families`` has it):
    ``build(name, families=families, **kwargs)`` gives a :class:`MatrixCase` with ``kwargs`` (over ``defaults``) on
    every family, ``bert_kwargs`` added on BERT (by default its dense layers as targets), the remote-code model's
    Linear layers as targets, and ``options`` (``nonzero_kwargs``, ``exact_identity``, ...) as given."""
    default_families = families

    def build(name: str, families: tuple[str, ...] = default_families, **kwargs: Any) -> MatrixCase:
        def family_kwargs(family: str) -> dict[str, Any]:
            return {**(bert_kwargs if family == "bert" else {}), **(defaults or {}), **kwargs}

        return MatrixCase(config_class, name, family_kwargs, families=families, remote_kwargs=REMOTE_TARGETS, **options)

    return build


def without_remote_code(families: tuple[str, ...] = ALL_FAMILIES) -> tuple[str, ...]:
    """``families`` less the remote-code model, for a method's variants that differ from its first case only in the
    math: the remote-code family then runs a representative subset (every method, and the targeting variants),
    which keeps the matrix short."""
    return tuple(f for f in families if f != REMOTE_CODE)


@dataclass(frozen=True)
class MatrixCase:
    """One adapter configuration of one method.

    Attributes:
        config_class: Name of the config class in ``deltatune`` (and in ``peft`` when ``in_peft``).
        name: Short id; test ids read ``<family>-<name>``.
        kwargs: Config arguments besides ``task_type``, or ``family -> arguments`` where targets differ by family.
        nonzero_kwargs: Arguments that make a fresh adapter's delta non-zero (LoRA: ``init_lora_weights=False``).
            Empty: the matrix perturbs every adapter parameter with seeded noise instead, as training would.
        weight_init: The init rewrites the base weights (PiSSA, OLoRA): a fresh adapter equals the base only up to
            rounding, unload does not restore the base, and merge_and_unload of a fresh adapter gives it back.
        families: The families the case runs on: those the method supports, less any left out to keep the matrix
            short (the remote-code family runs a representative subset of each method's cases).
        remote_kwargs: Arguments standing in, on the remote-code family, for the per-model-type defaults (targets,
            feed-forward modules) its model type lacks; ``kwargs`` override them.
        in_peft: peft has the same config class, so trainable-parameter counts are compared with peft's.
        mergeable: The delta folds into the base weights (merge / merge_and_unload).
        exact_identity: A fresh adapter gives the base output bit for bit; ``False`` where its init is the identity
            only in exact arithmetic (HRA's paired reflections cancel up to rounding).
        cache_exact: Cached ``generate()`` equals generation without the cache; ``False`` where the update depends on
            every position of the call (Lily's router averages over the batch), so a cached step, which sees only the
            new positions, differs from a full forward (in peft as well).
        gradless: Regexes of trainable parameter names that get no gradient by design, in peft as well (ShadowPEFT's
            state update after its last block feeds nothing); the gradient check skips them.
    """

    config_class: str
    name: str
    kwargs: dict[str, Any] | Callable[[str], dict[str, Any]] = field(default_factory=dict)
    nonzero_kwargs: dict[str, Any] = field(default_factory=dict)
    weight_init: bool = False
    families: tuple[str, ...] = ALL_FAMILIES
    remote_kwargs: dict[str, Any] = field(default_factory=dict)
    in_peft: bool = True
    mergeable: bool = True
    exact_identity: bool = True
    cache_exact: bool = True
    gradless: tuple[str, ...] = ()

    def config_kwargs(self, family: str) -> dict[str, Any]:
        kwargs = self.kwargs(family) if callable(self.kwargs) else self.kwargs
        if family == REMOTE_CODE:
            kwargs = {**self.remote_kwargs, **kwargs}
        return dict(task_type=MATRIX_FAMILIES[family].task_type, **kwargs)

    def make_config(self, library: Any, family: str, *, nonzero: bool = False) -> Any:
        """The config as ``library`` (``deltatune`` or ``peft``) spells it."""
        extra = self.nonzero_kwargs if nonzero else {}
        return getattr(library, self.config_class)(**{**self.config_kwargs(family), **extra})


@dataclass(frozen=True)
class InteropCase:
    """One adapter configuration, spelled identically for both libraries.

    Attributes:
        name: Test id.
        config_class: Name of the config class in both ``deltatune`` and ``peft``.
        factory: Builds the base model (deterministic: two calls give the same weights).
        make_inputs: ``model -> inputs`` for a forward without labels' side effects on the compared logits.
        kwargs: Config arguments shared by both libraries.
        extra_ours / extra_theirs: Saved keys only one library writes (each side still loads the other's file);
            the reason belongs in a comment next to the case.
    """

    name: str
    config_class: str
    factory: Callable[[], nn.Module]
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    kwargs: dict[str, Any]
    extra_ours: frozenset[str] = field(default_factory=frozenset)
    extra_theirs: frozenset[str] = field(default_factory=frozenset)

    def config(self, library: Any) -> Any:
        return getattr(library, self.config_class)(**self.kwargs)


def convnet_inputs(model: Any, batch: int = 2) -> dict[str, torch.Tensor]:
    inputs = make_convnet_inputs(batch)
    inputs.pop("labels")
    return inputs


#: The models INTEROP cases exchange adapters on, by name: ``factory, task_type, make_inputs`` of the transformers
#: families (:data:`tests.models.FAMILIES`) and of the small conv net (no task type: peft's generic ``PeftModel``).
INTEROP_FAMILIES: dict[str, tuple[Callable[[], nn.Module], str | None, Callable[..., dict[str, torch.Tensor]]]] = {
    **FAMILIES, "convnet": (tiny_convnet, None, convnet_inputs),
}
InteropModel = str | tuple[Callable[[], nn.Module], Callable[..., dict[str, torch.Tensor]]]


def interop_builder(config_class: str, **shared: Any) -> Callable[..., InteropCase]:
    """The INTEROP case builder of one config class: ``build(name, model, **kwargs)`` exchanges
    ``config_class(**shared, **kwargs)`` on ``model``: a name in :data:`INTEROP_FAMILIES` (its task type goes into the
    config unless ``task_type`` is given; ``task_type=None`` leaves it out), or a method's own ``(factory,
    make_inputs)``. ``extra_ours`` / ``extra_theirs`` are :class:`InteropCase`'s."""

    def build(name: str, model: InteropModel, *, extra_ours: Iterable[str] = (), extra_theirs: Iterable[str] = (),
              **kwargs: Any) -> InteropCase:
        if isinstance(model, str):
            factory, task_type, make_inputs = INTEROP_FAMILIES[model]
        else:
            (factory, make_inputs), task_type = model, None
        config = {"task_type": task_type, **shared, **kwargs}
        if config["task_type"] is None:
            del config["task_type"]
        return InteropCase(name, config_class, factory, make_inputs, config, frozenset(extra_ours),
                           frozenset(extra_theirs))

    return build


class FuzzSeed(NamedTuple):
    """A config for a seed adapter of the loading fuzzer: ``config_class`` in ``deltatune`` with ``kwargs``."""

    config_class: str
    kwargs: dict[str, Any]

    def config(self, library: Any) -> Any:
        return getattr(library, self.config_class)(**copy.deepcopy(self.kwargs))


@torch.no_grad()
def perturb_adapter(model: nn.Module, adapter: str = "default", seed: int = 0, std: float = 0.2) -> None:
    """Add seeded noise to every trainable parameter of ``adapter``'s deltas, so the delta is clearly non-zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f".deltas.{adapter}." in name and param.is_floating_point():
            param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * std)


def _modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
    ]


def matrix_cases() -> list[MatrixCase]:
    """Every method's ``MATRIX`` cases, methods in file-name order."""
    return [case for module in _modules() for case in module.MATRIX]


def interop_cases() -> list[InteropCase]:
    """Every method's ``INTEROP`` cases, methods in file-name order."""
    return [case for module in _modules() for case in module.INTEROP]


def fuzz_seeds() -> dict[str, FuzzSeed]:
    """Every method's ``FUZZ_SEEDS``, by seed name."""
    seeds: dict[str, FuzzSeed] = {}
    for module in _modules():
        assert not seeds.keys() & module.FUZZ_SEEDS.keys(), f"{module.__name__} repeats a fuzz seed name"
        seeds.update(module.FUZZ_SEEDS)
    return seeds

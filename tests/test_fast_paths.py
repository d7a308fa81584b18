"""The fast paths of LoRA / DoRA and of mixed-adapter batches equal the plain reference math.

The layer code fuses the scaling into one ``addmm``, accumulates in place when autograd is off, rescales DoRA outputs in
a custom autograd Function that saves one tensor, and adds each adapter's update into its own rows of a mixed batch.
Here every one of those is checked against the textbook formula written out with plain torch ops (LoRA §4.1, DoRA §4.1
with the norm detached as in §4.3), forward and backward, for each layer type, with and without dropout, in training
and eval, with and without autograd; and mixed batches against each row run alone with its own adapter.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune import kernels
from deltatune.layers import AdapterLayer, Delta, RowPlan, adapter_layers, batch_adapters
from tests.adapter_utils import (
    assert_close_scaled,
    assert_mixed_batch_equals_each_row_alone,
    assert_mixed_generate_equals_each_row_alone,
    batch_row,
    logits,
    only_adapter,
)
from tests.models import make_causal_lm_inputs, make_convnet_inputs, tiny_convnet, tiny_gpt2, tiny_llama

ALPHA, RANK = 3.0, 2


class _Holder(nn.Module):
    """One layer in a model, so that it is adapted through the public ``get_peft_model``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# name -> (base layer factory, input factory); every base parameter is re-drawn so biases are non-zero
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 4, 6, generator=g)),
    "linear-no-bias": (lambda: nn.Linear(6, 5, bias=False), lambda g: torch.randn(3, 4, 6, generator=g)),
    "linear-2d-input": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 6, generator=g)),
    "gpt2-conv1d": (lambda: Conv1D(5, 6), lambda g: torch.randn(3, 4, 6, generator=g)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda g: torch.randn(2, 3, 7, generator=g)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda g: torch.randn(2, 3, 6, 6, generator=g)),
    "embedding": (lambda: nn.Embedding(10, 5), lambda g: torch.randint(0, 10, (3, 4), generator=g)),
}


def _adapted(kind: str, *, dora: bool, dropout: float = 0.0, bias: str = "none", dtype=torch.float32):
    """A one-layer model adapted with non-zero A and B (and a magnitude moved off its initial value), its
    ``AdapterLayer`` and an input; all deterministic."""
    make_layer, make_input = LAYERS[kind]
    gen = torch.Generator().manual_seed(0)
    base = make_layer()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    config = dt.LoraConfig(target_modules=["layer"], r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=dora,
                           init_lora_weights=False, bias=bias)
    torch.manual_seed(0)
    model = dt.get_peft_model(_Holder(base.to(dtype)), config)
    layer = next(layer for _, layer in adapter_layers(model))
    delta = layer.deltas["default"]
    if dora:
        with torch.no_grad():
            delta.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(delta.lora_magnitude_vector.shape, generator=gen))
    x = make_input(gen)
    return model, layer, x.to(dtype) if x.is_floating_point() else x


# --- the reference: the formulas written out --------------------------------------------------------------------

def _base(base: nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    bias = base.bias if with_bias else None
    if isinstance(base, Conv1D):
        return x @ base.weight + (0 if bias is None else bias)
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight, bias)
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return conv(x, base.weight, bias, base.stride, base.padding, base.dilation)


def _low_rank(base: nn.Module, delta, x: torch.Tensor) -> torch.Tensor:
    """``B A x`` (unscaled)."""
    if isinstance(base, nn.Embedding):
        return F.embedding(x, delta.lora_embedding_A.T) @ delta.lora_embedding_B.T
    a, b = delta.lora_A.weight, delta.lora_B.weight
    if isinstance(base, (nn.Linear, Conv1D)):
        return F.linear(F.linear(x, a), b)
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return conv(conv(x, a, None, base.stride, base.padding, base.dilation), b)


def _dora_scale(base: nn.Module, delta, ndim: int) -> torch.Tensor:
    """``m / ‖W₀ + s·B A‖`` per output channel (norm detached, DoRA §4.3), shaped to broadcast over the output."""
    weight = base.weight.T if isinstance(base, Conv1D) else base.weight  # (out, in, ...)
    a, b = delta.lora_A.weight, delta.lora_B.weight
    ba = b @ a if weight.ndim == 2 else torch.einsum("or,ri...->oi...", b.flatten(1), a)
    norm = (weight + delta.scaling * ba).flatten(1).norm(dim=1).detach()
    shape = [1] * ndim
    shape[-1 if isinstance(base, (nn.Linear, Conv1D)) else 1] = -1
    return (delta.lora_magnitude_vector.flatten() / norm).view(shape)


def reference(layer: AdapterLayer, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """LoRA: ``W₀x + b + s·B A x̃``; DoRA: ``W₀x + b + (S - 1)·W₀x̃ + S·s·B A x̃`` (x̃: dropped-out input), peft's form.
    Draws the dropout mask exactly as the layer does: one ``F.dropout`` on the input."""
    base, delta = layer.base_layer, layer.deltas["default"]
    dropped = F.dropout(x, p, training) if x.is_floating_point() else x
    out = F.embedding(x, base.weight) if isinstance(base, nn.Embedding) else _base(base, x)
    update = delta.scaling * _low_rank(base, delta, dropped)
    if getattr(delta, "lora_magnitude_vector", None) is None:  # plain LoRA
        return out + update
    scale = _dora_scale(base, delta, out.ndim)
    return out + (scale - 1) * _base(base, dropped, with_bias=False) + scale * update


# --- fast path == reference ---------------------------------------------------------------------------------------

MODES: dict[str, tuple[bool, Callable[[], contextlib.AbstractContextManager]]] = {
    "train": (True, contextlib.nullcontext),
    "eval": (False, contextlib.nullcontext),
    "eval-no-grad": (False, torch.no_grad),
    "eval-inference-mode": (False, torch.inference_mode),
    "train-no-grad": (True, torch.no_grad),
}
CASES = [
    pytest.param(kind, dora, id=f"{kind}-{'dora' if dora else 'lora'}")
    for kind in LAYERS
    for dora in (False, True)
    if not (dora and kind == "embedding")  # refused by check_target
]


def _trainable(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return ([x] if x.requires_grad else []) + [p for p in model.parameters() if p.requires_grad]


def _run(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout mask for the layer and the reference
    return fn(x)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("kind, dora", CASES)
def test_forward_and_gradients_equal_the_reference(kind: str, dora: bool, dropout: float, mode: str) -> None:
    training, context = MODES[mode]
    model, layer, x = _adapted(kind, dora=dora, dropout=dropout, bias="lora_only")
    model.train(training)
    if x.is_floating_point():
        x.requires_grad_(True)
    with context():
        actual = _run(model, x, seed=1)
        expected = _run(lambda t: reference(layer, t, dropout, training), x, seed=1)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if training and dropout and x.is_floating_point():  # the masks really were drawn (else the check is vacuous)
        with torch.no_grad():
            assert not torch.allclose(actual, reference(layer, x, 0.0, False))
    if not torch.is_grad_enabled() or not actual.requires_grad:
        return
    weights = torch.randn(actual.shape, generator=torch.Generator().manual_seed(2))
    inputs = _trainable(model, x)
    got = torch.autograd.grad((actual * weights).sum(), inputs)
    want = torch.autograd.grad((expected * weights).sum(), inputs, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, dora", [c for c in CASES if c.values[0] in ("linear", "gpt2-conv1d", "conv2d")])
def test_gradcheck_in_float64(kind: str, dora: bool) -> None:
    """Finite differences agree with the fast path's backward (the DoRA norm is a constant by design, so for DoRA
    the check runs over the input and the magnitude, whose gradients do not go through it)."""
    model, layer, x = _adapted(kind, dora=dora, dtype=torch.float64)
    model.train()
    delta = layer.deltas["default"]
    names = ["lora_magnitude_vector"] if dora else ["lora_A.weight", "lora_B.weight"]
    params = {name: delta.get_parameter(name).detach().clone().requires_grad_(True) for name in names}

    def fn(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(delta, dict(zip(names, values)), (x, layer.base_layer(x), layer.base_layer))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params.values()))


@pytest.mark.parametrize("kind, dora", [c for c in CASES if c.values[0] in ("linear", "gpt2-conv1d", "conv2d",
                                                                            "embedding")])
def test_bfloat16_base_with_float32_adapter_matches_the_float32_reference(kind: str, dora: bool) -> None:
    model, layer, x = _adapted(kind, dora=dora, dtype=torch.bfloat16)
    assert layer.deltas["default"].adapter_dtype == torch.float32  # make_delta keeps adapters in float32
    model.train()
    if x.is_floating_point():
        x.requires_grad_(True)
    actual = model(x)
    assert actual.dtype == torch.bfloat16
    reference_layer = AdapterLayer(layer.base_layer.float())  # the same weights, upcast
    reference_layer.add_delta("default", layer.deltas["default"])
    expected = reference(reference_layer, x.float() if x.is_floating_point() else x, 0.0, True)
    layer.base_layer.to(torch.bfloat16)
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)
    weights = torch.randn(actual.shape, generator=torch.Generator().manual_seed(2))
    inputs = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((actual.float() * weights).sum(), inputs)
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        assert_close_scaled(g, w, rel=3e-2)


@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
@pytest.mark.parametrize("kind, dora", [c for c in CASES if c.values[0] in ("linear", "conv2d", "embedding")])
def test_adapter_wider_than_the_base_is_scaled_before_rounding(kind: str, dora: bool, mode: str) -> None:
    """An adapter in a wider dtype than its base (float32 next to bfloat16 in practice; float64 next to float32 here,
    so the check can be tight) adds its update in the base's dtype, with the same value as the wide reference."""
    training, context = MODES[mode]
    model, layer, x = _adapted(kind, dora=dora)
    layer.deltas["default"].double()
    model.train(training)
    with context():
        actual = model(x)
        base64 = AdapterLayer(copy.deepcopy(layer.base_layer).double())
        base64.add_delta("default", layer.deltas["default"])
        expected = reference(base64, x.double() if x.is_floating_point() else x, 0.0, training)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
@pytest.mark.parametrize("kind, dora", [c for c in CASES if c.values[0] in ("linear", "gpt2-conv1d", "conv2d")])
def test_autocast_keeps_the_base_output_dtype_and_the_reference_value(kind: str, dora: bool, mode: str) -> None:
    """Under ``torch.autocast`` the base output is bfloat16 while the adapter weights stay float32 (in-place ops are
    not autocast, so the fused in-place path must not see mixed dtypes)."""
    training, context = MODES[mode]
    model, layer, x = _adapted(kind, dora=dora)
    model.train(training)
    with context(), torch.autocast("cpu", dtype=torch.bfloat16):
        actual = model(x)
    with context():
        expected = reference(layer, x, 0.0, training)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=3e-2, atol=3e-2)


def test_no_grad_in_place_path_leaves_every_tensor_the_caller_holds_untouched() -> None:
    """Without autograd the update is added into the base layer's fresh output; the input is not written."""
    model, _, x = _adapted("linear", dora=True)
    model.eval()
    before = x.clone()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(x, before) and torch.equal(first, second) and first.data_ptr() != second.data_ptr()


def test_fresh_dora_adapter_returns_the_base_output_bit_for_bit() -> None:
    for kind in ("linear", "gpt2-conv1d", "conv2d"):
        make_layer, make_input = LAYERS[kind]
        torch.manual_seed(0)
        base, x = make_layer(), make_input(torch.Generator().manual_seed(0))
        expected = base(x).detach()
        model = dt.get_peft_model(_Holder(base), dt.LoraConfig(target_modules=["layer"], use_dora=True))
        for context in (contextlib.nullcontext, torch.no_grad):
            with context():
                assert torch.equal(model(x), expected), kind


@pytest.mark.parametrize("kind", ["linear", "gpt2-conv1d", "conv2d"])
@pytest.mark.parametrize("change", ["in-place-after", "zero-magnitude"])
def test_dora_gradients_hold_when_the_saved_output_cannot_give_z_back(kind: str, change: str) -> None:
    """DoRA saves its output and recovers ``z`` from it; a later in-place op on that output, or a channel whose
    magnitude is 0 (``z = (y - b) / s`` undefined), make it recompute ``z`` from the input instead."""
    model, layer, x = _adapted(kind, dora=True, bias="lora_only")
    model.train()
    delta = layer.deltas["default"]
    if change == "zero-magnitude":
        with torch.no_grad():
            delta.lora_magnitude_vector.view(-1)[0] = 0.0
    weights = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(2))
    out = model(x)
    if change == "in-place-after":
        out.mul_(2)  # allowed: DoRA's function does not need its output for the input gradient
    else:
        out = out * 2
    expected = reference(layer, x, 0.0, True) * 2
    inputs = _trainable(model, x)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want = torch.autograd.grad((expected * weights).sum(), inputs, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-5, atol=1e-5)


def _saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters (and views of them) excluded."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_dora_saves_no_full_size_tensor_beyond_lora_when_the_next_op_keeps_the_output(dropout: float) -> None:
    """Followed by an op that saves its input (SiLU here, as in Llama's MLP), DoRA's saved output is that same tensor:
    no activation memory beyond LoRA's but the per-channel vectors. Under dropout ``z`` must be saved (one more)."""
    def saved(dora: bool) -> int:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(64, 256), nn.SiLU())
        config = dt.LoraConfig(target_modules=["0"], r=4, use_dora=dora, lora_dropout=dropout)
        model = dt.get_peft_model(base, config)
        model.train()
        x = torch.randn(8, 16, 64, requires_grad=True)
        return _saved_bytes(lambda: model(x), [p for p in model.parameters()])

    full = 8 * 16 * 256 * 4  # one (tokens, out) float32 tensor
    extra = saved(True) - saved(False)
    assert extra < full // 4 if dropout == 0 else full <= extra < 2 * full


# --- mixed-adapter batches ------------------------------------------------------------------------------------------

def _three_adapters(factory: Callable[[], nn.Module], targets: list[str] | None = None,
                    dora_targets: list[str] | None = None) -> dt.PeftModel:
    """``a`` (r=4), ``b`` (r=2, another alpha, dropout configured) and ``c`` (r=2, DoRA), all non-zero."""
    torch.manual_seed(0)
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
                              adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=16, lora_dropout=0.1, target_modules=targets,
                                         init_lora_weights=False))
    model.add_adapter("c", dt.LoraConfig(r=2, use_dora=True, target_modules=dora_targets or targets,
                                         init_lora_weights=False))
    return model


MIXED = {
    "llama": (lambda: _three_adapters(tiny_llama), lambda m, n, seq=6: make_causal_lm_inputs(m, batch=n, seq=seq)),
    "gpt2": (lambda: _three_adapters(tiny_gpt2), lambda m, n, seq=6: make_causal_lm_inputs(m, batch=n, seq=seq)),
    "convnet": (
        lambda: _three_adapters(tiny_convnet, ["conv2d", "conv1d", "embed", "fc1"], ["conv2d", "conv1d", "fc1"]),
        lambda m, n, seq=None: {k: v for k, v in make_convnet_inputs(batch=n).items() if k != "labels"},
    ),
}
# Rows of at least the largest rank (4) take LoRA's per-row gathered weights; shorter rows (decoding) are gathered
# per adapter. Both run all adapters in two batched matmuls.
SEQ = {"gathered": 6, "grouped": 3}


@contextlib.contextmanager
def _count_paths(monkeypatch) -> Iterator[dict[str, int]]:
    """Counts the calls of each batched low-rank path, so a test can tell which one it exercised."""
    calls = {"gathered": 0, "grouped": 0}
    for path in calls:
        original = getattr(kernels, f"_{path}_low_rank")

        def counted(*args, _path=path, _original=original):
            calls[_path] += 1
            return _original(*args)

        monkeypatch.setattr(kernels, f"_{path}_low_rank", counted)
    yield calls


@pytest.mark.parametrize("path", list(SEQ))
@pytest.mark.parametrize("family", list(MIXED))
def test_mixed_batch_equals_each_row_alone_with_ranks_dora_base_and_repeats(family: str, path: str,
                                                                           monkeypatch) -> None:
    """Names repeat non-contiguously, the batch is twice the names (each name covers two consecutive rows, as after
    ``repeat_interleave``), and the adapters have different ranks and kinds."""
    make_model, make_inputs = MIXED[family]
    model = make_model()
    names = ["b", "__base__", "a", "c", "b"]
    batch = make_inputs(model, 2 * len(names), SEQ[path])
    with _count_paths(monkeypatch) as calls:  # only the mixed pass can call them: the rows alone have no RowPlan
        assert_mixed_batch_equals_each_row_alone(model, batch, names, rel=1e-5)
    if family == "convnet":  # convs and the embedding take the per-group path; fc1's (B, in) rows are one token
        assert calls == {"gathered": 0, "grouped": calls["grouped"]} and calls["grouped"] > 0
    else:
        assert {k for k, v in calls.items() if v} == {path}


def _loss(out: Any) -> torch.Tensor:
    logits_ = out if isinstance(out, torch.Tensor) else out.logits
    return (logits_ * torch.linspace(-1, 1, logits_.shape[-1])).sum()


@pytest.mark.parametrize("path", list(SEQ))
def test_mixed_batch_gradients_equal_the_sum_over_rows_run_alone(path: str, monkeypatch) -> None:
    model = _three_adapters(tiny_llama)
    model.train()
    for _, layer in adapter_layers(model):  # no dropout to draw, so both sides compute the same thing
        layer.deltas["b"].dropout = nn.Identity()
    names = ["a", "c", "__base__", "b", "a"]
    batch = make_causal_lm_inputs(model, batch=len(names), seq=SEQ[path])
    batch.pop("labels")
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def grads(inputs: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
        for p in params:  # set_adapter leaves only the active adapter trainable
            p.requires_grad_(True)
        return torch.autograd.grad(_loss(model(**inputs, **kwargs)), params, allow_unused=True)

    with _count_paths(monkeypatch) as calls:
        mixed = grads(batch, adapter_names=names)
    assert {k for k, v in calls.items() if v} == {path}
    alone = [torch.zeros_like(p) for p in params]
    for i, name in enumerate(names):
        if name == "__base__":  # depends on no adapter parameter
            continue
        with only_adapter(model, name):
            grads_i = grads(batch_row(batch, i))
        alone = [a if g is None else a + g for a, g in zip(alone, grads_i)]
    for m, a in zip(mixed, alone, strict=True):
        torch.testing.assert_close(torch.zeros_like(a) if m is None else m, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_generate_with_adapter_names_equals_each_row_alone(family: str, monkeypatch) -> None:
    """The prompt (4 tokens a row) takes the gathered path, the decoding steps (1 token) the grouped one."""
    make_model, make_inputs = MIXED[family]
    model = make_model().eval()  # no dropout while generating
    names = ["c", "__base__", "a", "b"]
    batch = make_inputs(model, len(names))
    ids, mask = batch["input_ids"][:, :4], batch["attention_mask"][:, :4]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}
    with _count_paths(monkeypatch) as calls:  # only the mixed generate can call them: the rows alone have no RowPlan
        assert_mixed_generate_equals_each_row_alone(model, ids, mask, names, **kwargs)
    assert calls["gathered"] and calls["grouped"]


def test_rows_are_grouped_once_per_batch_shape_not_once_per_layer(monkeypatch) -> None:
    model = _three_adapters(tiny_llama)
    builds: list[int] = []
    original = RowPlan._build
    monkeypatch.setattr(RowPlan, "_build", lambda self, n: builds.append(n) or original(self, n))
    batch = make_causal_lm_inputs(model, batch=3)
    logits(model, batch, adapter_names=["a", "b", "__base__"])
    assert builds == [3]  # one grouping shared by all 14 adapted layers
    builds.clear()
    model.generate(input_ids=batch["input_ids"], adapter_names=["a", "b", "c"], max_new_tokens=3, num_beams=2,
                   do_sample=False)
    assert builds == [6]  # and by every decoding step


class _Gain(Delta):
    """A non-LoRA delta (``y = base_out · (1 + g)``) that relies on the generic ``batched_forward``."""

    def __init__(self, features: int, value: float) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((features,), value))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out * (1 + self.gain)


def test_generic_batched_forward_serves_deltas_that_do_not_override_it() -> None:
    torch.manual_seed(0)
    layer = AdapterLayer(nn.Linear(4, 3))
    layer.add_delta("up", _Gain(3, 0.5))
    layer.add_delta("down", _Gain(3, -0.25))
    x = torch.randn(4, 4, requires_grad=True)
    names = ["down", "__base__", "up", "down"]
    with batch_adapters(names):
        mixed = layer(x)
    expected = []
    for i, name in enumerate(names):
        layer.set_active([] if name == "__base__" else [name])
        expected.append(layer(x[i : i + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected))
    gains = [layer.deltas["up"].gain, layer.deltas["down"].gain]
    got = torch.autograd.grad(mixed.sum(), [x, *gains])
    want = torch.autograd.grad(torch.cat(expected).sum(), [x, *gains])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "base_dtype, adapter_dtype, autocast, tol",
    [
        (torch.bfloat16, torch.float32, False, 2e-2),
        (torch.float32, torch.float64, False, 1e-6),
        (torch.float32, torch.float32, True, 2e-2),
        (torch.bfloat16, torch.bfloat16, False, 2e-2),
    ],
    ids=["bf16-base-fp32-adapters", "fp32-base-fp64-adapters", "autocast-bf16", "all-bf16"],
)
def test_mixed_batch_in_mixed_precision_matches_rows_alone(base_dtype, adapter_dtype, autocast: bool, tol,
                                                          monkeypatch) -> None:
    model = _three_adapters(lambda: tiny_llama().to(base_dtype))
    for _, layer in adapter_layers(model):
        layer.deltas.to(adapter_dtype)
    names = ["a", "c", "__base__", "b"]
    batch = make_causal_lm_inputs(model, batch=len(names), seq=SEQ["gathered"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), _count_paths(monkeypatch) as calls:
        assert_mixed_batch_equals_each_row_alone(model, batch, names, rtol=tol, atol=tol)
    assert calls["gathered"]  # adapters in another dtype than the base still take the gathered batched matmul


def test_stacked_adapter_weights_kept_for_a_generate_follow_in_place_weight_changes(monkeypatch) -> None:
    """Inside one ``batch_adapters`` block (one ``generate()``) the gathered path stacks each layer's adapter weights
    once; changing a weight in place must still be seen by the next forward."""
    model = _three_adapters(tiny_llama)
    model.eval()
    names = ["a", "b", "__base__", "a"]
    inputs = make_causal_lm_inputs(model, batch=len(names), seq=SEQ["gathered"])
    inputs.pop("labels")
    base = model.get_base_model()
    with torch.no_grad(), batch_adapters(names), _count_paths(monkeypatch) as calls:
        first = base(**inputs).logits
        for _, layer in adapter_layers(model):
            if "a" in layer.deltas:
                layer.deltas["a"].lora_B.weight.mul_(3)
        second = base(**inputs).logits
    assert calls["gathered"]
    expected = logits(model, inputs, adapter_names=names)  # a fresh plan
    torch.testing.assert_close(second, expected)
    assert not torch.allclose(first, second)

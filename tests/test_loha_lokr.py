"""LoHa and LoKr specifics: the update against hand-written formulas, LoKr's dimension split, training-time dropout
against peft, layer types (grouped / circular convs, half precision, GPT-2's Conv1D), config validation and
mixed-adapter batches. The shared matrix and the peft interop cases cover the generic properties."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer, adapter_layers
from deltatune.methods.loha import _HadamardProduct
from deltatune.methods.lokr import factorization
from tests.adapter_utils import (
    assert_clearly_different,
    assert_close_scaled,
    assert_mixed_batch_equals_each_row_alone,
    logits,
    trainable_by_peft_name,
)
from tests.models import make_causal_lm_inputs, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Net(nn.Module):
    """One layer under test, wrapped so it can be targeted by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _wrap(layer: nn.Module, config: dt.PeftConfig, seed: int = 0) -> tuple[dt.PeftModel, AdapterLayer]:
    torch.manual_seed(seed)
    model = dt.get_peft_model(_Net(layer), config)
    (_, wrapper), = adapter_layers(model)
    return model, wrapper


def _params(delta: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in delta.named_parameters()}


def _blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The Kronecker product by its definition: block ``(i, j)`` of the result is ``w1[i, j] · w2`` (rows and
    columns of blocks along the first two dims; any trailing kernel dims come from ``w2``)."""
    return torch.cat([torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])])


def _rebuild_kernel(core: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """The effective-conv factor, one kernel position at a time: ``W[:, :, i, j] = w_outᵀ core[:, :, i, j] w_in``."""
    k1, k2 = core.shape[2:]
    cols = [torch.stack([w_out.T @ core[:, :, i, j] @ w_in for j in range(k2)], dim=-1) for i in range(k1)]
    return torch.stack(cols, dim=2)  # (out, in, k1, k2)


# --- the update, by hand ---------------------------------------------------------------------------------------------

def test_loha_linear_update_is_the_scaled_hadamard_product_of_two_low_rank_products() -> None:
    layer = nn.Linear(12, 6)
    model, wrapper = _wrap(layer, dt.LoHaConfig(target_modules=["layer"], r=3, alpha=6, init_weights=False))
    p = _params(wrapper.deltas["default"])
    assert {n: tuple(t.shape) for n, t in p.items()} == {
        "hada_w1_a": (6, 3), "hada_w1_b": (3, 12), "hada_w2_a": (6, 3), "hada_w2_b": (3, 12),
    }
    expected = 2.0 * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    torch.testing.assert_close(wrapper.deltas["default"].delta_weight(layer), expected)
    x = torch.randn(4, 12)
    torch.testing.assert_close(logits(model, {"x": x}), F.linear(x, layer.weight + expected, layer.bias))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, padding=1), nn.Conv1d(3, 4, 3, padding=1)], ids=["2d", "1d"])
def test_loha_effective_conv_rebuilds_each_factor_from_its_core(conv: nn.Module) -> None:
    config = dt.LoHaConfig(target_modules=["layer"], r=2, alpha=4, use_effective_conv2d=True, init_weights=False)
    model, wrapper = _wrap(conv, config)
    p = _params(wrapper.deltas["default"])
    assert p["hada_t1"].shape == ((2, 2, 3, 3) if isinstance(conv, nn.Conv2d) else (2, 2, 3, 1))
    first = _rebuild_kernel(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
    second = _rebuild_kernel(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    expected = (2.0 * first * second).reshape(conv.weight.shape)
    torch.testing.assert_close(wrapper.deltas["default"].delta_weight(conv), expected)
    x = torch.randn(2, 3, 5, 5) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 7)
    torch.testing.assert_close(logits(model, {"x": x}), conv._conv_forward(x, conv.weight + expected, conv.bias))


def test_lokr_linear_update_is_the_scaled_kronecker_product_and_factor_storage_follows_the_rank() -> None:
    # out 16 = 4·4, in 32 = 4·8: W1 (4, 4), W2 (4, 8)
    layer = nn.Linear(32, 16)
    model, full = _wrap(layer, dt.LoKrConfig(target_modules=["layer"], r=8, alpha=4, init_weights=False))
    p = _params(full.deltas["default"])
    assert {n: tuple(t.shape) for n, t in p.items()} == {"lokr_w1": (4, 4), "lokr_w2": (4, 8)}
    expected = 0.5 * _blocks(p["lokr_w1"], p["lokr_w2"])
    torch.testing.assert_close(full.deltas["default"].delta_weight(layer), expected)
    x = torch.randn(3, 32)
    torch.testing.assert_close(logits(model, {"x": x}), F.linear(x, layer.weight + expected, layer.bias))

    _, low = _wrap(nn.Linear(32, 16), dt.LoKrConfig(target_modules=["layer"], r=1, decompose_both=True))
    p = _params(low.deltas["default"])
    assert {n: tuple(t.shape) for n, t in p.items()} == {
        "lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 8),
    }
    assert torch.count_nonzero(p["lokr_w1_a"]) == 0  # init True: W1 = 0, so the fresh adapter is the identity
    expected = _blocks(p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w2_a"] @ p["lokr_w2_b"])
    torch.testing.assert_close(low.deltas["default"].delta_weight(low.base_layer), expected)


def test_lokr_effective_conv1d_puts_the_kernel_in_w2_built_from_its_core() -> None:
    # peft 0.21.2 cannot run this layout (torch.kron on the core's (b, d, k, 1) result), so the formula is the oracle.
    conv = nn.Conv1d(8, 8, 3, padding=1)
    config = dt.LoKrConfig(target_modules=["layer"], r=1, alpha=3, use_effective_conv2d=True, init_weights=False)
    model, wrapper = _wrap(conv, config)
    p = _params(wrapper.deltas["default"])
    assert {n: tuple(t.shape) for n, t in p.items()} == {
        "lokr_w1": (2, 2), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 4), "lokr_t2": (1, 1, 3, 1),
    }
    w2 = _rebuild_kernel(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])[..., 0]  # (4, 4, 3)
    expected = 3.0 * _blocks(p["lokr_w1"], w2)  # (8, 8, 3)
    torch.testing.assert_close(wrapper.deltas["default"].delta_weight(conv), expected)
    x = torch.randn(2, 8, 6)
    torch.testing.assert_close(logits(model, {"x": x}), F.conv1d(x, conv.weight + expected, conv.bias, padding=1))


def test_factorization_matches_peft_and_its_documented_examples() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert [factorization(128), factorization(256), factorization(127), factorization(128, 4)] == [
        (8, 16), (16, 16), (1, 127), (4, 32),
    ]
    for dimension in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


def test_hadamard_backward_equals_autograd_of_the_plain_product() -> None:
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
               for s in [(5, 2), (2, 7), (5, 2), (2, 7)]]
    assert torch.autograd.gradcheck(_HadamardProduct.apply, factors)
    grad_out = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(_HadamardProduct.apply(*factors), factors, grad_out)
    plain = torch.autograd.grad((factors[0] @ factors[1]) * (factors[2] @ factors[3]), factors, grad_out)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)


# --- training-time dropout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "config_class, kwargs",
    [
        ("LoHaConfig", dict(rank_dropout=0.3, module_dropout=0.3)),
        ("LoKrConfig", dict(rank_dropout=0.3, module_dropout=0.3, rank_dropout_scale=True)),
        ("LoKrConfig", dict(rank_dropout=0.5, r=1, decompose_both=True)),
    ],
    ids=["loha", "lokr-scaled", "lokr-unscaled"],
)
def test_training_forward_and_gradients_equal_peft_under_rank_and_module_dropout(
    config_class: str, kwargs: dict, tmp_path: Path
) -> None:
    # Same seed, same draw order (module dropout, then the rank mask), so every loss and gradient must agree.
    ours = dt.get_peft_model(tiny_llama(), getattr(dt, config_class)(task_type="CAUSAL_LM", init_weights=False,
                                                                      **kwargs))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    batch = make_causal_lm_inputs(ours)
    ours.train()
    theirs.train()
    losses = []
    for seed in range(3):
        torch.manual_seed(seed)
        our_loss = ours(**batch).loss
        torch.manual_seed(seed)
        their_loss = theirs(**batch).loss
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-5)
        our_loss.backward()
        their_loss.backward()
        losses.append(our_loss.item())
    assert len(set(losses)) == 3  # the masks really differ from seed to seed
    our_grads = {n: p.grad for n, p in trainable_by_peft_name(ours).items()}
    their_grads = {n: p.grad for n, p in trainable_by_peft_name(theirs).items()}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("config_class", ["LoHaConfig", "LoKrConfig"])
def test_dropouts_act_only_in_training(config_class: str) -> None:
    layer = nn.Linear(16, 8)
    x = {"x": torch.randn(4, 16)}
    plain, _ = _wrap(layer, getattr(dt, config_class)(target_modules=["layer"], init_weights=False))
    expected = logits(plain, x)
    config = getattr(dt, config_class)(target_modules=["layer"], init_weights=False, rank_dropout=0.9,
                                       module_dropout=1.0)
    dropped, _ = _wrap(nn.Linear(16, 8), config)  # the same seed gives the same factors as `plain`
    dropped.base_model.model.layer.base_layer.load_state_dict(layer.state_dict())
    assert torch.equal(logits(dropped, x), expected)  # eval: no dropout of either kind
    dropped.train()
    with torch.no_grad():
        assert torch.equal(dropped(**x), layer(x["x"]))  # module_dropout = 1 skips the delta in every training step
    assert_clearly_different(expected, layer(x["x"]).detach())


# --- layer types ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "config",
    [
        dt.LoHaConfig(target_modules=["layer"], r=2, init_weights=False),
        dt.LoHaConfig(target_modules=["layer"], r=2, use_effective_conv2d=True, init_weights=False),
        dt.LoKrConfig(target_modules=["layer"], r=1, init_weights=False),
        dt.LoKrConfig(target_modules=["layer"], r=4, init_weights=False),
    ],
    ids=["loha", "loha-effective", "lokr-low-rank-w2", "lokr-full-w2"],
)
def test_grouped_circular_conv_shapes_equal_peft_and_forward_equals_the_merged_conv(config: dt.PeftConfig) -> None:
    def conv() -> _Net:
        torch.manual_seed(0)
        return _Net(nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="circular")).eval()

    model, _ = _wrap(conv().layer, config)
    theirs = peft.get_peft_model(conv(), getattr(peft, type(config).__name__)(**config.to_dict()))
    our_shapes = {n: p.shape for n, p in trainable_by_peft_name(model).items()}
    their_shapes = {n: p.shape for n, p in trainable_by_peft_name(theirs).items()}
    assert our_shapes == their_shapes
    x = {"x": torch.randn(2, 8, 5, 5)}
    unmerged = logits(model, x)
    model.merge_adapter()  # the merged conv applies padding_mode itself: the unmerged update must use it as well
    assert_close_scaled(logits(model, x), unmerged)
    model.unmerge_adapter()
    assert_clearly_different(unmerged, conv()(x["x"]).detach())


@pytest.mark.parametrize("config_class", ["LoHaConfig", "LoKrConfig"])
def test_half_precision_base_keeps_float32_factors_and_its_own_output_dtype(config_class: str) -> None:
    model = dt.get_peft_model(tiny_llama().to(torch.bfloat16),
                              getattr(dt, config_class)(task_type="CAUSAL_LM", init_weights=False))
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    inputs = make_causal_lm_inputs(model)
    unmerged = logits(model, inputs)
    assert unmerged.dtype == torch.bfloat16
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("config_class", ["LoHaConfig", "LoKrConfig"])
def test_gpt2_conv1d_is_refused_like_peft_refuses_it(config_class: str) -> None:
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(tiny_gpt2(), getattr(peft, config_class)(task_type="CAUSAL_LM"))
    model = tiny_gpt2()
    with pytest.raises(TargetError, match=r"c_attn.*Conv1D.*supported types: \['Linear', 'Conv1d', 'Conv2d'\]"):
        dt.get_peft_model(model, getattr(dt, config_class)(task_type="CAUSAL_LM"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())  # refused before anything changed


# --- config ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "config_class, kwargs, message",
    [
        ("LoHaConfig", dict(r=0), "r must be a positive integer"),
        ("LoKrConfig", dict(rank_pattern={"q_proj": -2}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        ("LoHaConfig", dict(rank_dropout=1.0), r"rank_dropout must be in \[0, 1\)"),
        ("LoKrConfig", dict(module_dropout=1.5), r"module_dropout must be in \[0, 1\]"),
        ("LoHaConfig", dict(init_weights="lycoris"), "init_weights must be one of"),
        ("LoKrConfig", dict(init_weights="gaussian"), "init_weights must be one of"),
        ("LoKrConfig", dict(decompose_factor=0), "decompose_factor must be -1"),
        ("LoHaConfig", dict(alpha_pattern={"(": 2}), "not a valid regular expression"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(config_class: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        getattr(dt, config_class)(**kwargs)


def test_configs_round_trip_with_peft_field_names_and_types() -> None:
    ours = dt.LoKrConfig(r=4, alpha=16, decompose_both=True, decompose_factor=8, init_weights="lycoris",
                         rank_dropout_scale=True, use_effective_conv2d=True, target_modules=["q_proj"])
    theirs = peft.LoKrConfig.from_peft_type(**ours.to_dict())
    for name, value in ours.to_dict().items():
        assert getattr(theirs, name) == ({*value} if name == "target_modules" else value), name
    assert dt.PeftConfig.from_dict(ours.to_dict()) == ours
    assert type(dt.PeftConfig.from_dict(dt.LoHaConfig(r=2).to_dict())) is dt.LoHaConfig


# --- mixed-adapter batches ------------------------------------------------------------------------------------------

def test_mixed_batch_of_loha_lokr_and_base_rows_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoHaConfig(task_type="CAUSAL_LM", init_weights=False))
    model.add_adapter("kron", dt.LoKrConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                            init_weights=False))
    batch = make_causal_lm_inputs(model, batch=4)
    batch.pop("labels")
    mixed = assert_mixed_batch_equals_each_row_alone(model, batch, ["kron", "default", "__base__", "kron"], rel=1e-5)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert_clearly_different(mixed[i], mixed[j])  # each adapter really changes its rows

"""DeFT (``deltatune.methods.deft``): the output against the adapted weight ``(I − P_proj) W + s Q_P R`` written out
with the full projector, for both decompositions, PaRa and GPT-2's Conv1D; the identity init; the rank cap, against
peft; two merged adapters each reading the pre-merge weight, against peft's merge; mixed batches; the config's
checks."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError
from tests.adapter_utils import assert_merges_from_original_as_peft, assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_gpt2, tiny_mlp


def _adapted_weight(delta, weight: torch.Tensor) -> torch.Tensor:
    """``(I − P_proj) W + s Q_P R`` for a logical ``(out, in)`` ``W``, with the ``out × out`` projector built."""
    p = delta.deft_P.detach()
    q, right = (p, torch.relu(p)) if delta.method == "relu" else (torch.linalg.qr(p).Q,) * 2
    adapted = (torch.eye(p.shape[0]) - q @ right.T) @ weight
    if delta.deft_R is not None:
        adapted = adapted + delta.scaling * q @ delta.deft_R.detach()
    return adapted


@pytest.mark.parametrize("kwargs", [dict(), dict(decomposition_method="qr", alpha=3), dict(para=True)],
                         ids=["relu", "qr-alpha", "para"])
def test_output_equals_the_adapted_weight_written_out(kwargs) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.DeftConfig(target_modules=["lin1"], r=4, init_weights=False,
                                                        init_scale=30.0, **kwargs))
    layer = model.get_base_model().lin1
    base, delta = layer.base_layer, layer.deltas["default"]
    expected_weight = _adapted_weight(delta, base.weight.detach())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, x @ expected_weight.T + base.bias, rtol=1e-5, atol=1e-5)
        assert (out - base(x)).abs().max() > 1e-3


def test_conv1d_reads_the_transposed_weight() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.DeftConfig(target_modules=["c_attn"], r=4, init_weights=False,
                                                         init_scale=30.0, decomposition_method="qr"))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    base, delta = layer.base_layer, layer.deltas["default"]
    expected_weight = _adapted_weight(delta, base.weight.detach().T)  # Conv1D stores (in, out)
    x = torch.randn(2, 3, base.weight.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.T + base.bias, rtol=1e-5, atol=1e-5)


def test_identity_init_is_exact_and_para_is_not_identity() -> None:
    x = make_mlp_inputs()["x"]
    base = tiny_mlp()(x)
    for alpha in (None, 8):  # s = 1 and s = 2
        model = dt.get_peft_model(tiny_mlp(), dt.DeftConfig(target_modules=["lin0", "lin1"], alpha=alpha))
        assert torch.equal(model(x), base)
    para = dt.get_peft_model(tiny_mlp(), dt.DeftConfig(target_modules=["lin0", "lin1"], para=True))
    assert not torch.equal(para(x), base)


def test_rank_is_capped_at_out_features_as_in_peft() -> None:
    config = dict(target_modules=["head"], r=8)  # head: 32 -> 3
    ours = dt.get_peft_model(tiny_mlp(), dt.DeftConfig(**config)).get_base_model().head.deltas["default"]
    theirs = peft.get_peft_model(tiny_mlp(), peft.DeftConfig(**config)).get_base_model().head
    assert ours.deft_P.shape == theirs.deft_P["default"].shape == (3, 3)
    assert ours.deft_R.shape == theirs.deft_R["default"].shape == (3, 32)


def test_two_merged_adapters_each_read_the_pre_merge_weight_as_peft(tmp_path) -> None:
    ours = dt.get_peft_model(tiny_mlp(), dt.DeftConfig(target_modules=["lin1"], r=4, init_weights=False,
                                                       init_scale=30.0))
    ours.add_adapter("other", dt.DeftConfig(target_modules=["lin1"], r=2, decomposition_method="qr",
                                            init_weights=False, init_scale=30.0))
    assert_merges_from_original_as_peft(ours, tiny_mlp, {"x": make_mlp_inputs()["x"]}, tmp_path)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.DeftConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False,
                                                        init_scale=30.0))
    model.add_adapter("other", dt.DeftConfig(target_modules=["lin1"], para=True, decomposition_method="qr"))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(decomposition_method="svd"), "decomposition_method must be 'relu' or 'qr'"),
        (dict(alpha=float("inf")), "alpha must be a finite number"),
        (dict(deft_dropout=1.0), "deft_dropout must be in"),
        (dict(para="no"), "para must be True or False"),
        (dict(bias="lora_only"), "bias must be 'none', 'all' or 'deft_only'"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "cannot be used with a regex target_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.DeftConfig(**kwargs)


"""HiRA (``deltatune.methods.hira``): outputs and merges against ``W0 ⊙ (B A)`` written out entry by entry on every
layer type (Linear, Conv1D, Embedding, Conv2d), several adapters merged from the weight before any merge
(``Delta.merges_from_original``, compared with peft's own merge), inits, mixed batches and the config's checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_merges_from_original_as_peft, assert_mixed_batch_equals_each_row_alone
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _hadamard(w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W0[o, i, …] · Σ_j B[o, j] A[j, i, …]`` entry by entry (float64), B ``(out, r, 1…)``, A ``(r, in, …)``."""
    b, a = b.double().flatten(1), a.double()
    out = torch.empty(w0.shape, dtype=torch.float64)
    for o in range(w0.shape[0]):
        out[o] = w0[o].double() * sum(b[o, j] * a[j] for j in range(a.shape[0]))
    return out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.c1d = Conv1D(4, 5)  # (in=5, out=4), weight stored (in, out)
        self.emb = nn.Embedding(10, 3)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, padding_mode="circular")


def test_every_layer_type_adds_the_hadamard_update_and_merges_to_it() -> None:
    torch.manual_seed(0)
    base = _Net()
    model = dt.get_peft_model(base, dt.HiraConfig(target_modules=["lin", "c1d", "emb", "conv"], r=2,
                                                  init_weights=False))
    lin, c1d, emb, conv = (_layer(model, n) for n in ("lin", "c1d", "emb", "conv"))
    x, ids, img = torch.randn(3, 6), torch.tensor([[1, 9, 0]]), torch.randn(2, 2, 5, 5)
    d = lin.deltas["default"]
    w_lin = lin.base_layer.weight + _hadamard(lin.base_layer.weight, d.hira_B, d.hira_A).float()
    d = c1d.deltas["default"]
    w_c1d = c1d.base_layer.weight + _hadamard(c1d.base_layer.weight.T, d.hira_B, d.hira_A).float().T
    d = emb.deltas["default"]  # A (r, num), B (dim, r): W0 ⊙ (B A)ᵀ
    w_emb = emb.base_layer.weight + _hadamard(emb.base_layer.weight.T, d.hira_embedding_B,
                                              d.hira_embedding_A).float().T
    d = conv.deltas["default"]
    w_conv = conv.base_layer.weight + _hadamard(conv.base_layer.weight, d.hira_B, d.hira_A).float()
    expected = [
        x @ w_lin.T + lin.base_layer.bias,
        x[:, :5] @ w_c1d + c1d.base_layer.bias,
        w_emb[ids],
        conv.base_layer._conv_forward(img, w_conv, conv.base_layer.bias),  # circular padding, as merged
    ]
    with torch.no_grad():
        outputs = [lin(x), c1d(x[:, :5]), emb(ids), conv(img)]
        for out, exp in zip(outputs, expected):
            torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        for layer, weight in zip((lin, c1d, emb, conv), (w_lin, w_c1d, w_emb, w_conv)):
            torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        assert torch.equal(lin.base_layer.weight, base.lin.base_layer.weight)


def test_several_merged_adapters_equal_the_unmerged_forward_and_peft_merge(tmp_path) -> None:
    config = dict(target_modules=["q_proj", "v_proj"], r=2, init_weights=False)
    ours = dt.get_peft_model(tiny_llama(), dt.HiraConfig(**config))
    ours.add_adapter("other", dt.HiraConfig(**{**config, "r": 3}))
    assert_merges_from_original_as_peft(ours, tiny_llama, make_causal_lm_inputs(ours), tmp_path)


def test_inits() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.HiraConfig(target_modules=["lin0"], r=4, init_weights="gaussian"))
    delta = _layer(model, "lin0").deltas["default"]
    assert torch.equal(delta.hira_B, torch.zeros_like(delta.hira_B)) and delta.hira_A.std() < 0.5
    x = make_mlp_inputs(3)["x"]
    with torch.no_grad():
        assert torch.equal(model(x), tiny_mlp()(x))
    model = dt.get_peft_model(tiny_llama(), dt.HiraConfig(target_modules=["embed_tokens"], r=4))
    delta = _layer(model, "model.embed_tokens").deltas["default"]
    assert torch.equal(delta.hira_embedding_A, torch.zeros_like(delta.hira_embedding_A))
    assert delta.hira_embedding_B.std() > 0.5  # N(0, 1), as peft


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.HiraConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    model.add_adapter("other", dt.HiraConfig(target_modules=["lin1"], r=3, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


def test_grouped_convolution_is_refused_before_the_model_changes() -> None:
    model = _Net()
    model.conv = nn.Conv2d(2, 4, kernel_size=1, groups=2)
    with pytest.raises(TargetError, match="grouped convolution"):
        dt.get_peft_model(model, dt.HiraConfig(target_modules=["conv", "lin"]))
    assert type(model.conv) is nn.Conv2d and type(model.lin) is nn.Linear


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(hira_dropout=1.0), "hira_dropout must be in"),
        (dict(init_weights="kaiming"), "init_weights must be"),
        (dict(init_weights=None), "init_weights must be"),
        (dict(rank_pattern={"q": 4}), "rank_pattern is not supported for HiRA"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform cannot be used"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.HiraConfig(**kwargs)

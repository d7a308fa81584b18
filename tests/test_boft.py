"""BOFT (``deltatune.methods.boft``): the butterfly rotation and output scale against peft's formula written out as
dense matrices (``R = B_{m−1} ⋯ B_0``, ``B_i = P_i diag(Cayley blocks) P_iᵀ``, with peft's own permutation as the
oracle for ``P_i``) on Linear and Conv2d, unmerging, block dropout, mixed-adapter batches, the config's checks and
peft's CPU fallback file."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.boft.layer import BOFTLayer
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_convnet, tiny_llama, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's note on its missing CUDA extension


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _dense_rotation(boft_r: torch.Tensor) -> torch.Tensor:
    """``R`` ``(d, d)`` in float64: per factor, the Cayley transform of each block's skew part, block-diagonal,
    conjugated by the permutation matrix ``P[k, π[k]] = 1`` (``π`` from peft), multiplied as ``B_{m−1} ⋯ B_0``."""
    m, num, size, _ = boft_r.shape
    d = num * size
    eye = torch.eye(size, dtype=torch.float64)
    rotation = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        mats = []
        for c in boft_r[i].double():
            s = (c - c.T) / 2
            mats.append((eye - s) @ torch.linalg.inv(eye + s))
        pi = BOFTLayer.block_butterfly_perm(None, d, num // 2**i, size // 2, m - 1)
        p = torch.zeros(d, d, dtype=torch.float64)
        p[torch.arange(d), pi] = 1.0
        rotation = p @ torch.block_diag(*mats) @ p.T @ rotation
    return rotation


def _randomised(model: nn.Module, config: dt.BOFTConfig, name: str) -> AdapterLayer:
    layer = _layer(dt.get_peft_model(model, config), name)
    assert torch.equal(layer.deltas["default"].boft_s, torch.ones_like(layer.deltas["default"].boft_s))
    with torch.no_grad():
        layer.deltas["default"].boft_R.normal_(std=0.3)
        layer.deltas["default"].boft_s.normal_(mean=1.0, std=0.2)
    return layer


@pytest.mark.parametrize(
    "kwargs, shape",
    [(dict(boft_block_size=4), (1, 8, 4, 4)), (dict(boft_block_size=4, boft_n_butterfly_factor=3), (3, 8, 4, 4)),
     (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2), (2, 4, 8, 8))],
    ids=["oft", "butterfly-3", "block-num-butterfly-2"],
)
def test_linear_equals_scaled_weight_times_dense_butterfly(kwargs, shape) -> None:
    layer = _randomised(tiny_mlp(), dt.BOFTConfig(target_modules=["lin1"], **kwargs), "lin1")  # in_features 32
    base, delta = layer.base_layer, layer.deltas["default"]
    assert delta.boft_R.shape == shape and delta.boft_s.shape == (32, 1)
    rotation = _dense_rotation(delta.boft_R.detach())
    s = delta.boft_s.detach().double()  # (out, 1)
    w = base.weight.detach().double()
    expected_weight = (s * (w @ rotation.T)).float()  # diag(s) W Rᵀ
    x = torch.randn(5, 32)
    with torch.no_grad():
        # peft's forward: y = s ⊙ (W (x R)) + b
        expected = ((x.double() @ rotation) @ w.T * s.T + base.bias.double()).float()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, expected_weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-5)


def test_conv2d_computes_with_the_scaled_rotated_kernel() -> None:
    layer = _randomised(tiny_convnet(), dt.BOFTConfig(target_modules=["conv2d"], boft_block_size=3), "conv2d")
    base, delta = layer.base_layer, layer.deltas["default"]
    assert delta.boft_R.shape == (1, 9, 3, 3) and delta.boft_s.shape == (1, 8)
    rotation = _dense_rotation(delta.boft_R.detach())  # (27, 27)
    w = base.weight.detach().double().flatten(1)  # (8, 27)
    kernel = (delta.boft_s.detach().double().T * (w @ rotation.T)).view(base.weight.shape).float()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, kernel, base.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_block_dropout_sets_blocks_of_one_factor_to_the_identity_in_training_only() -> None:
    config = dt.BOFTConfig(target_modules=["lin1"], boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5)
    layer = _randomised(tiny_mlp(), config, "lin1")
    delta = layer.deltas["default"]
    eye = torch.eye(4)
    clean = delta.blocks()
    assert not any(torch.allclose(b, eye) for b in clean.flatten(0, 1))
    delta.train()
    torch.manual_seed(0)
    dropped = delta.blocks(dropout=True)
    identity = [[torch.equal(b, eye) for b in factor] for factor in dropped]
    assert sorted(sum(factor) for factor in identity) == [0, 4]  # int(0.5 · 8) blocks, all in one factor
    kept = ~torch.tensor(identity)
    torch.testing.assert_close(dropped[kept], clean[kept])
    delta.eval()
    torch.testing.assert_close(delta.blocks(dropout=True), clean)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.BOFTConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.add_adapter("fly", dt.BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=3,
                                           init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "fly"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(boft_block_size=0), "exactly one of boft_block_size"),
        (dict(boft_block_size=4, boft_block_num=8), "exactly one of boft_block_size"),
        (dict(boft_block_size=-2), "boft_block_size must be a non-negative integer"),
        (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be a positive integer"),
        (dict(boft_n_butterfly_factor=40), "boft_n_butterfly_factor must be at most 32"),
        (dict(boft_dropout=1.0), "boft_dropout must be in"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(init_weights="gaussian"), "init_weights must be"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.BOFTConfig(**kwargs)


@pytest.mark.parametrize(
    "target, kwargs, match",
    [
        ("lin1", dict(boft_block_size=5), "boft_block_size=5 does not divide its dimension 32"),
        ("lin1", dict(boft_block_size=0, boft_block_num=3), "boft_block_num=3 does not divide"),
        ("lin1", dict(boft_block_size=4, boft_n_butterfly_factor=5), "multiple of 2\\*\\*4"),
        ("lin1", dict(boft_block_size=0, boft_block_num=32, boft_n_butterfly_factor=2), "even block size"),
    ],
)
def test_layers_the_blocks_do_not_fit_are_refused_before_the_model_changes(target, kwargs, match: str) -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match=match):
        dt.get_peft_model(model, dt.BOFTConfig(target_modules=[target], **kwargs))
    assert isinstance(model.lin1, nn.Linear)


def test_grouped_convolution_is_refused() -> None:
    model = tiny_convnet()
    model.conv2d = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(TargetError, match="grouped convolution"):
        dt.get_peft_model(model, dt.BOFTConfig(target_modules=["conv2d"], boft_block_size=2))


def test_peft_cpu_fallback_file_with_butterflies_is_refused_by_shape(tmp_path: Path) -> None:
    # peft without its CUDA extension writes boft_n_butterfly_factor=2 but one-factor tensors
    config = dict(target_modules=["q_proj"], boft_block_size=4, boft_n_butterfly_factor=2)
    peft.get_peft_model(tiny_llama(), peft.BOFTConfig(**config)).save_pretrained(tmp_path)
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())

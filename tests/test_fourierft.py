"""FourierFT (``deltatune.methods.fourierft``): the update against the inverse 2-D DFT of the sparse spectrum written
out as a sum of cosines, the positions against peft's layer, Conv1D's transposed merge, mixed-adapter batches and the
config's checks."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_gpt2, tiny_llama, tiny_mlp


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _explicit_update(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out_f: int, in_f: int,
                     scaling: float) -> torch.Tensor:
    """``α · Re(IDFT₂(F))`` entry by entry: ``ΔW[p, q] = α/(out·in) Σ_k F_k cos(2π (p·r_k/out + q·c_k/in))``."""
    p = torch.arange(out_f, dtype=torch.float64)[:, None, None]
    q = torch.arange(in_f, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (p * rows.double() / out_f + q * cols.double() / in_f)  # (out, in, n)
    return scaling * (torch.cos(phase) * values.double()).sum(-1) / (out_f * in_f)


def test_update_is_the_scaled_inverse_dft_of_the_sparse_spectrum_and_merges() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.FourierFTConfig(target_modules=["lin0"], n_frequency=40, scaling=7.0))
    layer = _layer(model, "lin0")
    delta, base = layer.deltas["default"], layer.base_layer
    rows, cols = delta.positions
    expected = _explicit_update(delta.fourierft_spectrum.detach(), rows, cols, 32, 16, 7.0).float()
    torch.testing.assert_close(delta.delta_weight(base), expected, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (base.weight + expected).T + base.bias, rtol=1e-5, atol=1e-5)
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, tiny_mlp().lin0.weight + expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [777, 0, 2**40])
def test_positions_are_distinct_and_equal_peft_s_for_the_same_seed(seed: int) -> None:
    kwargs = dict(target_modules=["q_proj", "down_proj"], n_frequency=300, random_loc_seed=seed)
    ours = dt.get_peft_model(tiny_llama(), dt.FourierFTConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.FourierFTConfig(**kwargs))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        positions = _layer(ours, name).deltas["default"].positions
        assert torch.equal(positions, theirs.get_base_model().get_submodule(name).indices["default"])
        assert len(set(map(tuple, positions.T.tolist()))) == 300


def test_conv1d_merges_the_transposed_update() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.FourierFTConfig(target_modules=["c_fc"], n_frequency=50, scaling=3.0))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = _layer(model, "transformer.h.0.mlp.c_fc")
    delta, base = layer.deltas["default"], layer.base_layer
    in_f, out_f = base.weight.shape
    rows, cols = delta.positions
    expected = _explicit_update(delta.fourierft_spectrum.detach(), rows, cols, out_f, in_f, 3.0).float()
    original = base.weight.clone()
    with torch.no_grad():
        layer.merge(["default"])
    torch.testing.assert_close(base.weight, original + expected.T, rtol=1e-5, atol=1e-6)


def test_init_weights_true_starts_from_a_zero_spectrum_and_the_pattern_sets_n_per_module() -> None:
    config = dt.FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=20, init_weights=True,
                                n_frequency_pattern={"lin1": 5})
    model = dt.get_peft_model(tiny_mlp(), config)
    assert not _layer(model, "lin0").deltas["default"].fourierft_spectrum.any()
    assert _layer(model, "lin0").deltas["default"].fourierft_spectrum.shape == (20,)
    assert _layer(model, "lin1").deltas["default"].fourierft_spectrum.shape == (5,)
    assert "positions" not in str(list(model.state_dict()))  # regenerated from the seed, never saved


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=30))
    model.add_adapter("other", dt.FourierFTConfig(target_modules=["lin1"], n_frequency=10, random_loc_seed=1))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_frequency=0), "n_frequency must be a positive integer"),
        (dict(scaling=float("nan")), "scaling must be a finite number"),
        (dict(random_loc_seed=None), "random_loc_seed must be an integer"),
        (dict(random_loc_seed=2**64), "random_loc_seed must be an integer"),
        (dict(bias="fourierft_only"), "bias must be"),
        (dict(n_frequency_pattern={"q": 0}), r"n_frequency_pattern\['q'\] must be a positive integer"),
        (dict(n_frequency_pattern={"(": 3}), "n_frequency_pattern key"),
        (dict(init_weights="zero"), "init_weights must be"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.FourierFTConfig(**kwargs)


def test_more_frequencies_than_the_spectrum_has_are_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="exceeds the 32 x 16 = 512 entries"):
        dt.get_peft_model(model, dt.FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=600))
    assert type(model.lin0) is torch.nn.Linear

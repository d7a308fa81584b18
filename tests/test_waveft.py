"""WaveFT (``deltatune.methods.waveft``): our wavelet filters and inverse 2-D transform against peft's tables and
``waverec2d``, the Haar update written out coefficient by coefficient, the update and positions against peft's layer
for padded (longer) filters and ``use_idwt=False``, Conv1D's transposed merge, the random init, mixed-adapter batches
and the config's checks."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from peft.tuners.waveft.wavelet import Wavelet as PeftWavelet
from peft.tuners.waveft.waverec2d import waverec2d as peft_waverec2d

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from deltatune.methods import _wavelets
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_gpt2, tiny_llama, tiny_mlp


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


@pytest.mark.parametrize("family", _wavelets.SUPPORTED)
def test_filters_are_orthonormal_with_vanishing_moments_and_equal_peft_s_tables(family: str) -> None:
    lo = torch.tensor(_wavelets.rec_lo(family), dtype=torch.float64)
    coiflet = family.startswith("coif")
    # the defining conditions: Σ h = √2, orthonormal to its even shifts, vanishing moments of the wavelet (dbN / symN:
    # N, coifK: 2K) and, for a coiflet, 2K - 1 of the scaling function about tap 2K
    assert lo.sum().item() == pytest.approx(math.sqrt(2), abs=1e-12)
    for shift in range(0, lo.numel(), 2):
        assert (lo[shift:] * lo[: lo.numel() - shift]).sum().item() == pytest.approx(float(shift == 0), abs=1e-12)
    k = torch.arange(lo.numel(), dtype=torch.float64)
    moments = lo.numel() // 3 if coiflet else lo.numel() // 2
    for moment in range(moments):
        assert ((-1) ** k * k**moment * lo).sum().item() == pytest.approx(0.0, abs=1e-8 * 10**moment)
    for moment in range(1, moments if coiflet else 1):
        assert ((k - moments) ** moment * lo).sum().item() == pytest.approx(0.0, abs=1e-8 * 10**moment)
    theirs = PeftWavelet(family)
    torch.testing.assert_close(lo, torch.tensor(theirs.rec_lo, dtype=torch.float64), rtol=0, atol=1e-10)
    _, hi = _wavelets.filter_bank(family, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(hi, torch.tensor(theirs.rec_hi, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("family, shape", [("db1", (5, 4)), ("db4", (9, 6)), ("sym7", (12, 10)), ("db10", (11, 13)),
                                           ("coif3", (10, 9))])
def test_inverse_dwt2_equals_peft_s_waverec2d(family: str, shape: tuple[int, int]) -> None:
    bands = [torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ours = _wavelets.inverse_dwt2(*bands, family)
    theirs = peft_waverec2d((bands[0], tuple(bands[1:])), family)
    length = len(_wavelets.rec_lo(family))
    assert ours.shape == theirs.shape == (2 * shape[0] - length + 2, 2 * shape[1] - length + 2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_haar_update_written_out_coefficient_by_coefficient() -> None:
    """db1 needs no padding: band coefficient ``(i, j)`` sets the 2x2 block ``(2i.., 2j..)`` to ``½ (cA + s_r cH +
    s_c cV + s_r s_c cD)``, ``s = +1`` on the block's first row / column and ``-1`` on its second."""
    model = dt.get_peft_model(tiny_mlp(), dt.WaveFTConfig(target_modules=["lin0"], n_frequency=200, scaling=3.0,
                                                         init_weights=False))
    layer = _layer(model, "lin0")
    delta, base = layer.deltas["default"], layer.base_layer
    out_f, in_f = base.weight.shape  # (32, 16)
    dense = torch.zeros(out_f, in_f)
    dense[delta.positions[0], delta.positions[1]] = delta.waveft_spectrum.detach()
    h, w = out_f // 2, in_f // 2
    ca, ch, cv, cd = dense[:h, :w], dense[:h, w:], dense[h:, :w], dense[h:, w:]
    expected = torch.zeros(out_f, in_f)
    for r, sr in ((0, 1), (1, -1)):
        for c, sc in ((0, 1), (1, -1)):
            expected[r::2, c::2] = 0.5 * (ca + sr * ch + sc * cv + sr * sc * cd)
    expected *= 3.0
    torch.testing.assert_close(delta.delta_weight(base), expected, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, in_f)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (base.weight + expected).T + base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(wavelet_family="db3"), dict(wavelet_family="sym6"),
                                    dict(wavelet_family="coif2"), dict(use_idwt=False),
                                    dict(wavelet_family="db2", random_loc_seed=0)])
def test_positions_and_update_equal_peft_s_layer(kwargs) -> None:
    config = dict(target_modules=["q_proj", "down_proj"], n_frequency=300, scaling=7.0, **kwargs)
    ours = dt.get_peft_model(tiny_llama(), dt.WaveFTConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.WaveFTConfig(**config))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer, their_layer = _layer(ours, name), theirs.get_base_model().get_submodule(name)
        delta = layer.deltas["default"]
        values = torch.randn(300, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            delta.waveft_spectrum.copy_(values)
            their_layer.waveft_spectrum["default"].copy_(values)
        indices = their_layer.waveft_indices["default"]
        assert len(set(map(tuple, indices.T.tolist()))) == 300
        offset = (delta.positions - indices)[:, :1]  # our positions live in the padded matrix
        assert torch.equal(delta.positions, indices + offset)
        torch.testing.assert_close(delta.delta_weight(layer.base_layer), their_layer.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)


def test_conv1d_merges_the_transposed_update() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.WaveFTConfig(target_modules=["c_fc"], n_frequency=50, scaling=3.0,
                                                           wavelet_family="sym3", init_weights=False))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = _layer(model, "transformer.h.0.mlp.c_fc")
    delta, base = layer.deltas["default"], layer.base_layer
    update = delta.update().detach()
    assert update.shape == (base.weight.shape[1], base.weight.shape[0])  # (out, in); Conv1D stores (in, out)
    original = base.weight.clone()
    x = torch.randn(2, 3, base.weight.shape[0])
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge(["default"])
        torch.testing.assert_close(base.weight, original + update.T, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_init_weights_zero_by_default_random_small_otherwise_and_pattern_sets_n_per_module() -> None:
    config = dt.WaveFTConfig(target_modules=["lin0", "lin1"], n_frequency=20, n_frequency_pattern={"lin1": 5})
    model = dt.get_peft_model(tiny_mlp(), config)
    assert not _layer(model, "lin0").deltas["default"].waveft_spectrum.any()
    assert _layer(model, "lin0").deltas["default"].waveft_spectrum.shape == (20,)
    assert _layer(model, "lin1").deltas["default"].waveft_spectrum.shape == (5,)
    assert "positions" not in str(list(model.state_dict()))  # regenerated from the seed, never saved
    torch.manual_seed(0)
    random = dt.get_peft_model(tiny_mlp(), dt.WaveFTConfig(target_modules=["lin0"], n_frequency=512,
                                                           init_weights=False))
    values = _layer(random, "lin0").deltas["default"].waveft_spectrum.detach()
    assert 0.009 < values.std().item() < 0.011  # peft's N(0, 0.01²)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.WaveFTConfig(target_modules=["lin0", "lin1"], n_frequency=30,
                                                          init_weights=False))
    model.add_adapter("other", dt.WaveFTConfig(target_modules=["lin1"], n_frequency=10, random_loc_seed=1,
                                               wavelet_family="db2", init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_frequency=0), "n_frequency must be a positive integer"),
        (dict(scaling=float("inf")), "scaling must be a finite number"),
        (dict(random_loc_seed=1.5), "random_loc_seed must be an integer"),
        (dict(wavelet_family="coif4"), r"wavelet_family='coif4' is not supported; deltatune supports db1, .*coif3"),
        (dict(wavelet_family="db11"), "wavelet_family='db11' is not supported"),
        (dict(wavelet_family="haar"), "wavelet_family='haar' is not supported"),
        (dict(use_idwt="yes"), "use_idwt must be True or False"),
        (dict(init_weights=None), "init_weights must be True or False"),
        (dict(proportional_parameters="yes"), "proportional_parameters must be True or False"),
        (dict(bias="fourier_only"), "bias must be"),
        (dict(n_frequency_pattern={"q": -1}), r"n_frequency_pattern\['q'\] must be a positive integer"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.WaveFTConfig(**kwargs)


def test_more_coefficients_than_the_weight_has_are_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="exceeds the 512 entries"):
        dt.get_peft_model(model, dt.WaveFTConfig(target_modules=["lin0", "lin1"], n_frequency=600))
    assert type(model.lin0) is torch.nn.Linear


def test_proportional_parameters_share_the_budget_by_layer_size_as_peft() -> None:
    config = dict(target_modules=["q_proj", "k_proj", "down_proj"], n_frequency=40, proportional_parameters=True)
    model = dt.get_peft_model(tiny_llama(), dt.WaveFTConfig(**config))
    shares = {name: layer.deltas["default"].waveft_spectrum.numel() for name, layer in model.named_modules()
              if isinstance(layer, AdapterLayer)}
    sizes = {name: layer.base_layer.weight.numel() for name, layer in model.named_modules()
             if isinstance(layer, AdapterLayer)}
    budget, total = 40 * len(sizes), sum(sizes.values())
    assert shares == {name: max(1, round(size / total * budget)) for name, size in sizes.items()}
    assert len(set(shares.values())) > 1  # the layers differ in size, so their shares do
    theirs = peft.get_peft_model(tiny_llama(), peft.WaveFTConfig(**config))
    assert {n.removeprefix("base_model.model.").removesuffix(".waveft_spectrum.default"): p.numel()
            for n, p in theirs.named_parameters() if "waveft_spectrum" in n} == {
        n.removeprefix("base_model.model."): v for n, v in shares.items()}

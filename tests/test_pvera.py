"""PVeRA (``deltatune.methods.pvera``): the projections against the draw written out, the mean path and the sampled
path against the formula (with the seeded noise drawn by hand), merging as the mean, the rules for several adapters,
mixed-adapter batches and the config's checks."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_causal_lm_inputs, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _pair_by_hand(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaiming-uniform with gain √2 is U(±√(6/fan_in)): A (2r, in) then B (out, r) from one CPU generator."""
    gen = torch.Generator().manual_seed(key)
    a = torch.empty(2 * r, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=gen)
    b = torch.empty(max_out, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=gen)
    return a, b


def _model(**kwargs) -> dt.PeftModel:
    config = dt.PveraConfig(**{"r": 4, "projection_prng_key": 6, "init_weights": False,
                               "target_modules": ["q_proj", "down_proj"], **kwargs})
    return dt.get_peft_model(tiny_llama(), config)


def test_projections_are_drawn_from_the_key_with_2r_rows_in_a() -> None:
    shared = _model().base_model.shared_state["default"]
    a, b = _pair_by_hand(6, 4, max_in=64, max_out=32)  # q_proj 32 -> 32, down_proj 64 -> 32
    assert torch.equal(shared.pvera_A, a) and torch.equal(shared.pvera_B, b)


def test_eval_output_uses_the_mean_and_merging_folds_it_in() -> None:
    model = _model()
    layer = model.get_base_model().model.layers[0].mlp.down_proj  # 64 -> 32
    delta = layer.deltas["default"]
    a, b = _pair_by_hand(6, 4, max_in=64, max_out=32)
    x = torch.randn(2, 3, 64)
    model.eval()
    with torch.no_grad():
        mu = (x @ a.T * delta.pvera_lambda_d)[..., :4]  # the first r entries of Λ_d A x
        expected = layer.base_layer(x) + (mu @ b.T) * delta.pvera_lambda_b
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_training_samples_with_the_seeded_generator_of_each_layer() -> None:
    model = _model(generator_seed=13)
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    delta = layer.deltas["default"]
    a, b = _pair_by_hand(6, 4, max_in=64, max_out=32)
    x = torch.randn(2, 3, 32)
    model.train()
    with torch.no_grad():
        h = x @ a[:, :32].T * delta.pvera_lambda_d
        mu, logvar = h[..., :4], h[..., 4:]
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(13))  # the layer's first draw
        expected = layer.base_layer(x) + ((mu + eps * torch.exp(logvar / 2)) @ b.T) * delta.pvera_lambda_b
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), expected)  # the generator moved on: a new draw


def test_sample_at_inference_keeps_sampling_in_eval_mode() -> None:
    model = _model(sample_at_inference=True)
    inputs = make_causal_lm_inputs(model)
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_each_adapter_draws_its_own_pair_from_the_same_key() -> None:
    model = _model()
    model.add_adapter("small", dt.PveraConfig(r=2, projection_prng_key=6, target_modules=["q_proj"]))
    shared = model.base_model.shared_state
    assert shared["small"].pvera_A.shape == (4, 32)
    torch.testing.assert_close(shared["small"].pvera_A, _pair_by_hand(6, 2, 32, 32)[0], rtol=0, atol=0)
    with pytest.raises(dt.ConfigError, match="projection_prng_key=1 differs"):
        model.add_adapter("bad", dt.PveraConfig(r=4, projection_prng_key=1))


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = _model()
    model.add_adapter("other", dt.PveraConfig(r=2, projection_prng_key=6, init_weights=False,
                                              target_modules=["v_proj", "down_proj"]))
    inputs = make_causal_lm_inputs(model, batch=3)
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["other", "default", "__base__"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(pvera_dropout=1.0), "pvera_dropout must be in"),
        (dict(d_initial=float("nan")), "d_initial must be a finite number"),
        (dict(generator_seed=1.5), "generator_seed must be an integer"),
        (dict(bias="vera_only"), "bias must be 'none', 'all' or 'pvera_only'"),
        (dict(exclude_modules=["k_proj"]), "PveraConfig has no exclude_modules"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.PveraConfig(**kwargs)

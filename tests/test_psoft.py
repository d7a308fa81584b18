"""PSOFT (``deltatune.methods.psoft``): the frozen factors against peft's (bit for bit, both SVD backends, the
low-rank one seeded without touching the global generator), ``R`` against the Cayley transform and the Neumann series
written out, the output against ``s · B (R − I) A x``, mixed batches and the config's checks."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_mlp


@pytest.mark.parametrize("kwargs", [dict(), dict(ab_svd_init="pissa_init", psoft_alpha=5),
                                    dict(psoft_svd="lowrank", random_seed=11, psoft_svd_lowrank_niter=2)],
                         ids=["full-psoft", "full-pissa", "lowrank"])
def test_frozen_factors_are_peft_bit_for_bit(kwargs) -> None:
    config = dict(target_modules=["lin0", "lin1"], r=4, **kwargs)
    ours = dt.get_peft_model(tiny_mlp(), dt.PsoftConfig(**config))
    theirs = peft.get_peft_model(tiny_mlp(), peft.PsoftConfig(**config))
    for name in ("lin0", "lin1"):
        delta = ours.get_base_model().get_submodule(name).deltas["default"]
        layer = theirs.get_base_model().get_submodule(name)
        assert torch.equal(delta.psoft_A, layer._psoft_A_cache["default"])
        assert torch.equal(delta.psoft_B, layer._psoft_B_cache["default"])
    if "random_seed" in kwargs:  # the seeded draw leaves the global generator where the test put it
        model = tiny_mlp()
        state = torch.get_rng_state()
        dt.get_peft_model(model, dt.PsoftConfig(**config))
        assert torch.equal(torch.get_rng_state(), state)


def _rotation_delta(**kwargs):
    model = dt.get_peft_model(tiny_mlp(), dt.PsoftConfig(target_modules=["lin1"], r=4, init_weights=False, **kwargs))
    return model.get_base_model().lin1


def _skew(weight: torch.Tensor, r: int) -> torch.Tensor:
    q = torch.zeros(r, r)
    k = 0
    for i in range(r):
        for j in range(i + 1, r):
            q[i, j], q[j, i] = weight[k], -weight[k]
            k += 1
    return q


def test_cayley_rotation_is_orthogonal_and_scaled_by_the_vectors() -> None:
    layer = _rotation_delta(psoft_mag_a=False, psoft_mag_b=False)
    rotation = layer.deltas["default"].psoft_R
    q = _skew(rotation.weight.detach(), 4)
    eye = torch.eye(4)
    expected = (eye + q) @ torch.linalg.inv(eye - q)
    with torch.no_grad():
        torch.testing.assert_close(rotation.matrix(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rotation.matrix() @ rotation.matrix().T, eye, rtol=1e-5, atol=1e-5)
        scaled = _rotation_delta().deltas["default"].psoft_R
        scaled.vector_a.mul_(2.0)
        scaled.vector_b.copy_(torch.arange(1.0, 5.0))
        plain = torch.linalg.solve(eye - _skew(scaled.weight, 4), eye + _skew(scaled.weight, 4), left=False)
        torch.testing.assert_close(scaled.matrix(), torch.arange(1.0, 5.0)[:, None] * plain * 2.0, rtol=1e-5,
                                   atol=1e-6)


def test_neumann_series_written_out_with_the_norm_bound() -> None:
    rotation = _rotation_delta(use_cayley_neumann=True, num_cayley_neumann_terms=5, cayley_neumann_eps=0.3,
                               psoft_mag_a=False, psoft_mag_b=False).deltas["default"].psoft_R
    q = _skew(rotation.weight.detach(), 4)
    assert q.norm() > 0.3
    q = q * 0.3 / (q.norm() + 1e-12)
    expected = torch.eye(4) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    with torch.no_grad():
        torch.testing.assert_close(rotation.matrix(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(), dict(psoft_orth=False, psoft_alpha=3)], ids=["orth", "free"])
def test_output_equals_the_update_written_out(kwargs) -> None:
    layer = _rotation_delta(**kwargs)
    base, delta = layer.base_layer, layer.deltas["default"]
    s = delta.scaling
    with torch.no_grad():
        update = s * delta.psoft_B @ (delta.psoft_R.matrix() - torch.eye(4)) @ delta.psoft_A
        x = torch.randn(2, 5, 32)
        torch.testing.assert_close(layer(x), base(x) + x @ update.T, rtol=1e-5, atol=1e-5)
        assert update.abs().max() > 1e-3
        # the principal subspace: B A is W's best rank-4 approximation over s (psoft_init)
        u, sv, vh = torch.linalg.svd(base.weight)
        torch.testing.assert_close(s * delta.psoft_B @ delta.psoft_A, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4],
                                   rtol=1e-4, atol=1e-5)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.PsoftConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    model.add_adapter("other", dt.PsoftConfig(target_modules=["lin1"], r=4, psoft_orth=False, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


def test_a_rank_beyond_the_weight_is_refused_before_the_model_changes() -> None:
    model = tiny_mlp()
    with pytest.raises(TargetError, match="head: r=4 exceeds min\\(in, out\\) = 3"):
        dt.get_peft_model(model, dt.PsoftConfig(target_modules=["lin1", "head"], r=4))
    assert isinstance(model.lin1, nn.Linear) and isinstance(model.head, nn.Linear)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(ab_svd_init="olora"), "ab_svd_init must be"),
        (dict(psoft_svd="randomized"), "psoft_svd must be"),
        (dict(random_seed=1.5), "random_seed must be an integer"),
        (dict(use_cayley_neumann=True, num_cayley_neumann_terms=0), "num_cayley_neumann_terms must be a positive"),
        (dict(use_cayley_neumann=True, cayley_neumann_eps=1.0), "cayley_neumann_eps must be None or a number in"),
        (dict(psoft_dropout=-0.1), "psoft_dropout must be in"),
        (dict(target_modules="lin.", layers_to_transform=0), "cannot be used with a regex target_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.PsoftConfig(**kwargs)


def test_fields_another_mode_reads_are_warned_as_in_peft() -> None:
    with pytest.warns(UserWarning, match="psoft_svd_lowrank_niter=3 has no effect"):
        dt.PsoftConfig(psoft_svd_lowrank_niter=3)
    with pytest.warns(UserWarning, match="no effect unless use_cayley_neumann=True"):
        dt.PsoftConfig(cayley_neumann_eps=0.5)

"""OSF (``deltatune.methods.osf``): the update against the weight's SVD written out, the gradients projected off the
frozen subspace (checked against peft's hooks and by orthogonality, for tall, wide and square weights), peft's
effective-rank rules, merge and unmerge, mixed batches and the config's checks."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import AdapterLayer
from deltatune.methods.osf import effective_rank
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_llama, tiny_mlp


class _Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tall = nn.Linear(6, 10)  # out > in: U is not square, U_high kept
        self.wide = nn.Linear(10, 6)  # out < in: V_high kept
        self.square = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(self.wide(self.tall(x)[..., :10]))


def _layer(model, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def test_update_is_the_trainable_svd_part_minus_its_start_and_merges_and_unmerges() -> None:
    model = dt.get_peft_model(_Shapes(), dt.OSFConfig(target_modules=["tall", "wide", "square"], effective_rank=2,
                                                      init_weights=False))
    layer = _layer(model, "tall")
    delta, w = layer.deltas["default"], layer.base_layer.weight.detach().clone()
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    p = delta.osf_svd_params
    assert p.U_low.shape == (10, 4) and p.V_low.shape == (4, 6)  # min(10, 6) - 2 trainable directions
    update = p.U_low.double() @ torch.diag(p.S_low.double()) @ p.V_low.double() - (
        u[:, 2:].double() @ torch.diag(s[2:].double()) @ vt[2:].double())
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (w.double() + update).float().T + layer.base_layer.bias,
                                   rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, (w.double() + update).float(), rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()  # peft cannot unmerge OSF
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=1e-6)


def test_fresh_adapter_is_exactly_the_base_model() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.OSFConfig(target_modules=["lin0", "lin1"]))
    x = make_mlp_inputs(4)["x"]
    with torch.no_grad():
        assert torch.equal(model(x), tiny_mlp()(x))


def test_gradients_are_projected_off_the_frozen_subspace_as_peft_does() -> None:
    config = dict(target_modules=["tall", "wide", "square"], effective_rank=3, init_weights=False)
    torch.manual_seed(1)
    ours = dt.get_peft_model(_Shapes(), dt.OSFConfig(**config))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_Shapes(), peft.OSFConfig(**config))
    x = torch.randn(4, 6)
    for model in (ours, theirs):
        model(x).pow(2).sum().backward()
    grads = {n.replace(".deltas.default", ""): p.grad for n, p in ours.named_parameters() if p.grad is not None}
    expected = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and len(grads) == 9
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5)
    for name in ("tall", "wide", "square"):
        w = _layer(ours, name).base_layer.weight.detach()
        u, _, vt = torch.linalg.svd(w, full_matrices=False)
        p = _layer(ours, name).deltas["default"].osf_svd_params
        # no component along the preserved directions
        assert (u[:, :3].T @ p.U_low.grad).abs().max() < 1e-5 * p.U_low.grad.abs().max()
        assert (p.V_low.grad @ vt[:3].T).abs().max() < 1e-5 * p.V_low.grad.abs().max()


def test_effective_rank_rules_are_peft_s() -> None:
    config = dt.OSFConfig(effective_rank=0.5, rank_pattern={r"layers\.1\.": 3, "proj": 100})
    assert effective_rank(config, "model.layers.0.q", 32) == 16  # fraction of min(out, in)
    assert effective_rank(config, "model.layers.1.q_proj", 32) == 3  # first pattern found anywhere in the name
    assert effective_rank(config, "model.layers.0.q_proj", 32) == 32  # an integer, at most min(out, in)
    assert effective_rank(dt.OSFConfig(), "x", 33) == 16  # None: half, rounded down
    with pytest.raises(TargetError, match="resolves to 0"):
        dt.get_peft_model(tiny_mlp(), dt.OSFConfig(target_modules=["lin0"], effective_rank=0.01))


def test_default_targets_are_peft_s_table_or_all_linear() -> None:
    for factory in (tiny_mlp, tiny_llama):  # no model type: peft's all-linear; llama: peft's table
        ours = dt.get_peft_model(factory(), dt.OSFConfig())
        theirs = peft.get_peft_model(factory(), peft.OSFConfig())
        adapted = {n for n, m in ours.named_modules() if isinstance(m, AdapterLayer)}
        assert adapted == {n for n, m in theirs.named_modules() if hasattr(m, "osf_svd_params")}
        assert len(adapted) >= 2


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.OSFConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.add_adapter("other", dt.OSFConfig(target_modules=["lin1"], effective_rank=5, init_weights=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(effective_rank=0), "effective_rank must be a positive integer"),
        (dict(effective_rank=2.5), "effective_rank must be a positive integer"),
        (dict(effective_rank="half"), "effective_rank must be"),
        (dict(rank_pattern={"q": -1}), r"rank_pattern\['q'\] must be"),
        (dict(rank_pattern={"[": 2}), "rank_pattern key"),
        (dict(init_weights=None), "init_weights must be"),
        (dict(target_svd_config=["lin0.weight"]), "target_svd_config must be a dict"),
        (dict(layers_to_transform=[0]), "OSFConfig has no layers_to_transform"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.OSFConfig(**kwargs)


def test_target_svd_config_is_accepted_with_a_warning_and_changes_nothing_as_in_peft() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="target_svd_config has no effect"):
        config = dt.OSFConfig(target_modules=["lin0"], target_svd_config={"lin0.weight": 3})
    torch.manual_seed(0)
    plain = dt.get_peft_model(tiny_mlp(), dt.OSFConfig(target_modules=["lin0"], init_weights=False))
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = dt.get_peft_model(tiny_mlp(), dt.OSFConfig(target_modules=["lin0"], init_weights=False,
                                                          target_svd_config={"lin0.weight": 3}))
    x = make_mlp_inputs()["x"]
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert config.to_dict()["target_svd_config"] == {"lin0.weight": 3}  # saved as peft saves it

"""AdaMSS (``deltatune.methods.adamss``): the projection, groups and initial factors against peft's (bit for bit:
the same seeded SVD and KMeans), the output and the merged weight and bias against the grouped update written out,
scikit-learn missing refused by name before the model changes, mixed batches and the config's checks."""

from __future__ import annotations

import sys

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_mlp


@pytest.mark.parametrize("kwargs", [dict(), dict(use_dynamic_rank=True, svd_threshold=0.3, random_seed=4)],
                         ids=["fixed", "dynamic"])
def test_subspaces_and_factors_are_peft_bit_for_bit(kwargs) -> None:
    config = dict(target_modules=["lin0", "lin1"], r=8, num_subspaces=3, subspace_rank=2, **kwargs)
    base = tiny_mlp()
    torch.manual_seed(1)  # the factors' inner SVDs draw from the global generator, in peft too
    ours = dt.get_peft_model(base, dt.AdamssConfig(**config))
    base = tiny_mlp()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base, peft.AdamssConfig(**config))
    for name in ("lin0", "lin1"):
        delta = ours.get_base_model().get_submodule(name).deltas["default"]
        layer = theirs.get_base_model().get_submodule(name)
        assert torch.equal(delta.adamss_newB, layer.adamss_newB["default"])
        assert torch.equal(delta.order, layer.scatter_index["default"])
        assert len(delta.adamss_A) == layer.num_subspaces["default"] == 3
        for ours_a, theirs_a in zip(delta.adamss_A, layer.adamss_A["default"]):
            assert torch.equal(ours_a, theirs_a)
        for ours_b, theirs_b in zip(delta.adamss_B, layer.adamss_B["default"]):
            assert ours_b.shape == theirs_b.shape and not ours_b.any()


def test_output_and_merge_equal_the_grouped_update_written_out() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.AdamssConfig(target_modules=["lin1"], r=6, num_subspaces=3,
                                                          subspace_rank=2, init_weights=None))
    layer = model.get_base_model().lin1
    base, delta = layer.base_layer, layer.deltas["default"]
    with torch.no_grad():
        for b in delta.adamss_B:
            b.normal_()
        x = torch.randn(2, 5, 32)
        z = torch.cat([x, torch.ones(2, 5, 1)], -1) @ delta.adamss_newB.T  # (..., R), the bias column included
        expected = base(x).clone()
        start = 0
        for a, b in zip(delta.adamss_A, delta.adamss_B):
            rows = delta.order[start:start + b.shape[0]]
            expected[..., rows] += z @ a.T @ b.T
            start += b.shape[0]
        assert start == 32 and sorted(delta.order.tolist()) == list(range(32))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        weight, bias = base.weight.clone(), base.bias.clone()
        layer.merge(["default"])
        torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(base.bias, bias)  # the bias column merges into the bias
        layer.unmerge()
        torch.testing.assert_close(base.weight, weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(base.bias, bias, rtol=0, atol=1e-6)


def test_missing_scikit_learn_is_refused_by_name_before_the_model_changes(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import fails as if not installed
    model = tiny_mlp()
    with pytest.raises(ConfigError, match="pip install 'deltatune\\[adamss\\]'"):
        dt.get_peft_model(model, dt.AdamssConfig(target_modules=["lin0", "lin1"], r=4))
    assert isinstance(model.lin0, nn.Linear) and isinstance(model.lin1, nn.Linear)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.AdamssConfig(target_modules=["lin0", "lin1"], r=4, num_subspaces=2,
                                                          init_weights=None))
    model.add_adapter("other", dt.AdamssConfig(target_modules=["lin1"], r=6, num_subspaces=3, subspace_rank=2,
                                               init_weights=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adamss_B" in name:
                p.normal_()
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


def test_adaptive_subspace_allocation_prunes_as_peft(tmp_path) -> None:
    config = dict(target_modules=["lin0", "lin1"], r=8, num_subspaces=3, subspace_rank=2, init_weights=None,
                  use_asa=True, init_warmup=1, final_warmup=6, mask_interval=2, asa_target_subspaces=2)
    dt.get_peft_model(tiny_mlp(), dt.AdamssConfig(**config)).save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path, is_trainable=True)
    inputs = make_mlp_inputs(batch=8)

    def masks(model) -> dict[str, bool]:
        return {n.replace("deltas.default.", "").replace(".default", ""): p.requires_grad
                for n, p in model.named_parameters() if "adamss_" in n}

    for step in range(1, 8):
        for model in (ours, theirs):
            loss = nn.functional.cross_entropy(model(inputs["x"]), inputs["labels"])
            loss.backward()
            model.base_model.update_and_allocate(step)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad and p.grad is not None:
                        p.sub_(0.5 * p.grad)
            model.zero_grad(set_to_none=True)
        assert masks(ours) == masks(theirs), step
    final = masks(ours)
    assert sum(final.values()) == 2 * 1  # one subspace (its A and B) above the 2nd best: peft's strict threshold
    assert len(final) == 2 * 2 * 3


def test_init_weights_false_reads_as_none_as_in_peft() -> None:
    assert dt.AdamssConfig(init_weights=False).init_weights is None
    assert peft.AdamssConfig(init_weights=False).init_weights is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(num_subspaces=0), "num_subspaces must be a positive integer"),
        (dict(subspace_rank=1.5), "subspace_rank must be a positive integer"),
        (dict(init_weights="kaiming"), "init_weights must be 'orthogonal' or None"),
        (dict(use_asa=True, init_warmup=10, final_warmup=10), "init_warmup \\(10\\) must be smaller"),
        (dict(use_asa=True, mask_interval=0), "mask_interval and asa_target_subspaces must be positive"),
        (dict(use_asa=True, asa_schedule_exponent=0), "asa_schedule_exponent must be positive"),
        (dict(svd_threshold=float("nan")), "svd_threshold must be a finite number"),
        (dict(random_seed="0"), "random_seed must be an integer"),
        (dict(exclude_modules=["lin0"]), "has no exclude_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.AdamssConfig(**kwargs)

"""Lily (``deltatune.methods.lily``): which layers share ``A`` and the bank, against peft's sharing (the oracle for
the grouping); the output against the routed update written out; cached generation against peft's; mixed-adapter
batches; merging refused; the config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterStateError, ConfigError
from deltatune.layers import AdapterLayer
from tests.adapter_utils import logits, only_adapter, snapshot, assert_same_state
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_llama, tiny_mlp, tiny_t5


def _partition(modules: dict[str, nn.Module]) -> list[list[str]]:
    """Module names grouped by object identity, in order."""
    groups: dict[int, list[str]] = {}
    for name, module in modules.items():
        groups.setdefault(id(module), []).append(name)
    return sorted(groups.values())


@pytest.mark.parametrize("target_modules, stride_A", [(["q", "v", "k"], 3), (["q", "wo"], 2), (".*(q|o)", 1)])
def test_shared_projectors_follow_peft(target_modules, stride_A: int) -> None:
    config = dict(target_modules=target_modules, r=2, stride_A=stride_A, num_B=3)
    ours = dt.get_peft_model(tiny_t5(), dt.LilyConfig(**config))
    theirs = peft.get_peft_model(tiny_t5(), peft.LilyConfig(**config))
    our_layers = {n: m.deltas["default"] for n, m in ours.get_base_model().named_modules()
                  if isinstance(m, AdapterLayer)}
    their_layers = {n: m for n, m in theirs.get_base_model().named_modules() if hasattr(m, "lily_router")}
    assert our_layers.keys() == their_layers.keys()
    for part in ("lily_A", "lily_B"):
        ours_by = _partition({n: getattr(d, part) for n, d in our_layers.items()})
        theirs_by = _partition({n: getattr(m, part)["default"] for n, m in their_layers.items()})
        assert ours_by == theirs_by
        assert any(len(group) > 1 for group in ours_by) == (part == "lily_B" or stride_A > 1)  # shared
    assert len(_partition({n: d.lily_router for n, d in our_layers.items()})) == len(our_layers)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_output_equals_the_routed_update_written_out() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LilyConfig(target_modules=["lin1"], r=3, num_B=4, scaling=0.7,
                                                        init_weights=False))
    layer = model.get_base_model().lin1
    base, delta = layer.base_layer, layer.deltas["default"]
    a, router = delta.lily_A.weight.detach(), delta.lily_router.weight.detach()
    bank = delta.lily_B.weight.detach()  # (num_B · r, out)
    x = torch.randn(2, 5, base.in_features)
    hidden = x @ a.T
    probs = F.softmax(hidden @ router.T, dim=-1).reshape(-1, 4).mean(0)
    combined = sum(probs[e] * bank[3 * e:3 * (e + 1)] for e in range(4))  # (r, out)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + 0.7 * hidden @ combined, rtol=1e-5, atol=1e-6)


def test_cached_generation_equals_peft(tmp_path: Path) -> None:
    config = dict(task_type="CAUSAL_LM", r=4, stride_A=2, init_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), peft.LilyConfig(**config))
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    batch = make_causal_lm_inputs(ours)
    kwargs = dict(input_ids=batch["input_ids"][:, :4], attention_mask=batch["attention_mask"][:, :4],
                  max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))


def test_mixed_batch_gives_each_adapter_its_rows_as_a_batch_of_their_own() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LilyConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    model.add_adapter("other", dt.LilyConfig(target_modules=["lin1"], r=4, num_B=3, init_weights=False))
    x = make_mlp_inputs(batch=6)["x"]
    names = ["default", "other", "__base__", "other", "default", "default"]
    mixed = logits(model, {"x": x}, adapter_names=names)
    for name in set(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        with only_adapter(model, name):
            torch.testing.assert_close(mixed[rows], logits(model, {"x": x[rows]}), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[0], mixed[1])


def test_merging_is_refused_and_changes_nothing() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LilyConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    before = snapshot(model)
    with pytest.raises(AdapterStateError, match="Lily cannot be merged"):
        model.merge_and_unload()
    assert_same_state(before, model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(stride_A=0), "stride_A must be a positive integer"),
        (dict(num_B=1), "num_B must be at least 2"),
        (dict(scaling=float("nan")), "scaling must be a finite number"),
        (dict(init_weights="yes"), "init_weights must be"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.LilyConfig(**kwargs)

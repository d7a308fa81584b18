"""TinyLoRA (``deltatune.methods.tinylora``): the update against ``B (Σ v_i P_i) A`` from the weight's SVD written
out (Linear, Conv1D, Embedding), peft's projections, SVD factors and weight-tying groups bit for bit, saved factors
read back from a file, loads that never read uninitialised memory, mixed-adapter batches and the config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.layers import AdapterLayer
from deltatune.methods.tinylora import group_of
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_gpt2, tiny_mlp
from tests.peft_table import ROWS, build, inputs, make_config


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.c1d = Conv1D(4, 5)  # weight (in=5, out=4)
        self.emb = nn.Embedding(10, 3)


def _layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}


def test_update_is_b_r_a_from_the_svd_on_every_layer_type() -> None:
    model = dt.get_peft_model(_Net(), dt.TinyLoraConfig(target_modules=["lin", "c1d", "emb"], r=2, u=3,
                                                        init_weights="uniform", init_v_bound=1.0))
    layers = _layers(model)
    vectors = model.base_model.shared_state["default"].tinylora_v
    for index, (name, layer) in enumerate(layers.items()):
        delta, weight = layer.deltas["default"], layer.base_layer.weight.detach().clone()
        w = weight.T if name == "c1d" else weight  # (out, in) / (num, dim)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        a, b = s[:2].sqrt()[:, None] * vh[:2], u[:, :2] * s[:2].sqrt()
        torch.testing.assert_close(delta.tinylora_A, a)
        torch.testing.assert_close(delta.tinylora_B, b)
        p = torch.normal(0.0, 2 ** -0.5, (3, 2, 2), generator=torch.Generator().manual_seed(42 + index))
        assert torch.equal(delta.tinylora_P, p)
        v = vectors[str(index)].detach()
        core = v[0] * p[0] + v[1] * p[1] + v[2] * p[2]
        update = b @ core @ a
        with torch.no_grad():
            if name == "emb":
                ids = torch.tensor([[3, 9, 0]])
                torch.testing.assert_close(layer(ids), (weight + update)[ids], rtol=1e-5, atol=1e-6)
            else:
                x = torch.randn(4, w.shape[1])
                torch.testing.assert_close(layer(x), x @ (w + update).T + layer.base_layer.bias, rtol=1e-5,
                                           atol=1e-6)
            layer.merge(["default"])
            merged = (w + update).T if name == "c1d" else w + update
            torch.testing.assert_close(layer.base_layer.weight, merged, rtol=1e-5, atol=1e-6)
            layer.unmerge()
            torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("count, tying", [(7, 0.0), (7, 0.5), (8, 0.7), (5, 1.0), (12, 0.25)])
def test_weight_tying_groups_follow_peft(count: int, tying: float) -> None:
    groups = max(1, round(count * (1 - tying)))
    size = max(1, count // groups)
    assert [group_of(i, count, tying) for i in range(count)] == [min(i // size, groups - 1) for i in range(count)]


def test_groups_projections_and_factors_equal_peft_s() -> None:
    config = dict(target_modules=["c_attn", "c_fc", "c_proj"], r=3, u=4, weight_tying=0.5, projection_seed=9)
    ours = dt.get_peft_model(tiny_gpt2(), dt.TinyLoraConfig(**config))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.TinyLoraConfig(**config))
    layers = _layers(ours)
    assert len(layers) == 8
    for name, layer in layers.items():
        mine, peer = layer.deltas["default"], theirs.get_submodule(name)
        assert mine.group == peer._tinylora_v_key["default"]
        for key in ("tinylora_A", "tinylora_B", "tinylora_P"):
            assert torch.equal(getattr(mine, key), getattr(peer, key)["default"]), (name, key)
    assert len(ours.base_model.shared_state["default"].tinylora_v) == 4


def test_saved_svd_factors_are_read_back(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.TinyLoraConfig(target_modules=["c_attn"], u=4, init_weights="uniform",
                                                             init_v_bound=1.0))
    with torch.no_grad():
        for layer in _layers(model).values():
            layer.deltas["default"].tinylora_B.mul_(3.0)  # no longer the base weight's SVD
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    inputs = make_causal_lm_inputs(model)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)


def _poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every floating ``torch.empty`` with NaN, so that code reading uninitialised memory fails every time
    instead of whenever the allocator hands back NaN (which depends on the tests that ran before)."""
    empty = torch.empty

    def nan_empty(*args, **kwargs) -> torch.Tensor:
        tensor = empty(*args, **kwargs)
        if tensor.is_floating_point() and tensor.device.type != "meta":
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", nan_empty)


def test_peft_table_randomizes_tinylora_from_a_seed_not_uninitialised_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft 0.21.2 leaves ``v`` as ``torch.empty`` under ``init_weights=False``; the peft-table harness randomizes
    TinyLoRA rows with the seeded ``"uniform"`` init instead, else its oracle computed NaN whenever that memory held
    NaN (tests/test_peft_table.py's file exchange failed depending on test order). Both libraries then draw the
    same ``v`` from the same seed."""
    _poison_empty(monkeypatch)
    row = next(r for r in ROWS if r.config_name == "TinyLoraConfig")
    outputs = []
    for lib in (peft, dt):
        base = build(row.model_id)
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(lib.get_peft_model(base, make_config(lib, row, randomized=True)).eval()(**inputs()))
    assert torch.isfinite(outputs[0]).all()
    with torch.no_grad():
        assert (outputs[0] - build(row.model_id)(**inputs())).abs().max() > 1e-6  # randomized: not the base
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_load_after_load_uses_the_files_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load (after another, with uninitialised memory NaN) computes with the file's ``v``: each delta reads the
    model's own shared vectors, not the load's meta-device dry run's nor an earlier model's."""
    config = dt.TinyLoraConfig(target_modules=["lin0", "lin1"], u=4, weight_tying=0.5, init_weights="uniform",
                               init_v_bound=1.0)
    model = dt.get_peft_model(tiny_mlp(), config)
    model.save_pretrained(tmp_path)
    x = make_mlp_inputs()["x"]
    _poison_empty(monkeypatch)
    for _ in range(2):
        loaded = dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path)
        shared = loaded.base_model.shared_state["default"]
        assert all(layer.deltas["default"].shared is shared for layer in _layers(loaded).values())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_adapters_must_agree_on_save_projection() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.TinyLoraConfig(target_modules=["lin0"]))
    with pytest.raises(ConfigError, match="save_projection"):
        model.add_adapter("other", dt.TinyLoraConfig(target_modules=["lin1"], save_projection=False))
    assert "other" not in model.peft_config


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.TinyLoraConfig(target_modules=["lin0", "lin1"], u=4,
                                                            init_weights="uniform", init_v_bound=1.0))
    model.add_adapter("other", dt.TinyLoraConfig(target_modules=["lin1"], r=3, u=2, init_weights="uniform",
                                                 init_v_bound=1.0))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(u=0), "u must be a positive integer"),
        (dict(weight_tying=1.5), "weight_tying must be a number in"),
        (dict(projection_seed=1.5), "projection_seed must be an integer"),
        (dict(init_v_bound=float("inf")), "init_v_bound must be a finite number"),
        (dict(tinylora_dropout=1.0), "tinylora_dropout must be in"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(init_weights="gaussian"), "init_weights must be"),
        (dict(save_projection=None), "save_projection must be True or False"),
        (dict(exclude_modules=["q"]), "TinyLoraConfig has no exclude_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.TinyLoraConfig(**kwargs)

"""LoRA and its variants (``deltatune.methods.lora``): the math of each layer type and variant against hand-written
formulas, the init schemes, rank/alpha patterns, and the config's checks."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.layers import AdapterLayer, adapter_layers
from tests.adapter_utils import (
    assert_close_scaled,
    assert_mixed_batch_equals_each_row_alone,
    assert_same_state,
    logits,
    snapshot,
)
from tests.cases.lora import attention_inputs, attention_net, grouped_convnet, grouped_convnet_inputs
from tests.models import (
    CONVNET_SEQ_LEN,
    VOCAB_SIZE,
    make_causal_lm_inputs,
    make_convnet_inputs,
    make_mlp_inputs,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
)


def _convnet_args(batch: int = 2) -> dict[str, torch.Tensor]:
    inputs = make_convnet_inputs(batch)
    inputs.pop("labels")
    return inputs


def _layer(model: nn.Module, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return list(adapter_layers(model))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# --- the update on each layer type, against the paper's formula --------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, scaling",
    [(dict(r=4, lora_alpha=8), 8 / 4), (dict(r=4, lora_alpha=8, use_rslora=True), 8 / math.sqrt(4))],
    ids=["lora", "rslora"],
)
def test_linear_output_is_base_plus_scaled_low_rank_update(kwargs, scaling) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **kwargs))
    layer = _layer(model, "lin0")
    delta = layer.deltas["default"]
    x = make_mlp_inputs(3)["x"]
    base = layer.base_layer
    expected = F.linear(x, base.weight, base.bias) + scaling * (x @ delta.lora_A.weight.T @ delta.lora_B.weight.T)
    with torch.no_grad():
        _close(layer(x), expected)
    assert delta.scaling == pytest.approx(scaling)


def test_conv1d_of_gpt2_uses_the_transposed_weight_layout() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"], init_lora_weights=False, r=4))
    layer = _layer(model, "transformer.h.0.attn.c_attn")
    base, delta = layer.base_layer, layer.deltas["default"]
    assert isinstance(base, Conv1D)
    x = torch.randn(2, 5, base.weight.shape[0])
    update = delta.scaling * (x @ delta.lora_A.weight.T @ delta.lora_B.weight.T)
    with torch.no_grad():
        _close(layer(x), x @ base.weight + base.bias + update)
        # merging adds (BA)ᵀ to the (in, out) weight
        before = base.weight.clone()
        layer.merge(["default"])
        _close(base.weight, before + delta.scaling * (delta.lora_B.weight @ delta.lora_A.weight).T)


def test_conv2d_update_is_a_conv_then_a_pointwise_conv() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.LoraConfig(target_modules=["conv2d"], init_lora_weights=False, r=2))
    layer = _layer(model, "conv2d")
    base, delta = layer.base_layer, layer.deltas["default"]
    x = _convnet_args()["pixel_values"]
    a = F.conv2d(x, delta.lora_A.weight, padding=base.padding)
    expected = base(x) + delta.scaling * F.conv2d(a, delta.lora_B.weight)
    with torch.no_grad():
        _close(layer(x), expected)


def test_conv1d_update_and_merge_match_the_formula() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.LoraConfig(target_modules=["conv1d"], init_lora_weights=False, r=2))
    layer = _layer(model, "conv1d")
    base, delta = layer.base_layer, layer.deltas["default"]
    x = torch.randn(2, 8, CONVNET_SEQ_LEN)
    expected = base(x) + delta.scaling * F.conv1d(F.conv1d(x, delta.lora_A.weight, padding=1), delta.lora_B.weight)
    with torch.no_grad():
        _close(layer(x), expected)
        layer.merge(["default"])
        _close(layer(x), expected)


def test_embedding_update_looks_up_rows_of_a_transposed() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.LoraConfig(target_modules=["embed"], init_lora_weights=False, r=2))
    layer = _layer(model, "embed")
    base, delta = layer.base_layer, layer.deltas["default"]
    ids = torch.randint(0, VOCAB_SIZE, (2, CONVNET_SEQ_LEN))
    expected = base(ids) + delta.scaling * (delta.lora_embedding_A.T[ids] @ delta.lora_embedding_B.T)
    with torch.no_grad():
        _close(layer(ids), expected)
        layer.merge(["default"])
        _close(layer(ids), expected)


def _dora_weight(base: nn.Module, delta, weight: torch.Tensor) -> torch.Tensor:
    """DoRA §4.1: W' = m · (W₀ + sBA) / ‖W₀ + sBA‖ per output channel; ``weight`` is (out, in, ...)."""
    combined = weight + delta.scaling * delta.lora_weight()
    norm = combined.flatten(1).norm(dim=1)
    m = delta.lora_magnitude_vector.flatten()
    return (m / norm).view(-1, *[1] * (combined.ndim - 1)) * combined


def test_dora_linear_output_is_magnitude_times_normalised_direction() -> None:
    config = dt.LoraConfig(target_modules=["lin1"], init_lora_weights=False, use_dora=True)
    model = dt.get_peft_model(tiny_mlp(), config)
    layer = _layer(model, "lin1")
    base, delta = layer.base_layer, layer.deltas["default"]
    with torch.no_grad():
        delta.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, base.out_features))  # as if trained
    x = torch.randn(3, base.in_features)
    with torch.no_grad():
        _close(layer(x), F.linear(x, _dora_weight(base, delta, base.weight), base.bias))


def test_dora_magnitude_starts_at_the_weight_norm_so_dora_starts_as_lora() -> None:
    lora = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    dora = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin1"], init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(lora.base_model.model.lin1.deltas["default"], name).weight.copy_(
                getattr(dora.base_model.model.lin1.deltas["default"], name).weight
            )
    x = make_mlp_inputs()["x"]
    _close(logits(dora, {"x": x}), logits(lora, {"x": x}))


@pytest.mark.parametrize("target", ["conv2d", "conv1d"])
def test_dora_conv_matches_formula_and_stores_magnitude_in_peft_layout(target: str) -> None:
    config = dt.LoraConfig(target_modules=[target], init_lora_weights=False, use_dora=True, r=2)
    model = dt.get_peft_model(tiny_convnet(), config)
    layer = _layer(model, target)
    base, delta = layer.base_layer, layer.deltas["default"]
    # peft saves conv magnitudes as (1, out, 1, ...): the shape is part of the file format
    assert delta.lora_magnitude_vector.shape == (1, base.out_channels, *[1] * (base.weight.ndim - 2))
    with torch.no_grad():
        delta.lora_magnitude_vector.mul_(1.3)
    x = _convnet_args()["pixel_values"] if target == "conv2d" else torch.randn(2, 8, CONVNET_SEQ_LEN)
    expected = base._conv_forward(x, _dora_weight(base, delta, base.weight), base.bias)
    with torch.no_grad():
        _close(layer(x), expected)
        layer.merge(["default"])
        _close(layer(x), expected)


@pytest.mark.parametrize("target", ["lin0", "conv2d", "conv1d"])
def test_dora_merge_and_unmerge_round_trip(target: str) -> None:
    factory, args = (tiny_mlp, {"x": make_mlp_inputs()["x"]}) if target == "lin0" else (tiny_convnet, _convnet_args())
    config = dt.LoraConfig(target_modules=[target], init_lora_weights=False, use_dora=True, r=2)
    model = dt.get_peft_model(factory(), config)
    weight = _layer(model, target).base_layer.weight.detach().clone()
    unmerged = logits(model, args)
    model.merge_adapter()
    assert_close_scaled(logits(model, args), unmerged)
    model.unmerge_adapter()
    assert_close_scaled(logits(model, args), unmerged)
    torch.testing.assert_close(_layer(model, target).base_layer.weight, weight, rtol=1e-5, atol=1e-6)


def test_dora_on_an_embedding_rescales_each_embedding_dimension_and_merges() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.LoraConfig(target_modules=["embed"], use_dora=True, r=2,
                                                            init_lora_weights=False))
    layer = _layer(model, "embed")
    base, delta = layer.base_layer, layer.deltas["default"]
    with torch.no_grad():
        delta.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, base.embedding_dim))
    a, b = delta.lora_embedding_A, delta.lora_embedding_B  # (r, vocab), (dim, r)
    update = delta.scaling * (b @ a).T  # (vocab, dim)
    norm = (base.weight + update).norm(dim=0)  # (dim,): over the vocabulary, per embedding dimension (peft's)
    ids = torch.tensor([[1, 4, 7]])
    expected = delta.lora_magnitude_vector / norm * (base.weight + update)[ids]
    with torch.no_grad():
        _close(layer(ids), expected)
        model.merge_adapter()
        _close(layer(ids), expected)


# --- grouped convolutions: B is grouped (peft's layout), the update is not, so it never merges -----------------------

@pytest.mark.parametrize("target", ["conv2d", "conv1d"])
def test_grouped_conv_update_is_a_full_conv_then_a_grouped_pointwise_conv(target: str) -> None:
    model = dt.get_peft_model(grouped_convnet(), dt.LoraConfig(target_modules=[target], init_lora_weights=False, r=4))
    layer = _layer(model, target)
    base, delta = layer.base_layer, layer.deltas["default"]
    conv = F.conv2d if target == "conv2d" else F.conv1d
    assert delta.lora_B.weight.shape == (base.out_channels, 4 // base.groups, *[1] * (base.weight.ndim - 2))
    x = torch.randn(2, base.in_channels, *[6] * (base.weight.ndim - 2))
    a = conv(x, delta.lora_A.weight, padding=base.padding)  # (B, r, ...): A sees every input channel
    expected = base(x) + delta.scaling * conv(a, delta.lora_B.weight, groups=base.groups)
    with torch.no_grad():
        _close(layer(x), expected)
    assert (expected - base(x)).abs().max() > 1e-3


def test_dora_on_a_grouped_conv_rescales_the_grouped_update_by_peft_s_norm() -> None:
    model = dt.get_peft_model(grouped_convnet(), dt.LoraConfig(target_modules=["conv2d"], use_dora=True, r=4,
                                                               init_lora_weights=False))
    layer = _layer(model, "conv2d")
    base, delta = layer.base_layer, layer.deltas["default"]
    with torch.no_grad():
        delta.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, base.out_channels).view(1, -1, 1, 1))
    a, b = delta.lora_A.weight, delta.lora_B.weight  # (4, 4, 3, 3), (8, 2, 1, 1)
    stand_in = (b.reshape(-1, 4) @ a.reshape(4, -1)).reshape(base.weight.shape)  # peft's B·A for the norm
    norm = (base.weight + delta.scaling * stand_in).flatten(1).norm(dim=1)  # (8,)
    scale = (delta.lora_magnitude_vector.flatten() / norm).view(1, -1, 1, 1)
    x = torch.randn(2, 4, 6, 6)
    update = F.conv2d(F.conv2d(x, a, padding=1), b, groups=2)
    expected = scale * (F.conv2d(x, base.weight, padding=1, groups=2) + delta.scaling * update)
    expected = expected + base.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        _close(layer(x), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(r=3), "groups=2 needs a rank divisible by 2.*r=3"),
     (dict(r=4, rank_pattern={"conv1d": 2}), "conv1d.*groups=4 needs a rank divisible by 4.*r=2")],
    ids=["rank", "rank-pattern"],
)
def test_grouped_conv_configs_peft_cannot_run_are_refused_before_any_change(kwargs, message) -> None:
    model = grouped_convnet()
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match=message):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["head", "conv2d", "conv1d"], **kwargs))
    assert_same_state(before, model)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_merging_a_grouped_conv_adapter_is_refused_and_the_model_left_unchanged(merge: str) -> None:
    config = dt.LoraConfig(target_modules=["head", "conv2d"], init_lora_weights=False, r=2)
    model = dt.get_peft_model(grouped_convnet(), config)
    before, inputs = snapshot(model), grouped_convnet_inputs(model)
    expected = logits(model, inputs)
    with pytest.raises(dt.AdapterStateError, match="into conv2d: .*grouped convolution \\(groups=2\\)"):
        getattr(model, merge)()
    assert_same_state(before, model)  # "head", merged first in a naive loop, is untouched too
    assert not any(layer.merged_adapters for _, layer in _layers(model))
    _close(logits(model, inputs), expected)


def test_grouped_conv_adapters_mix_in_one_batch() -> None:
    config = dt.LoraConfig(target_modules=["conv2d", "conv1d"], init_lora_weights=False, r=4)
    model = dt.get_peft_model(grouped_convnet(), config)
    model.add_adapter("other", dt.LoraConfig(target_modules=["conv2d"], init_lora_weights=False, r=2))
    mixed = assert_mixed_batch_equals_each_row_alone(model, grouped_convnet_inputs(model, 3),
                                                     ["default", "other", "__base__"])
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3


# --- nn.MultiheadAttention: the in-projection and out_proj both get an update ----------------------------------------

def _reference_attention(model: nn.Module, adapters: list[str]) -> nn.Module:
    """A plain copy of the model's base with both attention weights set to ``W + scaling · B A`` of ``adapters``."""
    reference = attention_net(model.get_base_model().attn.batch_first)
    layer = _layer(model, "attn")
    with torch.no_grad():
        for name in adapters:
            delta = layer.deltas[name]
            reference.attn.in_proj_weight += delta.scaling * delta.lora_B.weight @ delta.lora_A.weight  # (3E, E)
            out = layer.base_layer.out_proj.deltas[name]
            reference.attn.out_proj.weight += out.scaling * out.lora_B.weight @ out.lora_A.weight  # (E, E)
    return reference


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_attention_output_is_attention_with_both_weights_updated(batch_first: bool) -> None:
    config = dt.LoraConfig(target_modules=["attn"], init_lora_weights=False, r=4, lora_alpha=6)
    model = dt.get_peft_model(attention_net(batch_first), config)
    model.add_adapter("second", dt.LoraConfig(target_modules=["attn"], init_lora_weights=False, r=2))
    model.set_adapter(["default", "second"])
    inputs = attention_inputs(model)
    expected = _reference_attention(model, ["default", "second"])(**inputs).detach()
    _close(logits(model, inputs), expected)
    assert (expected - attention_net(batch_first)(**inputs)).abs().max() > 1e-2
    delta = _layer(model, "attn").deltas["default"]
    assert (delta.lora_A.weight.shape, delta.lora_B.weight.shape) == ((4, 8), (24, 4))  # peft's in-projection layout


def test_attention_merge_equals_unmerged_and_unmerge_disable_and_unload_restore_the_base() -> None:
    model = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    inputs = attention_inputs(model)
    base_out, unmerged = attention_net()(**inputs).detach(), logits(model, inputs)
    base = attention_net().state_dict()
    model.merge_adapter()
    _close(logits(model, inputs), unmerged)
    with model.disable_adapter():  # unmerges both weights, the out_proj one too although out_proj never runs
        _close(logits(model, inputs), base_out)
    _close(logits(model, inputs), unmerged)
    model.unmerge_adapter()
    attn = model.get_base_model().attn.base_layer
    _close(attn.in_proj_weight, base["attn.in_proj_weight"])
    _close(attn.out_proj.weight, base["attn.out_proj.weight"])
    merged = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    merged.load_state_dict(model.state_dict())
    plain = merged.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj) is not AdapterLayer
    _close(plain(**inputs).detach(), unmerged)
    restored = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in restored.modules())
    assert list(restored.state_dict()) == list(base)  # the base model's own layout, up to unmerge rounding
    _close(restored(**inputs).detach(), base_out)


def test_attention_safe_merge_checks_the_in_projection_and_merges_like_a_plain_merge() -> None:
    """The attention delta merges into ``in_proj_weight`` (not ``weight``): the NaN check sees that tensor too."""
    plain = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    safe = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    safe.load_state_dict(plain.state_dict())
    plain.merge_adapter()
    safe.merge_adapter(safe_merge=True)
    assert_same_state(plain.state_dict(), safe)
    poisoned = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    with torch.no_grad():
        _layer(poisoned, "attn").deltas["default"].lora_B.weight[0, 0] = float("inf")
    before = snapshot(poisoned)
    with pytest.raises(dt.AdapterStateError, match="NaN/inf"):
        poisoned.merge_adapter(safe_merge=True)
    assert not any(layer.merged for _, layer in adapter_layers(poisoned))
    assert_same_state(before, poisoned)


def test_attention_gradients_reach_the_four_factors_only() -> None:
    model = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    model(**attention_inputs(model)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(n.removeprefix("base_model.model.attn.") for n in grads) == [
        "base_layer.out_proj.deltas.default.lora_A.weight", "base_layer.out_proj.deltas.default.lora_B.weight",
        "deltas.default.lora_A.weight", "deltas.default.lora_B.weight",
    ]
    assert all(g.abs().max() > 0 for g in grads.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * (8 + 8) + 8 * (8 + 24)  # r = 8: out_proj, in-projection


def test_attention_adapter_deletes_cleanly_and_refuses_mixed_batches() -> None:
    model = dt.get_peft_model(attention_net(), dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(target_modules=["attn"], init_lora_weights=False))
    inputs = attention_inputs(model)
    with pytest.raises(dt.AdapterStateError, match="mixed-adapter batches.*MultiheadAttention"):
        logits(model, inputs, adapter_names=["default", "other"])
    model.set_adapter("other")
    model.delete_adapter("default")  # both parts go: the in-projection's and the one around out_proj
    assert list(_layer(model, "attn").deltas) == list(_layer(model, "attn").base_layer.out_proj.deltas) == ["other"]
    _close(logits(model, inputs), _reference_attention(model, ["other"])(**inputs).detach())


@pytest.mark.parametrize(
    "attn, kwargs, message",
    [(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), {}, "separate q/k/v weights"),
     (nn.MultiheadAttention(8, 2), dict(use_dora=True), "DoRA is not supported on nn.MultiheadAttention"),
     (nn.MultiheadAttention(8, 2), dict(init_lora_weights="pissa"), "supports Linear and Conv1D layers only")],
    ids=["kdim", "dora", "pissa"],
)
def test_attention_configs_peft_cannot_run_are_refused_before_any_change(attn, kwargs, message) -> None:
    model = nn.Sequential(nn.Linear(8, 8), attn)
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match=message):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0", "1"], **kwargs))
    assert_same_state(before, model)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def _halve_peft_out_proj_b(model: nn.Module) -> None:
    """peft 0.21.2 adds the out_proj update twice in MultiheadAttention's forward (and merge): it writes
    ``W + ΔW`` into out_proj and then merges out_proj's LoRA on top (huggingface/peft#3774). Halving peft's
    out_proj ``B`` makes its forward compute the intended ``W + ΔW`` of the unhalved factors."""
    with torch.no_grad():
        model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.mul_(0.5)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_attention_adapters_interchange_with_peft(batch_first: bool, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    factory = functools.partial(attention_net, batch_first)
    config = dict(target_modules=["attn"], r=4, lora_alpha=8, init_lora_weights=False)
    ours = dt.get_peft_model(factory(), dt.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "theirs")
    our_file, their_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in our_file.items()} == {k: v.shape for k, v in their_file.items()}
    inputs = attention_inputs(ours)

    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")  # deltatune -> peft
    _halve_peft_out_proj_b(loaded)
    _close(logits(loaded, inputs), logits(ours, inputs))
    mine = dt.PeftModel.from_pretrained(factory(), tmp_path / "theirs")  # peft -> deltatune
    expected = logits(theirs, inputs)
    with pytest.raises(AssertionError):  # the double update is real: unhalved outputs differ
        _close(logits(mine, inputs), expected)
    _halve_peft_out_proj_b(theirs)
    _close(logits(mine, inputs), logits(theirs, inputs))
    assert (expected - factory()(**inputs)).abs().max() > 1e-2


# --- init schemes ------------------------------------------------------------------------------------------------

def test_default_init_has_zero_b_and_random_a_so_the_model_starts_as_the_base() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.LoraConfig(target_modules=["fc1", "conv2d", "embed"]))
    for name in ("fc1", "conv2d"):
        delta = _layer(model, name).deltas["default"]
        assert torch.count_nonzero(delta.lora_B.weight) == 0
        assert torch.count_nonzero(delta.lora_A.weight) == delta.lora_A.weight.numel()
    embed = _layer(model, "embed").deltas["default"]  # peft's convention for embeddings: A = 0, B random
    assert torch.count_nonzero(embed.lora_embedding_A) == 0
    assert torch.count_nonzero(embed.lora_embedding_B) == embed.lora_embedding_B.numel()
    args = _convnet_args()
    assert torch.equal(logits(model, args), tiny_convnet()(**args).detach())


def test_gaussian_init_draws_a_with_std_one_over_r() -> None:
    torch.manual_seed(0)
    config = dt.LoraConfig(target_modules="all-linear", init_lora_weights="gaussian", r=4)
    model = dt.get_peft_model(tiny_llama(), config)
    a = torch.cat([layer.deltas["default"].lora_A.weight.flatten() for _, layer in _layers(model)])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert all(torch.count_nonzero(l.deltas["default"].lora_B.weight) == 0 for _, l in _layers(model))


def test_init_false_makes_both_factors_random() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    delta = _layer(model, "lin0").deltas["default"]
    assert torch.count_nonzero(delta.lora_B.weight) == delta.lora_B.weight.numel()


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_pissa_and_olora_keep_the_initial_output_equal_to_the_base_output(init: str) -> None:
    inputs = make_causal_lm_inputs(tiny_llama())
    expected = logits(tiny_llama(), inputs)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    assert_close_scaled(logits(model, inputs), expected)
    # ...but unlike plain LoRA the adapter itself is not zero: it carries the weight's principal part
    assert all(torch.count_nonzero(l.deltas["default"].lora_B.weight) > 0 for _, l in _layers(model))


def test_pissa_adapter_holds_the_top_r_singular_part_and_the_base_keeps_the_residual() -> None:
    original = tiny_mlp().lin1.weight.detach().clone()
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin1"], init_lora_weights="pissa", r=4))
    layer = _layer(model, "lin1")
    delta = layer.deltas["default"]
    u, s, vh = torch.linalg.svd(original, full_matrices=False)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    _close(delta.scaling * delta.lora_weight().detach(), top)
    _close(layer.base_layer.weight.detach(), original - top)


def test_olora_a_and_b_come_from_a_qr_decomposition_of_the_weight() -> None:
    original = tiny_mlp().lin1.weight.detach().clone()
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin1"], init_lora_weights="olora", r=4))
    delta = _layer(model, "lin1").deltas["default"]
    q, _ = torch.linalg.qr(original)
    b = delta.lora_B.weight.detach() * math.sqrt(delta.scaling)
    _close(b.T @ b, torch.eye(4))  # orthonormal columns of Q
    _close(b, q[:, :4])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_init_on_an_unsupported_layer_leaves_every_earlier_layer_untouched(init: str) -> None:
    # The Linear comes first in model order; its PiSSA/OLoRA init would rewrite its weight before the embedding fails.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Embedding(10, 6))
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match=rf"1: init_lora_weights='{init}' supports Linear and Conv1D"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0", "1"], init_lora_weights=init, r=2))
    assert_same_state(before, model)
    assert isinstance(model[0], nn.Linear)


# --- rank / alpha patterns ---------------------------------------------------------------------------------------

def test_rank_and_alpha_patterns_override_r_and_alpha_per_module() -> None:
    config = dt.LoraConfig(
        target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
        rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 4},
    )
    model = dt.get_peft_model(tiny_llama(), config)
    q0 = _layer(model, "model.layers.0.self_attn.q_proj").deltas["default"]
    q1 = _layer(model, "model.layers.1.self_attn.q_proj").deltas["default"]
    v1 = _layer(model, "model.layers.1.self_attn.v_proj").deltas["default"]
    assert (q0.r, q0.lora_A.weight.shape[0], q0.scaling) == (2, 2, 16 / 2)
    assert (q1.r, q1.scaling) == (8, 16 / 8)
    assert (v1.r, v1.scaling) == (8, 4 / 8)


def test_pattern_keys_match_a_dotted_suffix_not_a_substring() -> None:
    config = dt.LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"proj": 2})
    model = dt.get_peft_model(tiny_llama(), config)
    assert {layer.deltas["default"].r for _, layer in _layers(model)} == {8}


# --- dropout -----------------------------------------------------------------------------------------------------

def test_dropout_applies_to_the_adapter_input_in_training_only() -> None:
    config = dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False, lora_dropout=0.5)
    model = dt.get_peft_model(tiny_mlp(), config)
    layer = _layer(model, "lin0")
    x = make_mlp_inputs(4)["x"]
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(0)
        a, b = layer(x), layer(x)
        assert not torch.equal(a, b)
        # the base path never sees dropout: the difference is all in the low-rank update, which has rank <= r
        assert torch.linalg.matrix_rank(a - b) <= layer.deltas["default"].r


# --- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(bias="some"), "bias must be"),
        (dict(init_lora_weights="kaiming"), "init_lora_weights='kaiming' is not supported"),
        (dict(init_lora_weights="pissa_niter_100000"), r"pissa_niter_N' with N <= 1024"),
        (dict(use_dora=True, init_lora_weights="pissa"), "use_dora cannot be combined"),
        (dict(layers_pattern="layers"), "layers_pattern only has an effect together with layers_to_transform"),
        (dict(task_type="CHAT"), "unknown task_type 'CHAT'"),
    ],
)
def test_invalid_config_values_raise_config_error(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(**kwargs)


def test_config_normalises_peft_spellings() -> None:
    config = dt.LoraConfig(target_modules={"v_proj", "q_proj"}, layers_to_transform=1, modules_to_save="lm_head",
                           task_type="CAUSAL_LM")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.layers_to_transform == [1]
    assert config.modules_to_save == ["lm_head"]
    assert config.task_type is dt.TaskType.CAUSAL_LM
    assert config.peft_type is dt.PeftType.LORA


def test_config_dict_round_trip_keeps_every_field() -> None:
    config = dt.LoraConfig(r=4, lora_alpha=32, use_rslora=True, target_modules=["q_proj"], rank_pattern={"q": 2},
                           task_type="CAUSAL_LM", bias="lora_only")
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert dt.PeftConfig.from_dict(data) == config


def test_adapter_weights_stay_float32_on_a_half_precision_base() -> None:
    model = tiny_mlp().to(torch.bfloat16)
    peft_model = dt.get_peft_model(model, dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    delta = _layer(peft_model, "lin0").deltas["default"]
    assert delta.lora_A.weight.dtype == torch.float32
    out = peft_model(make_mlp_inputs()["x"].to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


# --- lora_bias -------------------------------------------------------------------------------------------------------

_BIAS_TARGETS = ["linear", "conv1d_gpt2", "conv2d", "conv3d"]
_BIAS_INPUTS = {  # an input of each target's own shape
    "linear": (2, 6), "conv1d_gpt2": (2, 8), "conv2d": (2, 4, 2, 2), "conv3d": (2, 4, 1, 2, 2),
}


def test_lora_bias_adds_the_scaled_bias_of_b_on_every_layer_type() -> None:
    """``h = W x + b₀ + (α/r)·(B A x + b)`` on Linear, Conv1D, Conv2d and Conv3d against the formula per layer (for
    the convolutions, ``b`` broadcast over the spatial dims); a fresh adapter's bias is zero, so the model is the base,
    and ``init_lora_weights=False`` draws it."""
    from tests.cases.lora import bias_net, bias_net_inputs

    fresh = dt.get_peft_model(bias_net(), dt.LoraConfig(target_modules=_BIAS_TARGETS, r=2, lora_bias=True))
    inputs = bias_net_inputs(fresh)
    assert torch.equal(logits(fresh, inputs), bias_net()(**inputs))
    model = dt.get_peft_model(bias_net(), dt.LoraConfig(
        target_modules=_BIAS_TARGETS, r=2, lora_alpha=6, lora_bias=True, init_lora_weights=False,
    ))
    gen = torch.Generator().manual_seed(0)
    for name, layer in adapter_layers(model):
        leaf = name.rsplit(".", 1)[-1]
        delta, base = layer.deltas["default"], layer.base_layer
        x = torch.randn(_BIAS_INPUTS[leaf], generator=gen)
        a, b, bias = delta.lora_A.weight, delta.lora_B.weight, delta.lora_B.bias
        assert bias.abs().min() > 0
        if leaf in ("linear", "conv1d_gpt2"):
            update = x @ a.T @ b.T + bias
        else:
            ax = delta.lora_A(x)  # A keeps the base kernel; B is 1×…×1: a per-position (out, r) matmul
            update = torch.einsum("or,br...->bo...", b.flatten(1), ax) + bias.view(1, -1, *[1] * (x.ndim - 2))
        torch.testing.assert_close(layer(x), base(x) + 3.0 * update)


def test_lora_bias_merges_into_the_base_bias_as_peft_does_and_unmerges(tmp_path) -> None:
    import peft

    from tests.cases.lora import bias_net, bias_net_inputs

    model = dt.get_peft_model(bias_net(), dt.LoraConfig(
        target_modules=_BIAS_TARGETS, r=2, lora_bias=True, init_lora_weights=False,
    ))
    inputs = bias_net_inputs(model)
    expected, before = logits(model, inputs), snapshot(model)
    model.save_pretrained(tmp_path)
    model.merge_adapter()
    for name, layer in adapter_layers(model):
        delta = layer.deltas["default"]
        torch.testing.assert_close(
            layer.base_layer.bias, before[f"{name}.base_layer.bias"] + delta.scaling * delta.lora_B.bias
        )
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for key, value in snapshot(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(bias_net(), tmp_path).merge_and_unload().state_dict()
    mine = model.merge_and_unload().state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lora_bias_on_a_layer_without_a_bias_trains_but_refuses_to_merge() -> None:
    """As in peft: the adapter works unmerged; merging has no bias to fold ``b`` into and changes nothing."""
    from tests.cases.lora import bias_net, bias_net_inputs

    model = dt.get_peft_model(bias_net(), dt.LoraConfig(target_modules=["head", "linear"], lora_bias=True))
    before = snapshot(model)
    with pytest.raises(dt.AdapterStateError, match="lora_bias=True.*no bias"):
        model.merge_adapter()
    assert_same_state(before, model)
    assert logits(model, bias_net_inputs(model)).shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(use_dora=True), "lora_bias=True cannot be combined with use_dora=True"),
        (dict(init_lora_weights="gaussian"), "lora_bias=True supports init_lora_weights=True or False"),
        (dict(init_lora_weights="pissa"), "lora_bias=True supports init_lora_weights=True or False"),
    ],
)
def test_lora_bias_refuses_what_peft_refuses(kwargs, match) -> None:
    with pytest.raises(dt.ConfigError, match=match):
        dt.LoraConfig(lora_bias=True, **kwargs)


@pytest.mark.parametrize("target", ["embed", "attn"])
def test_lora_bias_refuses_embedding_and_multihead_attention(target) -> None:
    model = tiny_convnet() if target == "embed" else attention_net()
    with pytest.raises(dt.TargetError, match=f"{target}: lora_bias=True supports Linear, Conv1D and Conv layers"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=[target], lora_bias=True))


def test_lora_bias_keeps_mixed_batches_and_the_fused_path_for_plain_lora() -> None:
    """A lora_bias adapter next to a plain one in one mixed batch equals each row alone; the plain adapter still
    takes the gathered kernel, the lora_bias one the general path."""
    model = dt.get_peft_model(
        tiny_gpt2(), dt.LoraConfig(task_type="CAUSAL_LM", lora_bias=True, init_lora_weights=False)
    )
    model.add_adapter("plain", dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    layer = next(layer for _, layer in adapter_layers(model))
    assert not layer.deltas["default"].gatherable() and layer.deltas["plain"].gatherable()
    model.eval()
    assert_mixed_batch_equals_each_row_alone(
        model, make_causal_lm_inputs(model, 3), ["default", "plain", "__base__"]
    )


def test_combining_a_lora_bias_adapter_is_refused() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", lora_bias=True))
    with pytest.raises(dt.ConfigError, match="lora_bias=True"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


@pytest.mark.parametrize(
    "field, value",
    [("target_parameters", ["mlp.up_proj.weight"]), ("trainable_token_indices", [1]),
     ("layer_replication", [[0, 1]]), ("ensure_weight_tying", True)],
)
def test_adalora_refuses_the_lora_only_fields_by_name(field: str, value) -> None:
    with pytest.raises(dt.ConfigError, match=field):
        dt.AdaLoraConfig(total_step=10, **{field: value})

"""OFT (``deltatune.methods.oft``): the rotation against hand-written Cayley math on every layer type, merging, the
Conv2d kernel against peft's merged model, COFT, module dropout, the divisor rule, mixed-adapter batches and the
config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.oft.layer import OFTLayer
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer
from deltatune.methods.oft import nearest_divisor
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits, trainable_by_peft_name
from tests.cases import convnet_inputs
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_convnet, tiny_gpt2, tiny_llama, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's and our notes on adjusted block sizes


def _layer(model: dt.PeftModel, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# --- an independent construction of R -----------------------------------------------------------------------------

def _hand_rotation(packed: torch.Tensor, blocks: int, block_size: int, neumann_terms: int | None) -> torch.Tensor:
    """The ``(n·b, n·b)`` block-diagonal R, written out: fill each Q's upper triangle row by row, Q = U − Uᵀ, then the
    Cayley transform (exact inverse) or peft's series: ``I + 2Q`` for 2 terms, else ``I + 2Q + … + 2Qᵐ + Qᵐ⁺¹``."""
    eye = torch.eye(block_size, dtype=torch.float64)
    mats = []
    for row in packed.double():
        u = torch.zeros(block_size, block_size, dtype=torch.float64)
        k = 0
        for i in range(block_size):
            for j in range(i + 1, block_size):
                u[i, j] = row[k]
                k += 1
        q = u - u.T
        if neumann_terms is None:
            mats.append((eye - q) @ torch.linalg.inv(eye + q))
        elif neumann_terms == 2:
            mats.append(eye + 2 * q)
        else:
            m = max(2, neumann_terms - 2)
            mats.append(eye + sum(2 * torch.linalg.matrix_power(q, p) for p in range(1, m + 1))
                        + torch.linalg.matrix_power(q, m + 1))
    if len(mats) == 1:  # block_share
        mats = mats * blocks
    return torch.block_diag(*mats).float()


@pytest.mark.parametrize(
    "kwargs, terms, blocks, size",
    [(dict(oft_block_size=4), 5, 4, 4), (dict(oft_block_size=4, use_cayley_neumann=False), None, 4, 4),
     (dict(r=2, oft_block_size=0, num_cayley_neumann_terms=7), 7, 2, 8),
     (dict(oft_block_size=8, num_cayley_neumann_terms=2), 2, 2, 8),
     (dict(oft_block_size=8, block_share=True), 5, 2, 8)],
    ids=["neumann", "exact", "r-7-terms", "2-terms", "block-share"],
)
def test_linear_output_and_merged_weight_equal_the_hand_written_rotation(kwargs, terms, blocks, size) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin0"], init_weights=False, **kwargs))
    layer = _layer(model, "lin0")  # in_features 16
    base, delta = layer.base_layer, layer.deltas["default"]
    assert delta.oft_R.weight.shape == (1 if kwargs.get("block_share") else blocks, size * (size - 1) // 2)
    rot = _hand_rotation(delta.oft_R.weight.detach(), blocks, size, terms)  # (in, in)
    x = make_mlp_inputs(3)["x"]
    with torch.no_grad():
        _close(layer(x), F.linear(x @ rot, base.weight, base.bias))  # y = W (x R) + b
        expected_weight = base.weight @ rot.T  # W' = W Rᵀ
        before = base.weight.clone()
        layer.merge(["default"])
        _close(base.weight, expected_weight)
        layer.unmerge()
        _close(base.weight, before)
    assert not torch.allclose(expected_weight, before, atol=1e-3)


def test_exact_cayley_is_orthogonal_and_the_neumann_series_nearly() -> None:
    for terms in (None, 5):
        kwargs = dict(oft_block_size=8, use_cayley_neumann=terms is not None)
        model = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin1"], init_weights=False, **kwargs))
        with torch.no_grad():
            blocks = _layer(model, "lin1").deltas["default"].rotation()  # (n, b, b)
        gram = blocks @ blocks.transpose(1, 2)
        err = (gram - torch.eye(blocks.shape[-1])).abs().max().item()
        assert err < 1e-5 if terms is None else 1e-5 < err < 0.2


def test_conv2d_computes_with_the_rotated_kernel_and_keeps_the_base_at_init() -> None:
    inputs = convnet_inputs(tiny_convnet())
    base_logits = logits(tiny_convnet(), inputs)
    fresh = dt.get_peft_model(tiny_convnet(), dt.OFTConfig(target_modules=["conv2d"], oft_block_size=9))
    assert torch.equal(logits(fresh, inputs), base_logits)

    model = dt.get_peft_model(
        tiny_convnet(), dt.OFTConfig(target_modules=["conv2d"], oft_block_size=9, init_weights=False)
    )
    layer = _layer(model, "conv2d")
    base, delta = layer.base_layer, layer.deltas["default"]
    assert delta.oft_R.weight.shape == (3, 36)  # 3 channels · 3 · 3 = 27 = 3 blocks of 9
    rot = _hand_rotation(delta.oft_R.weight.detach(), 3, 9, 5)
    kernel = (base.weight.flatten(1) @ rot.T).view_as(base.weight)  # (out, C·kh·kw) rotated, C-major
    x = inputs["pixel_values"]
    with torch.no_grad():
        _close(layer(x), F.conv2d(x, kernel, base.bias, padding=1))
        layer.merge(["default"])
        _close(base.weight, kernel)


def test_conv2d_adapters_exchange_with_peft_and_equal_its_merged_model(tmp_path: Path) -> None:
    # peft 0.21.2 rotates unfolded 3×3 patches and folds them back by summation: its unmerged output differs from
    # its own merged kernel W Rᵀ (even for a fresh adapter). deltatune computes with W Rᵀ, so both exchanged files
    # must give peft's merged model.
    inputs = convnet_inputs(tiny_convnet())
    config = dict(target_modules=["conv2d", "fc1"], oft_block_size=9)
    theirs = peft.get_peft_model(tiny_convnet(), peft.OFTConfig(init_weights=False, **config))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.PeftModel.from_pretrained(tiny_convnet(), tmp_path / "theirs")
    their_unmerged = logits(theirs, inputs)
    their_merged = logits(theirs.merge_and_unload(), inputs)
    assert (their_unmerged - their_merged).abs().max() > 1e-3  # peft's own inconsistency, the reason for the above
    _close(logits(ours, inputs), their_merged)

    ours = dt.get_peft_model(tiny_convnet(), dt.OFTConfig(init_weights=False, **config))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_convnet(), tmp_path / "ours").merge_and_unload()
    _close(logits(theirs, inputs), logits(ours, inputs))


def test_embedding_rotates_each_looked_up_row_and_merges_as_w_r() -> None:
    model = dt.get_peft_model(tiny_convnet(), dt.OFTConfig(target_modules=["embed"], oft_block_size=4,
                                                           init_weights=False))
    layer = _layer(model, "embed")
    base, delta = layer.base_layer, layer.deltas["default"]
    assert not hasattr(delta, "oft_R") and delta.oft_embedding_R.weight.shape == (2, 6)
    rot = _hand_rotation(delta.oft_embedding_R.weight.detach(), 2, 4, 5)
    ids = convnet_inputs(tiny_convnet())["input_ids"]
    with torch.no_grad():
        _close(layer(ids), base.weight[ids] @ rot)
        expected_weight = base.weight @ rot  # W' = W R
        layer.merge(["default"])
        _close(base.weight, expected_weight)


def test_unmerge_uses_the_true_inverse_of_the_near_orthogonal_neumann_rotation() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.OFTConfig(task_type="CAUSAL_LM", init_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3)  # a large Q: the series is clearly not orthogonal here
    before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    model.merge_adapter()
    model.unmerge_adapter()
    for name, value in model.get_base_model().named_parameters():
        if name in before:
            torch.testing.assert_close(value, before[name], rtol=1e-4, atol=1e-5)


# --- COFT, module dropout, the divisor rule ------------------------------------------------------------------------

def test_coft_keeps_each_block_within_the_eps_ball_and_writes_the_projection_back() -> None:
    eps = 0.05
    model = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin0"], oft_block_size=4, coft=True, eps=eps,
                                                       init_weights=False))
    delta = _layer(model, "lin0").deltas["default"]
    packed = delta.oft_R.weight
    q_norms = packed.detach().norm(dim=1) * 2**0.5  # ‖Q‖_F of each block, Q = U − Uᵀ
    radius = eps / packed.shape[0] ** 0.5
    assert (q_norms > radius).all()
    with torch.no_grad():
        model(make_mlp_inputs(2)["x"])
    after = packed.detach().norm(dim=1) * 2**0.5
    torch.testing.assert_close(after, torch.full_like(after, radius))


def test_module_dropout_sets_that_fraction_of_blocks_to_identity_only_in_training() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin1"], oft_block_size=4, module_dropout=0.5,
                                                       init_weights=False))
    delta = _layer(model, "lin1").deltas["default"]  # 8 blocks
    eye = torch.eye(4)

    def identity_blocks() -> int:
        with torch.no_grad():
            return sum(torch.equal(b, eye) for b in delta.rotation(dropout=True))

    assert identity_blocks() == 0  # eval
    model.train()
    assert identity_blocks() == 4
    with torch.no_grad():
        assert sum(torch.equal(b, eye) for b in delta.rotation()) == 0  # merging never drops


@pytest.mark.parametrize("n", [6, 12, 30, 32, 64, 97])
def test_nearest_divisor_follows_peft(n: int) -> None:
    for wanted in range(1, n + 3):
        assert nearest_divisor(n, wanted) == OFTLayer.adjust_oft_parameters(None, n, wanted), (n, wanted)


def test_a_block_size_that_does_not_divide_is_moved_with_a_warning_naming_the_layer() -> None:
    with pytest.warns(UserWarning, match=r"lin0: oft_block_size=5 does not divide its dimension 16; using 4"):
        model = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin0"], oft_block_size=5))
    assert _layer(model, "lin0").deltas["default"].oft_R.weight.shape == (4, 6)


# --- training-related behaviour ------------------------------------------------------------------------------------

def test_bias_oft_only_trains_and_saves_the_biases_of_adapted_layers(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin0"], oft_block_size=4, bias="oft_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin0.base_layer.bias", "base_model.model.lin0.deltas.default.oft_R.weight"]
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.lin0.base_layer.bias", "base_model.model.lin0.oft_R.weight"
    }


def test_half_precision_base_keeps_float32_rotation_and_its_own_output_dtype() -> None:
    model = dt.get_peft_model(tiny_mlp().to(torch.bfloat16),
                              dt.OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=4, init_weights=False))
    delta = _layer(model, "lin0").deltas["default"]
    assert delta.oft_R.weight.dtype == torch.float32
    x = make_mlp_inputs(2)["x"]
    reference = dt.get_peft_model(tiny_mlp(), dt.OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=4))
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    out = logits(model, {"x": x.to(torch.bfloat16)})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), logits(reference, {"x": x}), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs", [dict(coft=True, eps=0.5, r=4, oft_block_size=0),
                                    dict(use_cayley_neumann=False, oft_block_size=8)], ids=["coft", "exact"])
def test_training_loss_gradients_and_coft_projection_equal_peft(kwargs, tmp_path: Path) -> None:
    ours = dt.get_peft_model(tiny_llama(), dt.OFTConfig(task_type="CAUSAL_LM", init_weights=False, **kwargs))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    batch = make_causal_lm_inputs(ours)
    losses = []
    for model in (ours, theirs):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss)
    _close(losses[0], losses[1])
    mine, peft_params = trainable_by_peft_name(ours), trainable_by_peft_name(theirs)
    assert mine.keys() == peft_params.keys() and mine
    for name, param in mine.items():
        _close(param.grad, peft_params[name].grad)
        _close(param.detach(), peft_params[name].detach())  # COFT wrote the same projection back


# --- mixed-adapter batches -----------------------------------------------------------------------------------------

def test_mixed_adapter_batch_equals_each_row_alone_on_linear_layers() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.OFTConfig(task_type="CAUSAL_LM", init_weights=False))
    model.add_adapter("b", dt.OFTConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], r=4,
                                        oft_block_size=0, use_cayley_neumann=False, init_weights=False))
    names = ["b", "__base__", "default", "b"]
    inputs = make_causal_lm_inputs(model, batch=len(names))
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, names, rel=1e-5)


def test_mixed_adapter_batch_equals_each_row_alone_on_conv_embedding_and_linear() -> None:
    targets = dict(target_modules=["conv2d", "embed", "fc1"], init_weights=False)
    model = dt.get_peft_model(tiny_convnet(), dt.OFTConfig(oft_block_size=9, **targets))
    model.add_adapter("b", dt.OFTConfig(r=2, oft_block_size=0, block_share=True, **targets))
    names = ["default", "b", "__base__"]
    inputs = convnet_inputs(tiny_convnet(), batch=len(names))
    assert_mixed_batch_equals_each_row_alone(model, inputs, names, rel=1e-5)


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=4), r"exactly one of r=4 and oft_block_size=32.*OFTConfig\(r=8, oft_block_size=0\)"),
        (dict(oft_block_size=0), r"exactly one of r=0 and oft_block_size=0"),
        (dict(oft_block_size=-4), r"oft_block_size must be a non-negative integer"),
        (dict(module_dropout=1.0), r"module_dropout must be in \[0, 1\)"),
        (dict(bias="lora_only"), r"bias must be 'none', 'all' or 'oft_only'"),
        (dict(init_weights="gaussian"), r"init_weights must be True \(identity\) or False"),
        (dict(coft=True, eps=0.0), r"eps must be positive with coft=True"),
        (dict(num_cayley_neumann_terms=1), r"num_cayley_neumann_terms must be an integer in \[2, 1024\]"),
        (dict(num_cayley_neumann_terms=10**9), r"num_cayley_neumann_terms must be an integer in \[2, 1024\]"),
    ],
)
def test_config_errors_say_what_to_change(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.OFTConfig(**kwargs)


def test_a_peft_config_file_reads_back_with_every_field(tmp_path: Path) -> None:
    config = peft.OFTConfig(r=4, oft_block_size=0, coft=True, eps=1e-3, block_share=True, module_dropout=0.1,
                            use_cayley_neumann=False, num_cayley_neumann_terms=3, bias="oft_only",
                            target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    ours = dt.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ours, dt.OFTConfig)
    for name in ("r", "oft_block_size", "coft", "eps", "block_share", "module_dropout", "use_cayley_neumann",
                 "num_cayley_neumann_terms", "bias"):
        assert getattr(ours, name) == getattr(config, name), name


def test_gpt2_conv1d_and_grouped_convolutions_are_refused_before_the_model_changes() -> None:
    model = tiny_gpt2()
    with pytest.raises(dt.TargetError, match=r"c_attn' is a Conv1D, which OFT cannot adapt.*Narrow target_modules"):
        dt.get_peft_model(model, dt.OFTConfig(task_type="CAUSAL_LM"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())

    convnet = tiny_convnet()
    convnet.conv2d = nn.Conv2d(4, 8, kernel_size=3, groups=2)
    with pytest.raises(dt.TargetError, match=r"conv2d: OFT cannot adapt a grouped convolution \(groups=2\)"):
        dt.get_peft_model(convnet, dt.OFTConfig(target_modules=["conv2d", "fc1"], oft_block_size=2))
    assert not any(isinstance(m, AdapterLayer) for m in convnet.modules())

"""FRoD (``deltatune.methods.frod``): categories, block indices, joint bases and sparse positions equal to peft's; the
adapted weight against ``U (diag(λ) + S) Vᵀ`` written out entry by entry; merging several adapters from the weight
before any merge; regenerated projections; corrupt files; mixed-adapter batches and the config's checks."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.frod.model import _category_from_key, _layer_index_from_key, _projection_from_weights
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError, TargetError
from deltatune.layers import AdapterLayer
from deltatune.methods.frod import block_of, category_of, factor_weight, joint_basis, sparse_positions
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone
from tests.models import make_mlp_inputs, tiny_bert, tiny_llama, tiny_mlp

_MLP = dict(target_modules=["lin0", "lin1", "head"], progressbar=False)


def _layer(model, name: str) -> AdapterLayer:
    layer = model.get_base_model().get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


def test_categories_and_block_indices_are_peft_s() -> None:
    names = [n for n, _ in tiny_llama().named_modules()] + [n for n, _ in tiny_bert().named_modules()] + [
        "lin0", "encoder.block.1.layer.0.SelfAttention.q", "model.layers.x.q_proj", "h.3.attn.c_attn"]
    for position, name in enumerate(n for n in names if n):
        assert category_of(name) == _category_from_key(name), name
        assert block_of(name, position) == _layer_index_from_key(name, position), name
    assert category_of("bert.encoder.layer.0.attention.output.dense") == "attention_output"


@pytest.mark.parametrize("shapes", [[(32, 16)], [(8, 16), (8, 16), (4, 16)], [(3, 32)], [(20, 12), (20, 12)]])
@pytest.mark.parametrize("alpha", [1e-3, 0.5])
def test_joint_basis_is_peft_s_and_factors_every_weight(shapes, alpha: float) -> None:
    gen = torch.Generator().manual_seed(len(shapes))
    weights = [torch.randn(shape, generator=gen) for shape in shapes]
    v = joint_basis(weights, alpha)
    assert torch.equal(v, _projection_from_weights(weights, alpha))
    for w in weights:  # W = U diag(λ) Vᵀ with unit (or zero) columns of U
        u, lam = factor_weight(w, v)
        torch.testing.assert_close(u @ torch.diag(lam) @ v.T, w, rtol=1e-4, atol=1e-5)
        norms = u.norm(dim=0)
        assert torch.allclose(norms[lam > 1e-6], torch.ones(()), atol=1e-5)


def test_sparse_positions_are_peft_s_draws_from_one_generator() -> None:
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for dim, rate in [(16, 0.01), (7, 0.5), (1, 0.3), (5, 1.0), (9, 0.0), (33, 0.05)]:
        positions = sparse_positions(dim, rate, ours)
        # peft's construction written out: every off-diagonal (row, col) in row-major order, a prefix of a randperm
        pairs = [(i, j) for i in range(dim) for j in range(dim) if i != j]
        nnz = min(int(dim * dim * rate), len(pairs))
        nnz = max(1, nnz) if rate > 0 and pairs else nnz
        expected = torch.tensor([pairs[p] for p in torch.randperm(len(pairs), generator=theirs)[:nnz].tolist()]
                                ).reshape(-1, 2).T if nnz else torch.empty(2, 0, dtype=torch.long)
        assert torch.equal(positions, expected), (dim, rate)
        assert bool((positions[0] != positions[1]).all())


def test_adapted_weight_and_output_against_the_formula_written_out() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP, sparse_rate=0.1, init_weights=False))
    shared = model.base_model.shared_state["default"]
    layer = _layer(model, "lin1")
    delta = layer.deltas["default"]
    w0 = layer.base_layer.weight.detach().clone()
    v = shared.frod_V.lin1
    u, lam = factor_weight(w0, v)
    assert torch.equal(delta.frod_U, u)  # U is fixed; λ moved by the test init
    core = torch.diag(delta.frod_lambda_l.detach())
    for (i, j), value in zip(shared.frod_s_indices.lin1.T.tolist(), delta.frod_lambda_s_values.detach().tolist()):
        core[i, j] += value
    adapted = u @ core @ v.T
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ adapted.T + layer.base_layer.bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta.delta_weight(layer.base_layer), adapted - w0, rtol=1e-5, atol=1e-6)


def test_two_merged_adapters_each_add_their_weight_less_the_original_and_unmerge_restores_it() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP, init_weights=False))
    model.add_adapter("other", dt.FrodConfig(**_MLP, sparse_rate=0.2, projection_prng_key=4, init_weights=False))
    layer = _layer(model, "lin0")
    w0 = layer.base_layer.weight.detach().clone()
    adapted = {n: layer.deltas[n].adapted_weight().detach() for n in ("default", "other")}
    model.merge_adapter(["default", "other"])
    # as peft: W0 + (W'_default - W0) + (W'_other - W0)
    torch.testing.assert_close(layer.base_layer.weight, adapted["default"] + adapted["other"] - w0,
                               rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("save_projection", [True, False])
def test_reload_gives_the_same_outputs_with_saved_or_regenerated_projections(tmp_path: Path,
                                                                            save_projection: bool) -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP, save_projection=save_projection,
                                                        projection_prng_key=11, init_weights=False))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    projection_keys = {k for k in saved if k.startswith("base_model.frod_")}
    assert len(projection_keys) == (9 if save_projection else 0)  # V, positions, size for lin0, lin1, head
    assert saved["base_model.model.lin1.frod_lambda_s_values"].numel() == 10  # ⌊32² · 0.01⌋
    loaded = dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    x = make_mlp_inputs(batch=4)["x"]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_saved_positions_outside_the_layer_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP)).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    saved = load_file(file)
    saved["base_model.frod_s_indices.lin1"][0, 0] = 32
    save_file(saved, file)
    base = tiny_mlp()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="frod_s_indices.lin1 must hold integer positions in"):
        dt.PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_file_without_the_projections_its_config_says_it_saves_is_refused(tmp_path: Path) -> None:
    dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP)).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not k.startswith("base_model.frod_")}, file)
    with pytest.raises(AdapterLoadError, match="the file lacks 'base_model.frod_"):
        dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path)


def test_mixed_adapter_batch_equals_each_row_alone() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP, init_weights=False))
    model.add_adapter("other", dt.FrodConfig(target_modules=["lin1"], sparse_rate=0.3, init_weights=False,
                                             progressbar=False))
    inputs = make_mlp_inputs(batch=6)
    inputs.pop("labels")
    assert_mixed_batch_equals_each_row_alone(model, inputs, ["default", "__base__", "other"])


def test_trainable_parameters_are_lambda_and_the_sparse_values_as_in_peft() -> None:
    ours = dt.get_peft_model(tiny_mlp(), dt.FrodConfig(**_MLP, sparse_rate=0.05))
    theirs = peft.get_peft_model(tiny_mlp(), peft.FrodConfig(**_MLP, sparse_rate=0.05))
    names = sorted(n.removesuffix(".default").replace(".deltas.default", "") for n, p in ours.named_parameters()
                   if p.requires_grad)
    assert names == sorted(n.removesuffix(".default") for n, p in theirs.named_parameters() if p.requires_grad)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparse_rate=1.5), "sparse_rate must be a number in"),
        (dict(sparse_rate=-0.1), "sparse_rate must be a number in"),
        (dict(regularization_alpha=-1.0), "regularization_alpha must be >= 0"),
        (dict(regularization_alpha=float("nan")), "regularization_alpha must be a finite number"),
        (dict(projection_prng_key=2**64), "projection_prng_key must be an integer"),
        (dict(frod_dropout=1.0), "frod_dropout must be in"),
        (dict(bias="lora_only"), "bias must be"),
        (dict(save_projection="yes"), "save_projection must be True or False"),
        (dict(runtime_offload_base_weight=True), "runtime_offload_base_weight=True is not supported"),
        (dict(exclude_modules=["q"]), "FrodConfig has no exclude_modules"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dt.FrodConfig(**kwargs)


class _Blocks(torch.nn.Module):
    """Two blocks whose ``proj`` (one FRoD category) differ in input width."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [torch.nn.ModuleDict({"proj": torch.nn.Linear(width, 8)}) for width in (16, 8)])


def test_targets_of_one_category_with_different_input_widths_are_refused_before_the_model_changes() -> None:
    model = _Blocks()
    with pytest.raises(TargetError, match="share FRoD's basis .category 'proj'. but have 8 and 16 input features"):
        dt.get_peft_model(model, dt.FrodConfig(target_modules=["proj"], progressbar=False))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())

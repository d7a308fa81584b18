"""LoRA's data-driven and structured inits (``deltatune.methods.lora_init``): each against peft 0.21.2 given the same
seed / data, or against the property its paper states computed independently; configs against peft's files; the
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from tests.adapter_utils import assert_same_state, snapshot
from tests.models import make_causal_lm_inputs, make_mlp_inputs, tiny_gpt2, tiny_llama, tiny_mlp

peft = pytest.importorskip("peft")


def _delta(model: nn.Module, name: str, adapter: str = "default") -> nn.Module:
    return model.get_base_model().get_submodule(name).deltas[adapter]


def _peft_layer(model: nn.Module, name: str) -> nn.Module:
    return model.base_model.model.get_submodule(name)


def _burn_linear_inits(*shapes: tuple[int, int]) -> None:
    """peft builds lora_A / lora_B as nn.Linear (a Kaiming draw each) before its init; deltatune builds them on the
    meta device. Drawing as many uniforms puts the global generator where peft's init starts."""
    for shape in shapes:
        torch.empty(shape).uniform_()


def _x(batch: int = 4) -> torch.Tensor:
    return make_mlp_inputs(batch)["x"]


# --- orthogonal ----------------------------------------------------------------------------------------------------

def test_orthogonal_init_equals_peft_for_the_same_seed_and_starts_at_the_base() -> None:
    theirs, ours = tiny_mlp(), tiny_mlp()  # (each seeds the generator itself)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(target_modules=["lin1"], r=4, init_lora_weights="orthogonal"))
    torch.manual_seed(3)
    _burn_linear_inits((4, 32), (32, 4))
    ours = dt.get_peft_model(ours, dt.LoraConfig(target_modules=["lin1"], r=4, init_lora_weights="orthogonal"))
    delta, layer = _delta(ours, "lin1"), _peft_layer(theirs, "lin1")
    torch.testing.assert_close(delta.lora_A.weight, layer.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(delta.lora_B.weight, layer.lora_B["default"].weight, rtol=0, atol=0)
    # B A = 0 because B uses the even rows and A the odd rows of one orthogonal matrix, though neither is zero
    a, b = delta.lora_A.weight.detach(), delta.lora_B.weight.detach()
    assert a.abs().min() > 0 and b.abs().min() > 0
    assert (b @ a).abs().max() < 1e-6
    torch.testing.assert_close(ours(_x()), tiny_mlp()(_x()), rtol=0, atol=1e-6)


# --- MiCA ----------------------------------------------------------------------------------------------------------

def test_mica_b_is_the_minor_left_singular_vectors_frozen_and_equals_peft(tmp_path: Path) -> None:
    model = tiny_llama()
    config = dict(target_modules=["q_proj", "embed_tokens"], r=4, init_lora_weights="mica")
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    q = "model.layers.0.self_attn.q_proj"
    u = torch.linalg.svd(model.get_submodule(q).weight.detach(), full_matrices=False)[0]
    delta = _delta(ours, q)
    torch.testing.assert_close(delta.lora_B.weight.detach(), u[:, -4:])  # the smallest singular values' directions
    assert not delta.lora_A.weight.any() and delta.lora_A.weight.requires_grad
    assert not delta.lora_B.weight.requires_grad
    embed = _delta(ours, "model.embed_tokens")
    assert not embed.lora_embedding_B.requires_grad and embed.lora_embedding_A.requires_grad
    ours_state = dt.get_peft_model_state_dict(ours)
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value)
    # files interchange: peft's trained file loads here with B still frozen
    with torch.no_grad():
        _peft_layer(theirs, q).lora_A["default"].weight.normal_()
    theirs.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    inputs = make_causal_lm_inputs(model)
    inputs.pop("labels")
    torch.testing.assert_close(loaded(**inputs).logits, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert not _delta(loaded, q).lora_B.weight.requires_grad


# --- configs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(init_lora_weights="orthogonal"),
    dict(init_lora_weights="mica"),
    dict(init_lora_weights="corda"),
    dict(init_lora_weights="corda", corda_config={"corda_method": "kpm", "cache_file": "c.pt"}),
    dict(init_lora_weights="lora_ga", lora_ga_config={"direction": "ArBr", "scale": "gd_scale"}),
    dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 3}),
    dict(init_lora_weights="eva", eva_config={"rho": 1.5, "whiten": True}),
], ids=["orthogonal", "mica", "corda", "corda-kpm", "lora_ga", "loftq", "eva"])
def test_config_writes_what_peft_writes_and_reads_peft_s_file(kwargs, tmp_path: Path) -> None:
    theirs = peft.LoraConfig(target_modules=["q_proj"], **kwargs)
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = dt.LoraConfig.from_pretrained(tmp_path)
    mine = ours.to_dict()
    for key in ("init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config"):
        assert mine[key] == written[key], key
    assert dt.LoraConfig.from_dict(json.loads(ours.to_json_string())) == ours


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_lora_weights="orthogonal", r=3), r"even ranks .*\[3\]"),
    (dict(init_lora_weights="orthogonal", rank_pattern={"lin0": 5}), r"even ranks .*\[5\]"),
    (dict(init_lora_weights="loftq"), "needs loftq_config"),
    (dict(init_lora_weights="gaussian", loftq_config={"loftq_bits": 4}), "loftq_config is set but init_lora_weights="),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 3}), "loftq_bits must be 4 or 8"),
    (dict(init_lora_weights="loftq", loftq_config={"bits": 4}), r"unknown fields \['bits'\]"),
    (dict(init_lora_weights="lora_ga"), "needs lora_ga_config"),
    (dict(init_lora_weights="pissa", corda_config={}), "corda_config is set but init_lora_weights='pissa'"),
    (dict(init_lora_weights="corda", corda_config={"corda_method": "xyz"}), "corda_method must be 'ipm' or 'kpm'"),
    (dict(init_lora_weights="mica", use_dora=True), "use_dora cannot be combined"),
    (dict(init_lora_weights="mica", kasa_config={}), "'mica' cannot be combined with kasa_config"),
    (dict(init_lora_weights="mica", eva_config={"rho": 2.0}), "eva_config is set but init_lora_weights='mica'"),
    (dict(init_lora_weights="eva", eva_config={"rho": 0.5}), "rho must be >= 1.0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_field_combinations_are_refused_by_name(kwargs, message) -> None:
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(target_modules=["lin0"], **kwargs)


@pytest.mark.parametrize("init, target, message", [
    ("orthogonal", "embed_tokens", "supports Linear and Conv1D layers only"),
    ("mica", "model.norm", "cannot adapt"),
    ("corda", "q_proj", r"needs the calibration data of preprocess_corda"),
    ("lora_ga", "q_proj", r"needs the calibration data of preprocess_loraga"),
])
def test_targets_a_scheme_cannot_initialise_are_refused_before_any_change(init, target, message) -> None:
    model = tiny_llama()
    before = snapshot(model)
    extra = {"lora_ga_config": dt.LoraGAConfig()} if init == "lora_ga" else {}
    with pytest.raises(dt.TargetError, match=message):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["v_proj", target], r=4, init_lora_weights=init,
                                               **extra))
    assert_same_state(before, model)


def test_mica_rank_above_the_weight_s_smaller_side_is_refused() -> None:
    with pytest.raises(dt.TargetError, match=r"MiCA needs r <= 3"):
        dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["head"], r=4, init_lora_weights="mica"))


# --- CorDA ---------------------------------------------------------------------------------------------------------

def _calibration(model: nn.Module, batches: int = 3) -> list[torch.Tensor]:
    """Batch-1 token sequences (peft's CorDA hook reads one sequence per call)."""
    ids = make_causal_lm_inputs(model, batch=batches, seq=12, seed=5)["input_ids"]
    return [row[None] for row in ids]


def _run(model: nn.Module, data: list[torch.Tensor]):
    def run_model() -> None:
        for ids in data:
            model(input_ids=ids)
    return run_model


def _peft_preprocess_corda():
    """peft's preprocess_corda; its module imports ``attr.dataclass`` (the attrs package, absent here) for a plain
    record of three tensors, which the standard dataclass stands in for."""
    import dataclasses
    import sys
    import types

    sys.modules.setdefault("attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft_for_the_same_calibration_data_and_starts_at_the_base(method: str) -> None:
    kwargs = dict(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights="corda")
    data = _calibration(tiny_llama())
    theirs_base, ours_base = tiny_llama(), tiny_llama()
    theirs_config = peft.LoraConfig(**kwargs, corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
    peft_preprocess_corda = _peft_preprocess_corda()

    peft_preprocess_corda(theirs_base, theirs_config, run_model=_run(theirs_base, data))
    theirs = peft.get_peft_model(theirs_base, theirs_config)
    config = dt.LoraConfig(**kwargs, corda_config=dt.CordaConfig(corda_method=method))
    dt.preprocess_corda(ours_base, config, run_model=_run(ours_base, data))
    ours = dt.get_peft_model(ours_base, config)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        delta, layer = _delta(ours, name), _peft_layer(theirs, name)
        torch.testing.assert_close(delta.lora_A.weight, layer.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(delta.lora_B.weight, layer.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.get_base_model().get_submodule(name).base_layer.weight,
                                   layer.base_layer.weight, rtol=1e-4, atol=1e-6)
    inputs = {"input_ids": data[0]}
    torch.testing.assert_close(ours(**inputs).logits, tiny_llama()(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_corda_takes_the_top_or_bottom_components_of_w_times_the_input_covariance(tmp_path: Path) -> None:
    """The decomposition written out: C = mean of X̂ᵀX̂ (X̂ = X / |max X| per call), W (C + λI) = U S Vh with the first
    λ that inverts accurately, and the adapter holds U_r S_r (Vh_r (C + λI)⁻¹) at the start."""
    model = tiny_mlp()
    xs = [_x(8) * (i + 1) for i in range(2)]
    cov = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in xs) / 2  # lin0's inputs
    damped = cov + torch.eye(16) * cov.diagonal().mean() * 0.01
    assert torch.dist(damped @ torch.linalg.inv(damped), torch.eye(16)) < 0.05  # λ = 1% suffices here
    u, s, vh = torch.linalg.svd(model.lin0.weight.detach() @ damped, full_matrices=False)
    top = u[:, :4] @ torch.diag(s[:4]) @ (vh[:4] @ torch.linalg.inv(damped))
    config = dt.LoraConfig(target_modules=["lin0"], r=4, init_lora_weights="corda",
                           corda_config=dt.CordaConfig(cache_file=str(tmp_path / "cache.pt")))

    def run_model() -> None:
        for x in xs:
            model(x)

    dt.preprocess_corda(model, config, run_model)
    ours = dt.get_peft_model(model, config)
    delta = _delta(ours, "lin0")
    torch.testing.assert_close(delta.scaling * delta.lora_weight().detach(), top, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.get_base_model().lin0.base_layer.weight.detach(), tiny_mlp().lin0.weight - top,
                               rtol=1e-4, atol=1e-5)
    # the cache (peft's keys) serves a second model without a calibration run
    again = tiny_mlp()
    dt.preprocess_corda(again, config)
    torch.testing.assert_close(_delta(dt.get_peft_model(again, config), "lin0").lora_A.weight, delta.lora_A.weight)
    assert set(torch.load(tmp_path / "cache.pt", weights_only=True)) == {f"lin0.eigens.{k}_WC" for k in "USV"}


def test_corda_without_calibration_data_or_run_is_refused() -> None:
    config = dt.LoraConfig(target_modules=["lin0"], r=4, init_lora_weights="corda")
    with pytest.raises(dt.ConfigError, match="needs run_model"):
        dt.preprocess_corda(tiny_mlp(), config)
    with pytest.raises(dt.ConfigError, match="init_lora_weights='corda'"):
        dt.preprocess_corda(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"]), run_model=lambda: None)


# --- LoRA-GA -------------------------------------------------------------------------------------------------------

def _train_step(model: nn.Module):
    def step() -> None:
        for seed in range(2):
            model(_x(8) + seed).pow(2).mean().backward()
    return step


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), ("ArBr", "gd_scale"), ("A2rBr", "unit")])
def test_lora_ga_equals_peft_for_the_same_gradients_and_seed(direction: str, scale: str) -> None:
    kwargs = dict(target_modules=["lin1"], r=4, lora_alpha=8, init_lora_weights="lora_ga")
    theirs_base, ours_base = tiny_mlp(), tiny_mlp()
    theirs_config = peft.LoraConfig(**kwargs, lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))
    peft.preprocess_loraga(theirs_base, theirs_config, _train_step(theirs_base))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(theirs_base, theirs_config)
    config = dt.LoraConfig(**kwargs, lora_ga_config=dt.LoraGAConfig(direction=direction, scale=scale))
    dt.preprocess_loraga(ours_base, config, _train_step(ours_base))
    assert all(p.grad is None for p in ours_base.parameters())  # the estimate leaves no gradients behind
    torch.manual_seed(11)
    _burn_linear_inits((4, 32), (32, 4))
    ours = dt.get_peft_model(ours_base, config)
    delta, layer = _delta(ours, "lin1"), _peft_layer(theirs, "lin1")
    torch.testing.assert_close(delta.lora_A.weight, layer.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(delta.lora_B.weight, layer.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.get_base_model().lin1.base_layer.weight, layer.base_layer.weight)
    torch.testing.assert_close(ours(_x()), tiny_mlp()(_x()), rtol=1e-5, atol=1e-6)


def test_lora_ga_a_spans_the_top_right_singular_vectors_of_the_averaged_gradient() -> None:
    model = tiny_mlp()
    _train_step(model)()
    grad = model.lin1.weight.grad / 2  # two backward passes through lin1
    vh = torch.linalg.svd(grad, full_matrices=False)[2]
    model = tiny_mlp()
    config = dt.LoraConfig(target_modules=["lin1"], r=4, init_lora_weights="lora_ga", lora_ga_config=dt.LoraGAConfig())
    dt.preprocess_loraga(model, config, _train_step(model))
    a = _delta(dt.get_peft_model(model, config), "lin1").lora_A.weight.detach()
    torch.testing.assert_close(a @ a.T, torch.eye(4), rtol=1e-4, atol=1e-4)  # orthonormal rows...
    torch.testing.assert_close(a.T @ a, vh[:4].T @ vh[:4], rtol=1e-3, atol=1e-3)  # ...spanning the top 4 directions


# --- LoftQ ---------------------------------------------------------------------------------------------------------

def _nf4(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' nf4 round trip (blocks of 64, no double quantization), called directly."""
    import bitsandbytes.functional as bnbf

    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    return bnbf.dequantize_4bit(codes, state)


def _gaussian_mlp() -> nn.Module:
    """tiny_mlp with a Gaussian lin1 (trained weights are near-Gaussian; LoftQ's error falls step by step there)."""
    model = tiny_mlp()
    with torch.no_grad():
        model.lin1.weight.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.05)
    return model


def _loftq(iters: int, bits: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A LoftQ adapter on lin1 at scale 1, its base weight and ``B A``."""
    config = dt.LoraConfig(target_modules=["lin1"], r=4, lora_alpha=4, init_lora_weights="loftq",
                           loftq_config=dt.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    model = dt.get_peft_model(_gaussian_mlp(), config)
    delta = _delta(model, "lin1")
    return model, model.get_base_model().lin1.base_layer.weight.detach(), delta.lora_weight().detach()


def test_loftq_one_step_is_nf4_of_w_plus_the_svd_of_its_error() -> None:
    pytest.importorskip("bitsandbytes")
    weight = _gaussian_mlp().lin1.weight.detach()
    _, base, update = _loftq(1)
    q = _nf4(weight)
    torch.testing.assert_close(base, q)  # the base becomes the dequantized nf4 weight
    u, s, vh = torch.linalg.svd(weight - q)
    torch.testing.assert_close(update, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_nf4(base), base)  # re-quantizing the new base changes nothing


def test_loftq_error_decreases_with_iterations_and_int8_is_finer_than_nf4() -> None:
    pytest.importorskip("bitsandbytes")
    weight = _gaussian_mlp().lin1.weight.detach()
    errors = []
    for iters in (1, 2, 3):
        _, base, update = _loftq(iters)
        errors.append(torch.linalg.norm(weight - base - update).item())
    plain = torch.linalg.norm(weight - _nf4(weight)).item()
    assert plain > errors[0] >= errors[1] >= errors[2]
    assert errors[0] - errors[2] > 1e-4 * plain
    _, base8, update8 = _loftq(1, bits=8)
    assert torch.linalg.norm(weight - base8 - update8) < 0.1 * errors[0]


def test_replace_lora_weights_loftq_fits_the_quantization_error_of_a_4bit_model(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from tests import quant_models

    model = dt.get_peft_model(quant_models.load("nf4"), dt.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=4))
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_base_model().get_submodule(name)
    original = quant_models.load(None).get_submodule(name).weight.detach()
    residual = original - layer.delta_base.weight.detach().float()
    kept = {}

    def callback(peft_model: nn.Module, module_name: str) -> bool:
        kept[module_name] = module_name.endswith("layers.0.self_attn.q_proj")
        return kept[module_name]

    before = _delta(model, "model.layers.1.self_attn.q_proj").lora_A.weight.detach().clone()
    dt.replace_lora_weights_loftq(model, quant_models.saved_llama(), callback=callback)
    u, s, vh = torch.linalg.svd(residual)
    torch.testing.assert_close(_delta(model, name).lora_weight().detach(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4],
                               rtol=1e-4, atol=1e-6)
    assert sorted(kept) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert torch.equal(_delta(model, "model.layers.1.self_attn.q_proj").lora_A.weight, before)  # rolled back
    with pytest.raises(ValueError, match="no LoRA adapter 'other' on a bitsandbytes 4-bit layer"):
        dt.replace_lora_weights_loftq(model, quant_models.saved_llama(), adapter_name="other")


# --- EVA -----------------------------------------------------------------------------------------------------------

def _eva_batches(model: nn.Module, count: int = 6) -> list[dict[str, torch.Tensor]]:
    batches = []
    for seed in range(count):
        batch = make_causal_lm_inputs(model, batch=2, seq=12, seed=seed)
        batch["labels"][:, :3] = -100  # a "prompt" EVA leaves out
        batches.append(batch)
    return batches


def test_eva_equals_peft_ranks_a_and_config_for_the_same_data(tmp_path: Path) -> None:
    kwargs = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights="eva")
    data = _eva_batches(tiny_llama())
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs, eva_config=peft.EvaConfig(tau=0.9)))
    peft.initialize_lora_eva_weights(theirs, data, show_progress_bar=False)
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**kwargs, eva_config=dt.EvaConfig(tau=0.9)))
    dt.initialize_lora_eva_weights(ours, data)
    theirs_state, ours_state = peft.get_peft_model_state_dict(theirs), dt.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in theirs_state.items()}
    assert len({v.shape[0] for k, v in ours_state.items() if "lora_A" in k}) > 1  # ranks were redistributed
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-4, atol=1e-5)
    mine, their = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == their.rank_pattern and mine.alpha_pattern == their.alpha_pattern
    assert sorted(mine.target_modules) == sorted(their.target_modules)
    inputs = {"input_ids": data[0]["input_ids"]}
    torch.testing.assert_close(ours(**inputs).logits, tiny_llama()(**inputs).logits)  # B = 0: starts at the base
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert {k: v.shape for k, v in peft.get_peft_model_state_dict(loaded).items()} == \
        {k: v.shape for k, v in ours_state.items()}


def test_eva_a_is_the_top_principal_directions_of_the_layer_inputs() -> None:
    """One layer, rho = 1, tau = 0 (stop after the second batch): A's rows are the top-r principal directions of the
    two batches' input rows together (sklearn's exact PCA as the independent computation; EVA's SVD is randomised,
    exact here because the three directions stand well apart from the rest)."""
    sklearn = pytest.importorskip("sklearn.decomposition")
    model = tiny_mlp()
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([6.0, 0.1, 4.0, 0.1, 2.5] + [0.1] * 11)  # three well-separated directions
    batches = [{"x": torch.randn(40, 16, generator=gen) * scale} for _ in range(2)]
    config = dt.LoraConfig(target_modules=["lin0"], r=3, init_lora_weights="eva",
                           eva_config=dt.EvaConfig(rho=1.0, tau=0.0))
    state = dt.get_eva_state_dict(model, batches, config, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
    rows = torch.cat([b["x"] for b in batches]).numpy()
    expected = torch.from_numpy(sklearn.PCA(n_components=3).fit(rows).components_).float()
    a = state["lin0"].float()  # fp64 after the first update, as peft's
    torch.testing.assert_close(a @ a.T, torch.eye(3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((a * expected).sum(1).abs(), torch.ones(3), rtol=1e-3, atol=1e-3)


def test_eva_refuses_missing_data_and_a_non_eva_adapter() -> None:
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"], init_lora_weights="eva"))
    with pytest.raises(dt.ConfigError, match="needs a dataloader or an eva_state_dict"):
        dt.initialize_lora_eva_weights(model)
    with pytest.raises(dt.ConfigError, match="dataloader is empty"):
        dt.initialize_lora_eva_weights(model, [])
    with pytest.raises(dt.ConfigError, match=r"must be \(rank, 16\) for this layer, got \(2, 5\)"):
        dt.initialize_lora_eva_weights(model, eva_state_dict={"base_model.model.lin0": torch.zeros(2, 5)})
    assert _delta(model, "lin0").lora_A.weight.shape == (8, 16)  # unchanged
    plain = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(dt.ConfigError, match="init_lora_weights='eva'"):
        dt.initialize_lora_eva_weights(plain, [{"x": _x()}])


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_a_residual_init_converts_to_a_plain_lora_for_the_original_base(init: str, tmp_path: Path) -> None:
    """CorDA / LoRA-GA keep W - s B0 A0 in the base; saved with path_initial_model_for_weight_conversion, the trained
    adapter becomes a rank-2r LoRA that gives the same outputs on the original base (peft's conversion)."""
    model = tiny_mlp()
    extra = {"lora_ga_config": dt.LoraGAConfig()} if init == "lora_ga" else {}
    config = dt.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=init, **extra)
    if init == "corda":
        dt.preprocess_corda(model, config, lambda: model(_x(8)))
    else:
        dt.preprocess_loraga(model, config, _train_step(model))
    ours = dt.get_peft_model(model, config)
    ours.save_pretrained(tmp_path / "init")
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] == init
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            _delta(ours, name).lora_A.weight.add_(0.1)
    expected = ours(_x())
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (8, True)
    converted = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path / "plain")
    torch.testing.assert_close(converted(_x()), expected, rtol=1e-4, atol=1e-5)
    # peft's own conversion keeps the sub-config beside init_lora_weights=True: such a file loads here (warned)
    saved[f"{init}_config"] = {"corda_method": "ipm"} if init == "corda" else {"direction": "ArB2r"}
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=f"{init}_config is set but init_lora_weights=True: it is not used"):
        loaded = dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path / "plain")
    torch.testing.assert_close(loaded(_x()), expected, rtol=1e-4, atol=1e-5)

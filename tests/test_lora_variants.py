"""LoRA's variants against their formulas written out (``methods/lora_<variant>.py``), and the combinations peft
refuses. Files exchanged with peft: tests/cases/lora_variants.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.errors import AdapterStateError, ConfigError, QuantizationError, TargetError
from deltatune.methods.lora_monteclora import wishart_draw
from tests.models import make_causal_lm_inputs, tiny_gpt2, tiny_llama

_BD = dict(target_modules_bd_a=["v_proj"], target_modules_bd_b=["q_proj"], nblocks=2)


def _adapted(**kwargs) -> dt.PeftModel:
    config = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    return dt.get_peft_model(tiny_llama(), dt.LoraConfig(**{**config, **kwargs}))


def _layer(model: dt.PeftModel, name: str = "q_proj"):
    return getattr(model.get_base_model().model.layers[0].self_attn, name)


def _x(features: int = 32) -> torch.Tensor:
    return torch.randn(2, 5, features, generator=torch.Generator().manual_seed(3))


def _assert_merge_round_trip(model: dt.PeftModel) -> None:
    inputs = make_causal_lm_inputs(model)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=1e-5, atol=1e-6)


# --- KaSA -------------------------------------------------------------------------------------------------------

def test_kasa_truncates_the_base_and_adds_b_diag_a() -> None:
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    model = _adapted(kasa_config=dt.KasaConfig())
    layer = _layer(model)
    delta = layer.deltas["default"]
    u, s, vh = torch.linalg.svd(original, full_matrices=False)  # (32, 32): drop the 4 smallest singular values
    truncated = u[:, :28] @ torch.diag(s[:28]) @ vh[:28]
    torch.testing.assert_close(layer.base_layer.weight, truncated, rtol=1e-5, atol=1e-5)
    x = _x()
    a, b, diag = delta.lora_A.weight, delta.lora_B.weight, delta.lora_diag
    expected = x @ truncated.T + 2.0 * x @ (b @ torch.diag(diag) @ a).T  # scaling 8 / 4
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    _assert_merge_round_trip(model)


def test_kasa_fresh_adapter_is_the_truncated_base_and_its_loss_is_eq_9_to_11() -> None:
    model = _adapted(kasa_config=dt.KasaConfig(beta=0.5, gamma=0.25), init_lora_weights=True)
    layer = _layer(model)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    expected = 0.0
    for name in ("q_proj", "v_proj"):
        for index in (0, 1):
            d = getattr(model.get_base_model().model.layers[index].self_attn, name).deltas["default"]
            a, b, eye = d.lora_A.weight, d.lora_B.weight, torch.eye(4)
            expected += 0.5 * (d.lora_diag**2).sum() + 0.25 * (torch.linalg.norm(b.T @ b - eye, "fro")
                                                               + torch.linalg.norm(a @ a.T - eye, "fro"))
    loss = model.base_model._get_kasa_loss()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert layer.deltas["default"].lora_diag.grad is not None


def test_kasa_and_other_adapters_do_not_share_a_model_and_conv1d_is_refused() -> None:
    model = _adapted(kasa_config={})
    with pytest.raises(ConfigError, match="kasa_config"):
        model.add_adapter("plain", dt.LoraConfig(target_modules=["q_proj"]))
    plain = _adapted()
    with pytest.raises(ConfigError, match="kasa_config.*does not"):
        plain.add_adapter("kasa", dt.LoraConfig(target_modules=["q_proj"], kasa_config={}))
    with pytest.raises(TargetError, match="kasa_config supports nn.Linear"):
        dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"], kasa_config={}))
    with pytest.raises(TargetError, match=r"r \(16\) below"):
        _adapted(kasa_config={}, r=16)  # v_proj: (16, 32)


def test_kasa_on_a_quantized_base_is_refused_naming_the_option() -> None:
    pytest.importorskip("bitsandbytes")
    from tests.quant_models import load

    with pytest.raises(QuantizationError, match="kasa_config"):
        dt.get_peft_model(load("nf4"), dt.LoraConfig(target_modules=["q_proj"], kasa_config={}))


# --- VeLoRA -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init_type", ["batch_average", "random"])
def test_velora_gradient_of_a_is_taken_from_the_compressed_input(init_type: str) -> None:
    model = _adapted(velora_config=dt.VeloraConfig(num_groups=3, scale=1.5, init_type=init_type))
    model.train()
    layer = _layer(model)
    delta = layer.deltas["default"]
    x = _x()
    out = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(out, layer.base_layer(x) + 2.0 * x @ (delta.lora_B.weight @ delta.lora_A.weight).T)
    grad = torch.randn_like(out)
    out.backward(grad)
    v = delta.lora_velora_embed  # (11,): ⌈32 / 3⌉
    tokens = F.pad(x.reshape(-1, 32), (0, 1)).reshape(-1, 3, 11)  # 3 sub-tokens of 11 (one zero pad)
    if init_type == "batch_average":
        mean = tokens.reshape(-1, 11).mean(0)
        torch.testing.assert_close(v, mean / mean.norm())
    rebuilt = ((tokens @ v)[..., None] * v).reshape(-1, 33)[:, :32] * 1.5  # x̂
    g_xa = 2.0 * grad.reshape(-1, 32) @ delta.lora_B.weight  # ∂L/∂(xAᵀ): (tokens, r)
    torch.testing.assert_close(delta.lora_A.weight.grad, g_xa.T @ rebuilt, rtol=1e-4, atol=1e-5)
    xa = x.reshape(-1, 32) @ delta.lora_A.weight.T
    torch.testing.assert_close(delta.lora_B.weight.grad, 2.0 * grad.reshape(-1, 32).T @ xa, rtol=1e-4, atol=1e-5)


def test_velora_batch_average_once_keeps_the_first_batch_direction() -> None:
    model = _adapted(velora_config=dt.VeloraConfig(num_groups=4, init_type="batch_average_once"))
    model.train()
    layer = _layer(model)
    layer(_x())
    first = layer.deltas["default"].lora_velora_embed.clone()
    assert first.abs().sum() > 0
    layer(torch.randn(2, 5, 32))
    torch.testing.assert_close(layer.deltas["default"].lora_velora_embed, first)


# --- MonteCLoRA -------------------------------------------------------------------------------------------------

def test_monteclora_training_uses_the_weighted_perturbed_a_and_evaluation_the_mean() -> None:
    config = dt.MontecloraConfig(num_samples=3, sample_scaler=0.5, buffer_size=2, use_entropy=True,
                                 kl_loss_weight=0.1, dirichlet_prior=0.3)
    model = _adapted(monteclora_config=config)
    layer = _layer(model)
    delta = layer.deltas["default"]
    sampler = delta.lora_monteclora_sampler
    draws = [sampler.draw() for _ in range(3)]  # buffer_size=2: one refill
    assert [tuple(t.shape) for t in draws[2]] == [(3, 32, 4), (4, 4), (3,)]
    torch.manual_seed(0)
    mean = torch.stack([wishart_draw(4) for _ in range(1000)]).mean(0)  # Wishart(df=4, I): mean 4 I, sd ≤ 0.09
    torch.testing.assert_close(mean, 4 * torch.eye(4), rtol=0, atol=0.4)
    gen = torch.Generator().manual_seed(0)
    z, zeta = torch.randn(3, 32, 4, generator=gen), torch.randn(3, generator=gen)
    wishart = torch.randn(4, 4, generator=gen)
    wishart = wishart @ wishart.T
    sampler.draw = lambda: (z, wishart, zeta)
    x = _x()
    model.train()
    out = layer(x)
    # the paper's reparameterisations written out
    s = torch.exp(sampler.std_prior)
    cov = torch.diag((s**2 * wishart.diagonal()).clamp_min(1e-3))
    noise = 0.5 * z @ torch.sqrt(cov)  # cholesky of a diagonal matrix
    alpha = torch.exp(sampler.expert_weights_prior)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    var = 1 / alpha * (1 - 2 / 3) + (1 / alpha).sum() / 9
    w = torch.softmax(torch.sqrt(var + 1e-6) * zeta + mu, dim=0)
    a = sum(w[n] * (delta.lora_A.weight.T + noise[n]) for n in range(3)).T
    with torch.no_grad():
        torch.testing.assert_close(out, layer.base_layer(x) + 2.0 * x @ (delta.lora_B.weight @ a).T,
                                   rtol=1e-5, atol=1e-5)
    # the variational loss: Dirichlet KL (prior 0.3), Wishart KL of diag(s²), Gaussian KL of Σ, entropy Σ w²
    prior = torch.full((3,), 0.3)
    kl_d = (torch.lgamma(alpha.sum()) - torch.lgamma(prior.sum()) + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum())
    kl_w = 0.5 * (-torch.log(s**2).sum() * 4 + (s**2).sum() * 4 - 16)
    kl_g = 3 * 0.5 * (cov.clamp_min(1e-6).trace() - torch.log(cov.clamp_min(1e-6)).trace() - 4)
    expected = 0.1 * (kl_d + kl_w + kl_g) + (w**2).sum()
    torch.testing.assert_close(sampler.variational_loss(), expected, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        plain = layer.base_layer(x) + 2.0 * x @ (delta.lora_B.weight @ delta.lora_A.weight).T
        torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)
    assert model.base_model._get_monteclora_loss() == 0.0  # not training
    _assert_merge_round_trip(model)


# --- BD-LoRA ----------------------------------------------------------------------------------------------------

def test_bdlora_factors_are_block_diagonal() -> None:
    model = _adapted(use_bdlora=dt.BdLoraConfig(**_BD))
    x = _x()
    for name, side in (("q_proj", "B"), ("v_proj", "A")):
        layer = _layer(model, name)
        delta = layer.deltas["default"]
        a, b = delta.lora_A.weight, delta.lora_B.weight
        if side == "A":
            assert a.shape == (4, 16)
            a = torch.block_diag(a[:2], a[2:])  # (4, 32): block i maps input chunk i to rank rows i
        else:
            assert b.shape == (32, 2) and not b.any()  # zero at init, whatever init_lora_weights says (peft)
            with torch.no_grad():
                b.normal_()
            b = torch.block_diag(b[:16], b[16:])  # (32, 4)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ (b @ a).T, rtol=1e-5, atol=1e-5)
    _assert_merge_round_trip(model)


def test_bdlora_refuses_unmatched_doubly_matched_and_indivisible_targets() -> None:
    with pytest.raises(TargetError, match="neither"):
        _adapted(use_bdlora=dt.BdLoraConfig(target_modules_bd_a=["q_proj"]))
    _adapted(use_bdlora=dt.BdLoraConfig(target_modules_bd_a=["q_proj"], match_strict=False))
    with pytest.raises(TargetError, match="both"):
        _adapted(use_bdlora=dt.BdLoraConfig(target_modules_bd_a=["proj"], target_modules_bd_b=["q_"]))
    with pytest.raises(TargetError, match="nblocks=3"):
        _adapted(use_bdlora=dt.BdLoraConfig(target_modules_bd_a=["q_proj", "v_proj"], nblocks=3), r=6)
    with pytest.raises(ConfigError, match="in both"):
        dt.BdLoraConfig(target_modules_bd_a=["q"], target_modules_bd_b=["q"])


# --- QALoRA -----------------------------------------------------------------------------------------------------

def test_qalora_pools_the_input_and_merges_exactly() -> None:
    model = _adapted(use_qalora=True, qalora_group_size=8)
    layer = _layer(model)
    delta = layer.deltas["default"]
    assert delta.lora_A.weight.shape == (4, 4)  # (r, 32 / 8)
    x = _x()
    pooled = x.reshape(2, 5, 4, 8).mean(-1) * 4
    expected = layer.base_layer(x) + 2.0 * pooled @ delta.lora_A.weight.T @ delta.lora_B.weight.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    _assert_merge_round_trip(model)
    with pytest.raises(TargetError, match=r"qalora_group_size=5 must divide its in_features=32"):
        _adapted(use_qalora=True, qalora_group_size=5)


def test_qalora_on_a_4bit_base_adds_the_pooled_update_to_the_quantized_output() -> None:
    pytest.importorskip("bitsandbytes")
    from tests.quant_models import load

    model = dt.get_peft_model(load("nf4"), dt.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=4,
                                                         use_qalora=True, qalora_group_size=32,
                                                         init_lora_weights=False))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = layer.deltas["default"]
    x = torch.randn(3, 64)
    pooled = x.reshape(3, 2, 32).mean(-1) * 2
    with torch.no_grad():
        expected = layer.base_layer(x) + pooled @ delta.lora_A.weight.T @ delta.lora_B.weight.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# --- shared rules -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first, second", [
    (dict(kasa_config={}), dict(use_dora=True)),
    (dict(velora_config={}), dict(use_qalora=True)),
    (dict(monteclora_config={}), dict(use_bdlora=dict(target_modules_bd_a=["q"]))),
])
def test_two_variants_in_one_adapter_are_refused_naming_both(first: dict, second: dict) -> None:
    names = [*first, *second]
    with pytest.raises(ConfigError, match=f"({names[0]}|{names[1]}) cannot be combined with ({names[0]}|{names[1]})"):
        dt.LoraConfig(**first, **second)


def test_variants_refuse_parameter_targets_lora_bias_other_layers_and_weighted_combination() -> None:
    with pytest.raises(ConfigError, match="velora_config cannot be combined with target_parameters"):
        dt.LoraConfig(target_parameters=["mlp.up_proj.weight"], velora_config={})
    with pytest.raises(ConfigError, match="use_qalora cannot be combined with lora_bias"):
        dt.LoraConfig(lora_bias=True, use_qalora=True)
    with pytest.raises(TargetError, match="monteclora_config supports Linear"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["embed_tokens"], monteclora_config={}))
    model = _adapted(velora_config={})
    with pytest.raises(AdapterStateError, match="velora_config"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(ConfigError, match="num_groups"):
        dt.LoraConfig(velora_config={"num_groups": 0})


def test_sub_configs_round_trip_through_json() -> None:
    config = dt.LoraConfig(target_modules=["q_proj"], use_bdlora=dt.BdLoraConfig(**_BD),
                           lora_dropout=0.0)
    again = dt.PeftConfig.from_dict(config.to_dict())
    assert again.use_bdlora == config.use_bdlora and isinstance(again.use_bdlora, dt.BdLoraConfig)


def test_velora_training_gradients_equal_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    config = dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False,
                  velora_config=dict(num_groups=5, scale=0.5))
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(**config)).save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    inputs = make_causal_lm_inputs(ours)
    grads = []
    for model in (ours, theirs):
        model.train()
        model(**inputs).logits.square().mean().backward()
        grads.append({n.replace(".deltas.default", "").replace(".default", ""): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# --- Arrow ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[str]:
    """Four saved LoRAs of tiny_llama (q_proj, v_proj; r = 4) with clearly different random factors."""
    paths = []
    for i in range(4):
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                              init_lora_weights=False))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen))
        path = tmp_path_factory.mktemp("lib") / f"lora{i}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def test_arrow_routes_each_token_to_its_top_k_task_loras(library: list[str]) -> None:
    arrow = dt.ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0)
    model = dt.create_arrow_model(tiny_llama(), library[:3], arrow)
    assert arrow.task_adapter_names is None  # the user's config is left alone
    assert model.active_adapters == ["arrow_router"]
    layer = _layer(model)
    x = _x()
    with torch.no_grad():
        out = layer(x)
        tasks = [layer.deltas[f"task_{i}"] for i in range(3)]
        router = layer.deltas["arrow_router"].variant
        for proto, d in zip(router.prototypes, tasks):  # the top right singular vector of B A, up to sign
            top = torch.linalg.svd(d.lora_B.weight @ d.lora_A.weight)[2][0]
            assert abs(float(proto @ top)) == pytest.approx(1.0, abs=1e-3)  # 15 power steps
        tokens = x.reshape(-1, 32)
        scores = (tokens @ router.prototypes.T).abs()  # (10, 3)
        expected = layer.base_layer(tokens)
        for t in range(10):
            best = scores[t].argsort(descending=True)[:2]
            weights = torch.softmax(scores[t, best] / 0.5, dim=0)
            for w, e in zip(weights, best):
                d = tasks[int(e)]
                expected[t] += w * d.scaling * (d.lora_B.weight @ d.lora_A.weight @ tokens[t])
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterStateError, match="arrow_config"):
        model.merge_adapter()


@pytest.mark.parametrize("use_gks", [False, True], ids=["arrow", "genknowsub"])
def test_arrow_model_equals_peft(library: list[str], use_gks: bool) -> None:
    peft = pytest.importorskip("peft")
    kwargs = dict(top_k=2, router_temperature=0.7, rng_seed=5, use_gks=use_gks)
    general = library[3:] if use_gks else None
    ours = dt.create_arrow_model(tiny_llama(), library[:3], dt.ArrowConfig(**kwargs), general_adapter_paths=general)
    theirs = peft.create_arrow_model(tiny_llama(), library[:3], peft.ArrowConfig(**kwargs),
                                     general_adapter_paths=general)
    inputs = make_causal_lm_inputs(ours)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert (expected - tiny_llama()(**inputs).logits).abs().max() > 1e-2
    assert ours.peft_config["arrow_router"].to_dict()["arrow_config"] == \
        theirs.peft_config["arrow_router"].to_dict()["arrow_config"]
    if use_gks:  # GenKnowSub rewrote the task LoRAs alike
        theirs_b = theirs.base_model.model.model.layers[1].self_attn.v_proj.lora_B["task_1"].weight
        ours_b = ours.get_base_model().model.layers[1].self_attn.v_proj.deltas["task_1"].lora_B.weight
        torch.testing.assert_close(ours_b, theirs_b)


def test_arrow_refuses_a_top_k_beyond_the_library_and_a_router_without_one(library: list[str]) -> None:
    model = dt.create_arrow_model(tiny_llama(), library[:2], dt.ArrowConfig(top_k=3))
    with pytest.raises(AdapterStateError, match="top_k=3 exceeds the 2 task LoRA"):
        model(**make_causal_lm_inputs(model))
    alone = _adapted(arrow_config=dt.ArrowConfig(top_k=1))
    with pytest.raises(AdapterStateError, match="no task LoRA"):
        alone(**make_causal_lm_inputs(alone))
    with pytest.raises(ConfigError, match="use_gks=True needs general_adapter_paths"):
        dt.create_arrow_model(tiny_llama(), library[:2], dt.ArrowConfig(use_gks=True))


def test_variant_adapters_serve_mixed_batches(library: list[str]) -> None:
    from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone

    model = dt.create_arrow_model(tiny_llama(), library[:2], dt.ArrowConfig(top_k=1))
    model.add_adapter("qalora", dt.LoraConfig(target_modules=["q_proj"], r=4, use_qalora=True, qalora_group_size=4,
                                              init_lora_weights=False))
    inputs = make_causal_lm_inputs(model, batch=3)
    mixed = assert_mixed_batch_equals_each_row_alone(model, inputs, ["arrow_router", "qalora", "__base__"])
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3 and (mixed[1] - mixed[2]).abs().max() > 1e-3

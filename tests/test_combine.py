"""``PeftModel.add_weighted_adapter`` and the merge rules of ``deltatune.combine``.

The oracle is peft: the same adapters (made non-zero in deltatune, saved, loaded into peft) are combined by both
libraries with the same arguments, and the new adapter must have the same weights, config and outputs. The merge
rules are also checked on hand-made tensors (TIES, DARE, magnitude pruning) and against ``Σ wᵢ ΔWᵢ`` where a
combination is exact (``cat``, full-rank ``svd``).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import combine
from deltatune.errors import AdapterStateError, ConfigError
from deltatune.layers import adapter_layers
from tests.adapter_utils import assert_same_state, logits, snapshot
from tests.models import make_causal_lm_inputs, make_convnet_inputs, tiny_convnet, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes (fan_in_fan_out, density >= 1 ...)

# llama_embed also adapts the embedding table (lora_embedding_A/B).
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"], "llama_embed": ["embed_tokens", "q_proj"]}
FACTORIES: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "llama_embed": tiny_llama}
# name -> (r, lora_alpha, target_modules or None for the family's): same rank for a..c, d has another rank and targets
ADAPTERS = {"a": (4, 8, None), "b": (4, 16, None), "c": (4, 4, None), "d": (2, 2, "first")}
DETERMINISTIC = ["svd", "linear", "cat", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
RANDOM = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
FACTOR_TYPES = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
WEIGHTS = [1.0, -0.7, 0.4]


def _config(family: str, name: str) -> dt.LoraConfig:
    r, alpha, targets = ADAPTERS[name]
    targets = TARGETS[family][:1] if targets == "first" else TARGETS[family]
    return dt.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets)


def _build_pair(family: str, tmp_path: Path) -> tuple[dt.PeftModel, peft.PeftModel]:
    """deltatune and peft models holding the same non-zero adapters a, b, c (rank 4) and d (rank 2)."""
    ours = dt.get_peft_model(FACTORIES[family](), _config(family, "a"), adapter_name="a")
    for name in list(ADAPTERS)[1:]:
        ours.add_adapter(name, _config(family, name))
    return ours, _randomised_peft_copy(ours, FACTORIES[family], tmp_path, std=0.2)


def _randomised_peft_copy(
    ours: dt.PeftModel, factory: Callable[[], nn.Module], tmp_path: Path, std: float
) -> peft.PeftModel:
    """Overwrites every adapter parameter of ``ours`` with seeded noise times ``std``, then saves all its adapters
    and loads them into a peft model on a fresh ``factory()`` base (no adapter may be called ``default``: each must
    save to its own folder)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in sorted(ours.named_parameters()):
            if ".deltas." in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    ours.save_pretrained(tmp_path)
    first, *rest = ours.peft_config
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path / first, adapter_name=first)
    for name in rest:
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    return theirs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[dt.PeftModel, peft.PeftModel]]:
    """One pair per family, built once; tests take deep copies (see :func:`_pair`)."""
    return {family: _build_pair(family, tmp_path_factory.mktemp(family)) for family in FACTORIES}


def _pair(pairs, family: str) -> tuple[dt.PeftModel, peft.PeftModel]:
    ours, theirs = pairs[family]
    return copy.deepcopy(ours), copy.deepcopy(theirs)


_BERNOULLI = torch.bernoulli


def _both(ours, theirs, adapters, weights, name, combination_type, **kwargs) -> None:
    """The same call in both libraries, with DARE's ``torch.bernoulli`` masks drawn from one freshly seeded
    generator each time. The global generator would not do: the libraries build the new adapter before drawing and
    consume different amounts of randomness doing so. Equal results then mean the same masks on the same entries in
    the same order, and the same math around them."""
    for model in (ours, theirs):
        draws = functools.partial(_BERNOULLI, generator=torch.Generator().manual_seed(0))
        with mock.patch.object(torch, "bernoulli", draws):
            model.add_weighted_adapter(adapters, weights, name, combination_type=combination_type, **kwargs)


def _state(model, name: str) -> dict[str, torch.Tensor]:
    if isinstance(model, dt.PeftModel):
        return model.adapter_state_dict(name)
    return peft.get_peft_model_state_dict(model, adapter_name=name)


def _assert_same_adapter(ours, theirs, name: str) -> None:
    mine, other = _state(ours, name), _state(theirs, name)
    assert mine.keys() == other.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert any(v.abs().max() > 0 for v in mine.values())
    inputs = make_causal_lm_inputs(ours)
    ours.set_adapter(name)
    theirs.set_adapter(name)
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    with ours.disable_adapter():
        assert (logits(ours, inputs) - expected).abs().max() > 1e-4  # the combined adapter does something


SAME_AS_PEFT = [
    *((family, kind, 0.5) for family in ("llama", "gpt2") for kind in DETERMINISTIC + RANDOM),
    *(("llama_embed", kind, 0.5) for kind in DETERMINISTIC + RANDOM),
    *(("llama_embed", kind, 1.0) for kind in ("ties", "dare_linear")),  # density 1 drops nothing
]


@pytest.mark.parametrize(("family", "combination_type", "density"), SAME_AS_PEFT,
                         ids=[f"{f}-{k}-{d}" for f, k, d in SAME_AS_PEFT])
def test_same_adapter_as_peft(family: str, combination_type: str, density: float, pairs) -> None:
    ours, theirs = _pair(pairs, family)
    kwargs = {} if combination_type in ("svd", "linear", "cat") else {"density": density}
    _both(ours, theirs, ["a", "b", "c"], WEIGHTS, "mix", combination_type, **kwargs)
    _assert_same_adapter(ours, theirs, "mix")


@pytest.mark.parametrize(
    ("combination_type", "kwargs"),
    [
        ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
        ("svd", {"svd_rank": 6, "svd_full_matrices": False}),
        ("cat", {}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency", "svd_rank": 2}),
    ],
    ids=["svd-rank-clamp", "svd-reduced", "cat", "ties-frequency", "dare_ties_svd-frequency"],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_options_and_mixed_ranks_match_peft(family: str, combination_type: str, kwargs: dict, pairs) -> None:
    # d has rank 2 and adapts only the first target: the combination is the sum where d exists, a, b elsewhere
    ours, theirs = _pair(pairs, family)
    adapters = ["a", "d", "b"] if combination_type in ("svd", "cat", "dare_ties_svd") else ["a", "c"]
    _both(ours, theirs, adapters, WEIGHTS[: len(adapters)], "mix", combination_type, **kwargs)
    _assert_same_adapter(ours, theirs, "mix")


def test_single_adapter_is_scaled_like_peft(pairs) -> None:
    ours, theirs = _pair(pairs, "llama")
    _both(ours, theirs, ["b"], [-0.5], "neg", "ties", density=0.5)  # one adapter: linear, no pruning
    _assert_same_adapter(ours, theirs, "neg")


@pytest.mark.parametrize("combination_type", ["svd", "linear", "cat", "ties_svd"])
def test_config_and_round_trip_through_peft(combination_type: str, pairs, tmp_path: Path) -> None:
    ours, theirs = _pair(pairs, "llama")
    adapters = ["a", "d"] if combination_type != "linear" else ["a", "b"]
    _both(ours, theirs, adapters, [0.6, 0.9], "mix", combination_type, density=0.8)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["mix"])
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["mix"])
    mine = json.loads((tmp_path / "ours/mix/adapter_config.json").read_text())
    other = json.loads((tmp_path / "theirs/mix/adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "task_type"):
        assert mine[field] == other[field], field
    assert set(mine["target_modules"]) == set(other["target_modules"]) == set(TARGETS["llama"])
    expected_rank = {"svd": 4, "ties_svd": 4, "cat": 6, "linear": 4}[combination_type]
    assert mine["r"] == mine["lora_alpha"] == expected_rank

    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours/mix")
    ours.set_adapter("mix")
    inputs = make_causal_lm_inputs(ours)
    torch.testing.assert_close(logits(reloaded, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)
    back = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs/mix")
    torch.testing.assert_close(logits(back, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)


# --- exact combinations against Σ wᵢ ΔWᵢ --------------------------------------------------------------------------

def _delta(layer, name: str) -> torch.Tensor:
    delta = layer.deltas[name]
    return delta.lora_weight() * delta.scaling  # (out, in)


@pytest.mark.parametrize("family", ["llama_embed", "gpt2"])
@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_weighted_sum(family: str, combination_type: str, pairs) -> None:
    ours, _ = _pair(pairs, family)
    names, weights = ["a", "b", "d"], [0.5, -1.5, 2.0]
    # rank 10 covers the sum of the ranks (4 + 4 + 2), so the SVD truncates nothing
    ours.add_weighted_adapter(names, weights, "mix", combination_type, svd_rank=10)
    for _, layer in adapter_layers(ours):
        expected = sum(w * _delta(layer, n) for n, w in zip(names, weights) if n in layer.deltas)
        torch.testing.assert_close(_delta(layer, "mix"), expected, rtol=1e-4, atol=1e-5)


def test_linear_weights_its_factors_by_root_of_weight_times_scaling(pairs) -> None:
    ours, _ = _pair(pairs, "gpt2")
    weights = [2.0, -0.5]
    ours.add_weighted_adapter(["a", "b"], weights, "mix", "linear")
    for _, layer in adapter_layers(ours):
        a, b = layer.deltas["a"], layer.deltas["b"]
        ka, kb = (weights[0] * a.scaling) ** 0.5, (-weights[1] * b.scaling) ** 0.5
        torch.testing.assert_close(layer.deltas["mix"].lora_A.weight, ka * a.lora_A.weight - kb * b.lora_A.weight)
        torch.testing.assert_close(layer.deltas["mix"].lora_B.weight, ka * a.lora_B.weight + kb * b.lora_B.weight)
        assert layer.deltas["mix"].scaling == 1


# --- the merge rules on plain tensors ------------------------------------------------------------------------------

def test_magnitude_prune_keeps_the_largest_entries() -> None:
    t = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    assert torch.equal(combine.magnitude_prune(t, 0.5), torch.tensor([[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]))


def test_ties_elects_sign_and_averages_agreeing_entries() -> None:
    # Hand-worked TIES (Yadav et al. 2023, §3): no trimming at density 1.
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([-3.0, -1.0, 1.0, 0.0])
    # sums: -2 (elect -), -3 (-), 4 (+), 0 (+)
    # entry 0: only t2 agrees -> -3 * w2; entry 1: both -> (-2 w1 - 1 w2) / 2; entry 2: (3 w1 + 1 w2) / 2; entry 3: 0
    w1, w2 = 1.0, 0.5
    out = combine.merge_tensors([t1, t2], torch.tensor([w1, w2]), "ties", density=1.0)
    torch.testing.assert_close(out, torch.tensor([-1.5, (-2 - 0.5) / 2, (3 + 0.5) / 2, 0.0]))
    # "frequency" counts signs instead: entry 0 is a tie (one +, one -) and elects +, so only t1 counts
    out = combine.merge_tensors([t1, t2], torch.tensor([w1, w2]), "ties", density=1.0, majority_sign_method="frequency")
    assert out[0] == 1.0


def test_dare_keeps_a_density_fraction_rescaled_and_unbiased() -> None:
    torch.manual_seed(0)
    t = torch.randn(400, 500)
    pruned = combine.random_prune(t, 0.3)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(pruned[kept], t[kept] / 0.3)  # survivors rescaled by 1 / density
    # unbiased: averaged over many draws, the pruned tensor tends to the original
    ones = torch.ones(200_000)
    assert abs(combine.random_prune(ones, 0.25).mean().item() - 1.0) < 0.02
    # dare_linear = Σ wᵢ · prune(τᵢ); the same seed gives the same masks
    torch.manual_seed(1)
    merged = combine.merge_tensors([t, 2 * t], torch.tensor([1.0, -1.0]), "dare_linear", density=0.3)
    torch.manual_seed(1)
    m1, m2 = combine.random_prune(t, 0.3), combine.random_prune(2 * t, 0.3)
    torch.testing.assert_close(merged, m1 - m2)


def test_svd_factors_truncate_and_clamp() -> None:
    torch.manual_seed(0)
    delta = torch.randn(6, 3) @ torch.randn(3, 5)  # rank 3
    a, b = combine.svd_factors(delta, 3)
    assert a.shape == (3, 5) and b.shape == (6, 3)
    torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-5)
    a, b = combine.svd_factors(delta, 2)
    high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.8)  # clamp both factors to ± this quantile
    clamped_a, clamped_b = combine.svd_factors(delta, 2, clamp=0.8)
    assert a.shape == (2, 5) and b.shape == (6, 2)
    torch.testing.assert_close(clamped_a, a.clamp(-high, high))
    torch.testing.assert_close(clamped_b, b.clamp(-high, high))
    assert not torch.equal(clamped_b, b)


# --- refusals: clear errors, model unchanged --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        ({"adapters": ["a", "nope"]}, AdapterStateError, "no adapter named 'nope'"),
        ({"combination_type": "average"}, ConfigError, "unknown combination_type"),
        ({"adapters": ["a", "d"], "combination_type": "linear"}, ConfigError, "same rank"),
        ({"adapter_name": "b"}, AdapterStateError, "already exists"),
        ({"weights": [1.0]}, ConfigError, "one weight per adapter"),
        ({"combination_type": "ties"}, ConfigError, "needs a density"),
        ({"combination_type": "dare_linear", "density": 1.5}, ConfigError, "needs a density"),
        ({"majority_sign_method": "mean", "combination_type": "ties", "density": 0.5}, ConfigError, "majority_sign"),
        ({"svd_rank": 0}, ConfigError, "svd_rank"),
        ({"svd_driver": "gesvd"}, ConfigError, "CUDA"),
        ({"adapters": "a"}, ConfigError, "list of adapter names"),
    ],
    ids=["unknown-adapter", "unknown-type", "linear-ranks", "existing-name", "weights-length", "no-density",
         "bad-density", "sign-method", "svd-rank", "svd-driver-cpu", "adapters-str"],
)
def test_bad_requests_raise_and_change_nothing(call: dict, error: type, match: str, pairs) -> None:
    ours, _ = _pair(pairs, "llama")
    before, configs = snapshot(ours), dict(ours.peft_config)
    args = {"adapters": ["a", "b"], "weights": [1.0, 0.5], "adapter_name": "mix"} | call
    with pytest.raises(error, match=match):
        ours.add_weighted_adapter(**args)
    assert_same_state(before, ours)
    assert ours.peft_config == configs


@pytest.mark.parametrize(
    ("other", "match"),
    [(lambda: dt.LoraConfig(use_dora=True), "uses DoRA"), (lambda: dt.IA3Config(feedforward_modules=[]), "LoRA"),
     (lambda: dt.LoraConfig(trainable_token_indices=[3, 4]), "trainable_token_indices")],
    ids=["dora", "ia3", "trainable-tokens"],
)
def test_dora_and_other_methods_are_refused(other, match: str) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(), adapter_name="x")
    model.add_adapter("y", other())
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix")
    assert list(model.peft_config) == ["x", "y"]
    assert_same_state(before, model)


def test_prompt_adapters_are_refused() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.add_adapter("other", dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(AdapterStateError, match="prompt methods have no weights"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", "linear")
    assert list(model.peft_config) == ["default", "other"]


def test_adapters_that_each_train_a_head_are_refused_one_head_is_kept() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(modules_to_save=["lm_head"]), adapter_name="x")
    model.add_adapter("y", dt.LoraConfig(modules_to_save=["lm_head"]))
    model.add_adapter("z", dt.LoraConfig())
    with pytest.raises(ConfigError, match="modules_to_save"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", "cat")
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["x"].weight.add_(1.0)  # "trained"
    model.add_weighted_adapter(["x", "z"], [1.0, 1.0], "mix", "cat")
    torch.testing.assert_close(head.modules_to_save["mix"].weight, head.modules_to_save["x"].weight)
    assert model.peft_config["mix"].modules_to_save == ["lm_head"]


def test_rslora_adapters_combine_to_the_weighted_sum() -> None:
    # peft keeps use_rslora on the combined adapter, which scales it by √r; deltatune gives the combination itself
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, use_rslora=True, init_lora_weights=False), "x")
    model.add_adapter("y", dt.LoraConfig(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False))
    model.add_weighted_adapter(["x", "y"], [0.5, 1.0], "mix", "cat")
    assert model.peft_config["mix"].use_rslora is False
    for _, layer in adapter_layers(model):
        torch.testing.assert_close(_delta(layer, "mix"), 0.5 * _delta(layer, "x") + _delta(layer, "y"))


@pytest.mark.parametrize("combination_type", ["svd", "cat", "ties", "dare_linear_svd"])
def test_conv2d_layers_match_peft(combination_type: str, tmp_path: Path) -> None:
    # A conv update (out, in, kh, kw) is refactorised over its flattened (out, in·kh·kw) form.
    config = {"target_modules": ["conv2d", "fc1"], "r": 3, "lora_alpha": 6}
    ours = dt.get_peft_model(tiny_convnet(), dt.LoraConfig(**config), adapter_name="x")
    ours.add_adapter("y", dt.LoraConfig(**config))
    theirs = _randomised_peft_copy(ours, tiny_convnet, tmp_path, std=0.3)
    _both(ours, theirs, ["x", "y"], [0.8, -0.3], "mix", combination_type, density=0.6, svd_rank=2)
    mine, other = _state(ours, "mix"), _state(theirs, "mix")
    assert mine.keys() == other.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    inputs = {k: v for k, v in make_convnet_inputs().items() if k != "labels"}
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_regex_targets_are_or_ed_and_a_mix_with_lists_is_refused() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=r".*\.q_proj"), adapter_name="x")
    model.add_adapter("y", dt.LoraConfig(target_modules=r".*\.v_proj"))
    model.add_adapter("z", dt.LoraConfig(target_modules=["k_proj"]))
    model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", "cat")
    assert model.peft_config["mix"].target_modules == r"(.*\.q_proj)|(.*\.v_proj)"
    assert sum("mix" in layer.deltas for _, layer in adapter_layers(model)) == 4  # q and v in 2 layers
    with pytest.raises(ConfigError, match="mix a regex string and a list"):
        model.add_weighted_adapter(["x", "z"], [1.0, 1.0], "mix2", "cat")


def test_layer_selection_that_cannot_be_united_is_refused() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(layers_to_transform=[0]), adapter_name="x")
    model.add_adapter("y", dt.LoraConfig(layers_to_transform=[1]))
    before = snapshot(model)
    with pytest.raises(ConfigError, match="would not reach"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", "svd")
    assert_same_state(before, model)


def test_linear_refuses_ranks_that_differ_on_one_layer() -> None:
    # both have r=4 overall, so peft's check passes, but v_proj has rank 2 in x: the factors cannot be added
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, rank_pattern={"v_proj": 2}), adapter_name="x")
    model.add_adapter("y", dt.LoraConfig(r=4))
    with pytest.raises(ConfigError, match=r"ranks \[2, 4\] on 'model.layers.0.self_attn.v_proj'"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", "linear")
    model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", "cat")  # cat pads: rank 8 everywhere
    assert {layer.deltas["mix"].r for _, layer in adapter_layers(model)} == {8}


def test_density_with_a_type_that_ignores_it_warns(pairs) -> None:
    ours, _ = _pair(pairs, "llama")
    with pytest.warns(UserWarning, match="density is ignored"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", "svd", density=0.5)


def test_dare_draws_follow_the_torch_seed(pairs) -> None:
    ours, _ = _pair(pairs, "gpt2")
    for name, seed in [("s1", 3), ("s2", 3), ("s3", 4)]:
        torch.manual_seed(seed)
        ours.add_weighted_adapter(["a", "b"], [1.0, 0.5], name, "dare_ties", density=0.5)
    first, again, other = (ours.adapter_state_dict(n) for n in ("s1", "s2", "s3"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)

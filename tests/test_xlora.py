"""X-LoRA (``methods/xlora.py``): a classifier weighs LoRA experts per token.

Checked against peft 0.21.2 (same experts, same classifier weights: equal logits and scalings; files both ways), the
scaling math against the formula written out, trainability, cached generation and the refusals.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune import AdapterStateError, ConfigError, DeltatuneError
from deltatune.methods.xlora import select_top_k
from tests.models import tiny_llama

IDS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 3, 4, 5]])
EXPERT_TARGETS = (["q_proj", "v_proj", "embed_tokens"], ["v_proj", "down_proj"], ["q_proj", "o_proj"])


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, str]:
    """Three non-zero LoRA adapters saved by peft, keyed "0", "1", "2" (the names peft's X-LoRA needs)."""
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for i, targets in enumerate(EXPERT_TARGETS):
        torch.manual_seed(i)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(tiny_llama(), config).save_pretrained(root / f"lora{i}")
        paths[str(i)] = str(root / f"lora{i}")
    return paths


def _kwargs(experts: dict[str, str], **options) -> dict:
    return dict(task_type="CAUSAL_LM", hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=8, **options)


def _peft_xlora(kwargs: dict) -> peft.PeftModel:
    model = tiny_llama()
    model.config.use_cache = False  # peft's X-LoRA refuses a model that caches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.XLoraConfig(**kwargs)).eval()


def _classifier(model: dt.PeftModel) -> torch.nn.Module:
    return model.base_model.shared_state["default"].internal_xlora_classifier


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


OPTIONS = {
    "dense": {},
    "layerwise-topk": dict(layerwise_scalings=True, top_k_lora=2, enable_softmax_topk=True, enable_softmax=False,
                           softmax_temperature=0.5, global_scaling_weight=1.5, scaling_pass_value=0.3),
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_matches_peft_both_ways(experts, tmp_path, options) -> None:
    kwargs = _kwargs(experts, **options)
    theirs = _peft_xlora(kwargs)
    ours = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**kwargs)).eval()
    _classifier(ours).load_state_dict(theirs.base_model.internal_xlora_classifier.state_dict())
    expected = _logits(theirs)
    assert not torch.allclose(expected, _logits(tiny_llama()), atol=1e-3)  # the experts change the output
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.get_latest_scalings(), theirs.get_latest_scalings(), atol=1e-6, rtol=0)

    ours.save_pretrained(tmp_path / "ours")  # the classifier on top, the experts in sub-folders, as peft
    model = tiny_llama()
    model.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(model, tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0)
    again = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(_logits(again), expected, atol=1e-5, rtol=0)
    assert sorted(again.peft_config) == ["0", "1", "2", "default"]


def test_peft_saved_directory_is_refused(experts, tmp_path) -> None:
    """peft 0.21.2 drops classifier keys containing ``.<expert name>.`` (``layers.0``) and writes classifier keys
    into the experts' files: such a directory is refused, naming the file, and the model is left as it was."""
    _peft_xlora(_kwargs(experts)).save_pretrained(tmp_path / "theirs")
    model = tiny_llama()
    with pytest.raises(DeltatuneError, match="internal_xlora_classifier"):
        dt.PeftModel.from_pretrained(model, tmp_path / "theirs")
    torch.testing.assert_close(_logits(model), _logits(tiny_llama()), atol=0, rtol=0)


def test_scalings_and_layer_output_follow_the_formula(experts) -> None:
    """scalings = softmax(c(h) / τ) with h the base model's last hidden states (scaling_pass_value=0); a layer adds
    Σᵢ g·s̃ᵢ·(α/r)·Bᵢ Aᵢ x with s̃ the top-k of its scalings renormalised by a softmax over the kept ones."""
    tau, k, g = 0.7, 2, 0.8
    with pytest.warns(UserWarning, match="two softmaxes"):
        config = dt.XLoraConfig(**_kwargs(
            experts, softmax_temperature=tau, top_k_lora=k, enable_softmax_topk=True, global_scaling_weight=g))
    model = dt.get_peft_model(tiny_llama(), config)
    model.eval()
    seen = {}
    layer = model.get_base_model().model.layers[0].self_attn.q_proj  # experts "0" and "2"
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    _logits(model)
    handle.remove()

    with torch.no_grad():
        hidden = tiny_llama()(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        lin0, lin1 = _classifier(model).layers[0], _classifier(model).layers[-1]
        logits = F.linear(torch.relu(F.linear(hidden, lin0.weight, lin0.bias)), lin1.weight, lin1.bias)  # (B, T, 3)
        scalings = torch.softmax(logits / tau, dim=-1)
        layers = 1 + 2 * 4  # the adapted layers: embed_tokens, then q, v, o, down per decoder layer
        torch.testing.assert_close(model.get_latest_scalings(), scalings[:, :, None, :].expand(-1, -1, layers, -1))

        top = scalings.topk(k, dim=-1).indices
        kept = torch.full_like(scalings, float("-inf")).scatter(-1, top, scalings.gather(-1, top))
        weights = torch.softmax(kept, dim=-1)  # zero outside the top k
        x = seen["x"]
        expected = layer.base_layer(x)
        for i in ("0", "2"):
            lora = layer.deltas[i]
            update = x @ lora.lora_A.weight.T @ lora.lora_B.weight.T * lora.scaling
            expected = expected + g * weights[..., int(i):int(i) + 1] * update
        torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=0)


def test_select_top_k() -> None:
    s = torch.tensor([[0.1, 0.5, 0.2, 0.2001]])
    torch.testing.assert_close(select_top_k(s, 2, False), torch.tensor([[0.0, 0.5, 0.0, 0.2001]]))
    kept = torch.softmax(torch.tensor([0.5, 0.2001]), dim=0)
    torch.testing.assert_close(select_top_k(s, 2, True), torch.tensor([[0.0, kept[0], 0.0, kept[1]]]))
    torch.testing.assert_close(select_top_k(s, None, False), s)


@pytest.mark.parametrize("trainable_experts", [False, True])
def test_gradients_reach_the_classifier_and_only_trainable_experts(experts, trainable_experts) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**_kwargs(
        experts, use_trainable_adapters=trainable_experts, xlora_dropout_p=0.0)))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    classifier = {n for n in trainable if "internal_xlora_classifier" in n}
    assert len(classifier) == 4 and classifier <= grads
    lora = {n for n in grads if ".lora_" in n}
    assert grads == trainable == classifier | lora
    assert bool(lora) == trainable_experts
    if trainable_experts:  # every expert's factors train (B is non-zero: A gets gradients too)
        assert {n.split(".deltas.")[1].split(".")[0] for n in lora} == {"0", "1", "2"}


def test_cached_generation_equals_the_uncached_loop(experts) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**_kwargs(experts, scaling_pass_value=0.5))).eval()
    cached = model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False)
    ids = IDS
    for _ in range(5):  # full forwards, no cache
        ids = torch.cat([ids, _logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == ids.tolist()
    beams = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, num_beams=3)
    assert beams.tolist() == model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, num_beams=3,
                                            use_cache=False).tolist()


def test_merge_and_mixed_batches_are_refused_and_disable_gives_the_base(experts) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**_kwargs(experts))).eval()
    before = _logits(model)
    with pytest.raises(AdapterStateError, match="per token"):
        model.merge_and_unload()
    with pytest.raises(AdapterStateError, match="per token"):
        model.merge_adapter(["0"])
    with pytest.raises(AdapterStateError, match="adapter_names"):
        model(input_ids=IDS, adapter_names=["0", "1"])
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(tiny_llama()), atol=0, rtol=0)
    with pytest.raises(AdapterStateError, match="expert"):
        model.delete_adapter("1")
    base = model.unload()
    torch.testing.assert_close(_logits(base), _logits(tiny_llama()), atol=0, rtol=0)


def test_bad_configs_are_refused_before_anything_is_loaded(experts, tmp_path) -> None:
    with pytest.raises(ConfigError, match="top_k_lora"):
        dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**_kwargs(experts, top_k_lora=4)))
    with pytest.raises(ConfigError, match="hidden_size"):
        dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**{**_kwargs(experts), "hidden_size": 16}))
    with pytest.raises(ConfigError, match="adapters"):
        dt.XLoraConfig(hidden_size=32, adapters={})
    dora = tmp_path / "dora"
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ConfigError, match="use_dora"):
        model.add_adapter("xl", dt.XLoraConfig(**_kwargs({"a": experts["0"], "b": str(dora)})))
    assert list(model.peft_config) == ["default"]  # the expert loaded first was removed again


def test_no_api_modifies_the_users_config(experts, tmp_path) -> None:
    """(``tests/test_config_immutability.py`` covers the other methods.) The stored config is a copy with
    ``hidden_size`` read from the model."""
    config = dt.XLoraConfig(**{**_kwargs(experts), "hidden_size": None})
    before = copy.deepcopy(config)
    model = dt.get_peft_model(tiny_llama(), config)
    assert config == before and model.peft_config["default"] is not config
    assert model.peft_config["default"].hidden_size == 32
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert config == before and loaded.peft_config["default"] is not config
    loaded.set_topk_lora(2)
    assert config == before and loaded.peft_config["default"].top_k_lora == 2


def test_inject_adapter_in_model_is_refused(experts) -> None:
    with pytest.raises(ConfigError, match="not a layer method"):
        dt.inject_adapter_in_model(dt.XLoraConfig(**_kwargs(experts)), tiny_llama())


def test_saved_experts_are_read_from_beside_the_adapter(experts, tmp_path) -> None:
    """Trained experts (use_trainable_adapters) saved in sub-folders are what loading uses (peft's documented
    intent); without them the paths in ``adapters`` are read."""
    model = dt.get_peft_model(tiny_llama(), dt.XLoraConfig(**_kwargs(experts, use_trainable_adapters=True))).eval()
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.v_proj.deltas["1"].lora_B.weight.add_(0.5)  # "trained"
    trained = _logits(model)
    model.save_pretrained(tmp_path / "all")
    torch.testing.assert_close(_logits(dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "all")), trained,
                               atol=0, rtol=0)
    model.save_pretrained(tmp_path / "alone", selected_adapters=["default"])
    original = _logits(dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "alone"))
    assert not torch.allclose(original, trained, atol=1e-3)


@pytest.mark.slow
def test_deltatune_train_trains_the_classifier(experts, tmp_path) -> None:
    from deltatune.train import TrainOptions, train
    from tests.train_utils import sentiment_records, write_jsonl, write_llama
    from transformers import AutoModelForCausalLM

    llama = write_llama(tmp_path / "llama")
    for name, targets in (("0", ["q_proj", "v_proj"]), ("1", ["o_proj", "down_proj"])):  # two different experts
        torch.manual_seed(int(name))
        dt.get_peft_model(AutoModelForCausalLM.from_pretrained(llama), dt.LoraConfig(
            r=4, target_modules=targets, init_lora_weights=False)).save_pretrained(tmp_path / name)
    options = TrainOptions(
        model=llama, data=write_jsonl(tmp_path / "data.jsonl", sentiment_records(16)), method="xlora",
        method_options={"adapters": {n: str(tmp_path / n) for n in "01"}, "xlora_depth": 2, "xlora_size": 8},
        lr=2e-2, epochs=2, batch_size=8, eval_split=8, eval_generate=0, save_steps=0, progress=False,
        out=str(tmp_path / "run"))
    result = train(options)
    assert result.after["eval_loss"] < result.before["eval_loss"]
    loaded = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "run" / "adapter")
    assert sorted(loaded.peft_config) == ["0", "1", "default"]

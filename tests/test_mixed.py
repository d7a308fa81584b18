"""``PeftMixedModel`` / ``get_peft_model(mixed=True)``: adapters of different methods active together, against peft
0.21.2's ``PeftMixedModel`` as the oracle. Each adapter is saved on its own by a single-method ``PeftModel`` and loaded
into both mixed models, as peft's guide does; composition order is the loading order (the first adapter innermost)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import deltatune as dt
from tests.adapter_utils import assert_clearly_different, assert_close_scaled, assert_same_state, logits, snapshot
from tests.models import make_causal_lm_inputs, tiny_llama

# One adapter per method, overlapping so that q_proj holds LoRA + LoHa + OFT and v_proj LoRA + LoKr + OFT.
CONFIGS = {
    "lora": ("LoraConfig", {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}),
    "loha": ("LoHaConfig", {"target_modules": ["q_proj", "k_proj"], "init_weights": False}),
    "lokr": ("LoKrConfig", {"target_modules": ["v_proj", "o_proj"], "init_weights": False}),
    "oft": ("OFTConfig", {"target_modules": ["q_proj", "v_proj"], "init_weights": False, "r": 8,
                          "oft_block_size": 0}),
    "oft2": ("OFTConfig", {"target_modules": ["v_proj"], "init_weights": False, "r": 4, "oft_block_size": 0}),
    "shira": ("ShiraConfig", {"target_modules": ["v_proj", "o_proj"], "r": 4}),
    "adalora": ("AdaLoraConfig", {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False,
                                  "total_step": 10}),
}
# peft 0.21.2 cannot wrap another adapter's layer in ShiRA ("SHiRA does not support nested base layers"): it comes
# first.
COMBOS = {"lora+loha": ["lora", "loha"], "lora+lokr+oft": ["lora", "lokr", "oft"],
          "shira+adalora+oft": ["shira", "adalora", "oft"]}


def _save(tmp_path: Path, name: str, writer: str) -> Path:
    """Adapter ``name`` (random weights, seeded per name) saved by a single-method PeftModel of ``writer``."""
    cls, kwargs = CONFIGS[name]
    lib = peft if writer == "peft" else dt
    torch.manual_seed(len(name))
    model = lib.get_peft_model(tiny_llama(), getattr(lib, cls)(**kwargs))
    with torch.no_grad():  # ShiRA starts at zero
        for key, param in model.named_parameters():
            if "shira_weight" in key:
                param.normal_()
    path = tmp_path / f"{writer}-{name}"
    model.save_pretrained(path)
    return path


def _mixed(lib, paths: dict[str, Path]):
    """A mixed model of ``lib`` with ``paths`` loaded in order, all active."""
    names = list(paths)
    model = lib.PeftMixedModel.from_pretrained(tiny_llama(), paths[names[0]], names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], name)
    model.set_adapter(names)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    tmp = tmp_path_factory.mktemp("mixed")
    return {(writer, name): _save(tmp, name, writer) for writer in ("peft", "dt") for name in CONFIGS}


@pytest.mark.parametrize("writer", ["peft", "dt"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_active_together_equal_peft_forward_and_generate(files, combo: str, writer: str) -> None:
    paths = {name: files[writer, name] for name in COMBOS[combo]}
    ours, theirs = _mixed(dt, paths), _mixed(peft, paths)
    inputs = make_causal_lm_inputs(ours)
    expected = logits(theirs, inputs)
    assert_close_scaled(logits(ours, inputs), expected)
    assert_clearly_different(expected, logits(tiny_llama(), inputs))
    for name in paths:  # every adapter counts: the mix is not any one of them alone
        ours.set_adapter(name)
        assert_clearly_different(logits(ours, inputs), expected, rel=1e-3)
    ours.set_adapter(list(paths)[::-1])  # the order named does not matter: the loading order composes
    assert_close_scaled(logits(ours, inputs), expected)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(**inputs, **kwargs), theirs.generate(**inputs, **kwargs))


def test_adapters_of_one_method_loaded_in_a_row_run_in_the_order_named(files) -> None:
    """Two OFT adapters loaded one after the other share one peft layer, which rotates in set_adapter's order."""
    paths = {name: files["dt", name] for name in ("lora", "oft", "oft2")}
    ours, theirs = _mixed(dt, paths), _mixed(peft, paths)
    inputs = make_causal_lm_inputs(ours)
    outputs = []
    for names in (["lora", "oft", "oft2"], ["oft2", "lora", "oft"]):
        ours.set_adapter(names)
        theirs.set_adapter(names)
        outputs.append(logits(theirs, inputs))
        assert_close_scaled(logits(ours, inputs), outputs[-1])
    assert_clearly_different(outputs[0], outputs[1], rel=1e-4)  # rotations do not commute


def test_oft_rotates_the_input_of_the_adapters_loaded_before_it(files) -> None:
    """On v_proj, OFT (loaded last, outermost) rotates what LoRA and LoKr see: W R x + ΔW R x, not W R x + ΔW x."""
    paths = {name: files["dt", name] for name in COMBOS["lora+lokr+oft"]}
    model = _mixed(dt, paths)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, layer.in_features)
    rotated = layer.deltas["oft"].transform_input(x)
    base = layer.base_layer
    expected = base(rotated) + rotated @ (layer.deltas["lora"].delta_weight(base)
                                          + layer.deltas["lokr"].delta_weight(base)).T
    with torch.no_grad():
        assert_close_scaled(layer(x), expected)


def test_merge_and_unload_equals_peft_and_the_unmerged_model(files) -> None:
    paths = {name: files["dt", name] for name in COMBOS["lora+lokr+oft"]}
    ours, theirs = _mixed(dt, paths), _mixed(peft, paths)
    ours.set_adapter(list(paths)[::-1])  # merged in the loading order (OFT last) whatever the order named
    inputs = make_causal_lm_inputs(ours)
    unmerged = logits(ours, inputs)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, dt.AdapterLayer) for m in merged.modules())
    assert_close_scaled(logits(merged, inputs), unmerged, rel=1e-4)
    assert_close_scaled(logits(merged, inputs), logits(theirs.merge_and_unload(), inputs), rel=1e-4)


def test_merging_an_input_transform_without_the_adapters_inside_it_is_refused(files) -> None:
    paths = {name: files["dt", name] for name in COMBOS["lora+lokr+oft"]}
    model = _mixed(dt, paths)
    inputs = make_causal_lm_inputs(model)
    expected, state = logits(model, inputs), snapshot(model)
    with pytest.raises(dt.AdapterStateError, match=r"q_proj: merging \['oft'\] without \['lora'\]"):
        model.merge_adapter(["oft"])
    assert_same_state(state, model)
    model.merge_adapter(["lora", "lokr"])  # the inner ones alone: OFT still rotates the merged weight's input
    assert_close_scaled(logits(model, inputs), expected, rel=1e-4)
    model.merge_adapter(["oft"])
    assert_close_scaled(logits(model, inputs), expected, rel=1e-4)


def test_disable_and_unload_give_the_base_model(files) -> None:
    paths = {name: files["dt", name] for name in COMBOS["lora+lokr+oft"]}
    model = _mixed(dt, paths)
    inputs = make_causal_lm_inputs(model)
    base = logits(tiny_llama(), inputs)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), base)
    assert_clearly_different(logits(model, inputs), base)
    assert torch.equal(logits(model.unload(), inputs), base)


def test_delete_one_adapter_equals_peft(files) -> None:
    paths = {name: files["peft", name] for name in COMBOS["lora+lokr+oft"]}
    ours, theirs = _mixed(dt, paths), _mixed(peft, paths)
    for model in (ours, theirs):
        model.set_adapter(["lora", "oft"])
    with pytest.raises(dt.AdapterStateError, match="no adapter named 'nope'"):
        ours.delete_adapter(["lokr", "nope"])  # every name is checked before any is deleted
    assert list(ours.peft_config) == ["lora", "lokr", "oft"]
    for model in (ours, theirs):
        model.delete_adapter("lokr")
    assert list(ours.peft_config) == ["lora", "oft"]
    assert not any("lokr" in n for n in ours.state_dict())
    inputs = make_causal_lm_inputs(ours)
    assert_close_scaled(logits(ours, inputs), logits(theirs, inputs))
    for model in (ours, theirs):  # an active adapter too, as peft: the other active one stays
        model.delete_adapter("lora")
    assert ours.active_adapters == ["oft"] == list(ours.peft_config)
    assert_close_scaled(logits(ours, inputs), logits(theirs, inputs))


def test_a_method_that_does_not_mix_is_refused_and_nothing_changes(files, tmp_path: Path) -> None:
    base = tiny_llama()
    before = snapshot(base)
    ia3 = dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(dt.ConfigError, match="IA3 adapters cannot be mixed"):
        dt.get_peft_model(base, ia3, mixed=True)
    with pytest.raises(ValueError, match="not compatible"):  # peft refuses it too
        peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj"]), mixed=True)
    assert_same_state(before, base)

    model = _mixed(dt, {name: files["dt", name] for name in COMBOS["lora+loha"]})
    inputs = make_causal_lm_inputs(model)
    expected, state = logits(model, inputs), snapshot(model)
    with pytest.raises(dt.ConfigError, match="PROMPT_TUNING adapters cannot be mixed"):
        model.add_adapter("prompt", dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    dt.get_peft_model(tiny_llama(), ia3).save_pretrained(tmp_path / "ia3")
    with pytest.raises(dt.ConfigError, match="IA3 adapters cannot be mixed"):
        model.load_adapter(tmp_path / "ia3", "ia3")
    assert list(model.peft_config) == ["lora", "loha"]
    assert_same_state(state, model)
    assert torch.equal(logits(model, inputs), expected)


def test_built_with_mixed_true_saves_each_adapter_for_peft(tmp_path: Path) -> None:
    """get_peft_model(mixed=True) + add_adapter; save_pretrained writes one ordinary directory per adapter, which
    peft's PeftMixedModel loads to the same outputs."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**CONFIGS["lora"][1]), adapter_name="lora", mixed=True)
    assert isinstance(model, dt.PeftMixedModel)
    model.add_adapter("loha", dt.LoHaConfig(**CONFIGS["loha"][1]))
    model.set_adapter(["lora", "loha"])
    assert all(p.requires_grad for n, p in model.named_parameters() if ".deltas." in n)
    model.save_pretrained(tmp_path, selected_adapters=["lora", "loha"])
    theirs = _mixed(peft, {"lora": tmp_path / "lora", "loha": tmp_path / "loha"})
    inputs = make_causal_lm_inputs(model)
    assert_close_scaled(logits(model, inputs), logits(theirs, inputs))
    model.set_adapter(["lora", "loha"], inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_mixed_model_mapping_lists_what_the_mixed_model_takes() -> None:
    """peft's table disagrees with its own PeftMixedModel (IA3 listed but refused, OFT taken but not listed); ours
    holds peft's COMPATIBLE_TUNER_TYPES, each key mapped to its method's tuner class."""
    from peft.tuners.mixed import COMPATIBLE_TUNER_TYPES

    assert {t.value for t in dt.PEFT_TYPE_TO_MIXED_MODEL_MAPPING} == {t.value for t in COMPATIBLE_TUNER_TYPES}
    assert dt.PEFT_TYPE_TO_MIXED_MODEL_MAPPING["LOHA"] is dt.LoHaModel
    assert "IA3" not in dt.PEFT_TYPE_TO_MIXED_MODEL_MAPPING and "IA3" in peft.PEFT_TYPE_TO_MIXED_MODEL_MAPPING

"""Poly / MHR (``deltatune.methods.poly``): each row's routed update against the formula written out, files and
outputs exchanged with peft 0.21.2 both ways (eval, and training with the same Gumbel-sigmoid draws and gradients),
peft's init properties, gradients only on the adapter, save/load, cached generation against full forwards with
``task_ids``, ``adapter_names`` rows, and the errors for missing or bad ``task_ids`` and for merging.

The shared matrix (``tests/cases/poly.py``) cannot run Poly: its forwards carry no ``task_ids``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import AdapterStateError, ConfigError, TargetError
from deltatune.rows import batch_tasks
from tests.adapter_utils import assert_same_state, logits, snapshot
from tests.models import (
    make_causal_lm_inputs,
    make_seq2seq_inputs,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_t5,
)
from tests.test_prompt_methods import GEN_FAMILIES, _check_cached_equals_loop

TASKS = torch.tensor([2, 0])
LLAMA = dict(task_type="CAUSAL_LM", r=4, n_tasks=3, n_skills=3, n_splits=2, init_weights=False,
             target_modules=["q_proj", "v_proj", "down_proj"])
T5 = dict(task_type="SEQ_2_SEQ_LM", r=4, n_tasks=3, n_skills=2, n_splits=2, init_weights=False,
          target_modules=["q", "v", "wo"])
CASES = {"llama": (tiny_llama, make_causal_lm_inputs, LLAMA), "t5": (tiny_t5, make_seq2seq_inputs, T5)}


def _poly(factory=tiny_llama, seed: int = 0, **kwargs) -> dt.PeftModel:
    torch.manual_seed(seed)
    return dt.get_peft_model(factory(), dt.PolyConfig(**{**LLAMA, **kwargs}))


@torch.no_grad()
def _distinct(model: dt.PeftModel, skills: float = 4.0) -> dt.PeftModel:
    """Router logits spread out (a fresh router's ±1e-3 routes every task alike) and larger skills, so that tasks,
    and the adapter, visibly change outputs and greedy tokens; seeded."""
    gen = torch.Generator().manual_seed(11)
    for name, param in model.named_parameters():
        if "module_logits" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 2)
        elif "poly_lora" in name:
            param.mul_(skills)
    return model


def _inputs(make_inputs, model) -> dict[str, torch.Tensor]:
    """The family's batch; its labels stay (T5 derives its decoder inputs from them; logits do not depend on them)."""
    return make_inputs(model)


def _routed(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's mixed ``(in, r)`` and ``(r, out)`` factors from its router logits ``z`` ``(q·s,)``, head by head."""
    q, s = a.shape[:2]
    w = torch.sigmoid(z).view(q, s)
    w = w / w.sum(-1, keepdim=True)
    a_t = torch.cat([sum(w[h, k] * a[h, k] for k in range(s)) for h in range(q)], dim=0)  # heads stack the inputs
    b_t = torch.cat([sum(w[h, k] * b[h, k] for k in range(s)) for h in range(q)], dim=1)  # and the outputs
    return a_t, b_t


def test_each_row_adds_its_tasks_routed_lora_written_out():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_mlp(), dt.PolyConfig(target_modules=["lin1"], r=4, n_tasks=3, n_skills=3,
                                                        n_splits=4, init_weights=False))
    layer = model.get_base_model().lin1
    delta = layer.deltas["default"]
    with torch.no_grad():
        delta.poly_router.module_logits.normal_()  # distinct routes per task
        x = torch.randn(5, 32)
        # two rows: a mixture per row; five rows of three tasks: each task's mixture built once and gathered
        for tasks in (torch.tensor([1, 2]), torch.tensor([1, 2, 1, 0, 2])):
            with batch_tasks(tasks):
                got = layer(x[: len(tasks)])
            for i, t in enumerate(tasks.tolist()):
                a_t, b_t = _routed(delta.poly_router.module_logits[t], delta.poly_lora_A, delta.poly_lora_B)
                want = layer.base_layer(x[i]) + x[i] @ a_t @ b_t / 4
                torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
        a_1, b_1 = _routed(delta.poly_router.module_logits[1], delta.poly_lora_A, delta.poly_lora_B)
        assert (got[1] - layer.base_layer(x[1]) - x[1] @ a_1 @ b_1 / 4).abs().max() > 1e-4  # task 2 is not task 1
    with pytest.raises(TypeError, match="needs task_ids"):  # a layer run outside a call that gives them
        layer(x)


@pytest.mark.parametrize("family", sorted(CASES))
def test_files_and_outputs_move_both_ways_with_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    factory, make_inputs, kwargs = CASES[family]
    ours = _poly(factory, seed=1, **kwargs)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "module_logits" in name:
                param.normal_()
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours")
    inputs = _inputs(make_inputs, ours)
    want = logits(ours, inputs, task_ids=TASKS)
    torch.testing.assert_close(logits(theirs, inputs, task_ids=TASKS), want, rtol=1e-5, atol=1e-5)
    assert (want - logits(factory(), inputs)).abs().max() > 1e-3

    torch.manual_seed(2)
    peft_model = peft.get_peft_model(factory(), peft.PolyConfig(**kwargs))
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = dt.PeftModel.from_pretrained(factory(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, inputs, task_ids=TASKS), logits(peft_model, inputs, task_ids=TASKS),
                               rtol=1e-5, atol=1e-5)
    ours_keys = {k: v.shape for k, v in load_file(tmp_path / "ours/adapter_model.safetensors").items()}
    theirs_keys = {k: v.shape for k, v in load_file(tmp_path / "theirs/adapter_model.safetensors").items()}
    assert ours_keys == theirs_keys
    assert any(k.endswith(".poly_router.module_logits") for k in ours_keys)
    our_config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs/adapter_config.json").read_text())
    assert set(our_config) <= set(their_config), set(our_config) - set(their_config)
    their_config["target_modules"] = sorted(their_config["target_modules"])
    assert {k: (v, their_config[k]) for k, v in our_config.items()
            if k not in ("auto_mapping", "target_modules") and their_config[k] != v} == {}
    assert sorted(our_config["target_modules"]) == their_config["target_modules"]


def test_training_draws_gradients_and_steps_equal_peft(tmp_path):
    """Training mode routes with relaxed Bernoulli samples: with the same seed both libraries draw the same ones,
    so loss and every adapter gradient agree (an eval-mode router here would differ)."""
    peft = pytest.importorskip("peft")
    ours = _poly(seed=3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    batch = make_causal_lm_inputs(ours)
    ours.train()
    theirs.train()
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(7)
        loss = model(**batch, task_ids=TASKS).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours.eval()
        assert (ours(**batch, task_ids=TASKS).loss - losses[0]).abs() > 1e-6  # the draws mattered
    grads = [{n.replace(".deltas.default", "").replace(".default", ""): p.grad
              for n, p in m.named_parameters() if p.requires_grad} for m in (ours, theirs)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 3 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fresh_adapter_is_the_base_model_and_init_follows_peft():
    model = _poly(init_weights=True)
    inputs = _inputs(make_causal_lm_inputs, model)
    assert torch.equal(logits(model, inputs, task_ids=TASKS), logits(tiny_llama(), inputs))
    delta = model.get_base_model().model.layers[0].mlp.down_proj.deltas["default"]
    a, b, z = delta.poly_lora_A, delta.poly_lora_B, delta.poly_router.module_logits
    assert a.shape == (2, 3, 64 // 2, 4) and b.shape == (2, 3, 4, 32 // 2) and z.shape == (3, 2 * 3)
    assert torch.equal(b, torch.zeros_like(b))
    bound = 1 / (64 // 2) ** 0.5  # nn.Linear's init of each (r, in/q) skill head: uniform in ±1/√fan_in
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert z.abs().max() <= 1e-3 and z.std() > 1e-4
    random_b = _poly().get_base_model().model.layers[0].mlp.down_proj.deltas["default"].poly_lora_B
    assert 0.8 * 4 ** -0.5 < random_b.abs().max() <= 4 ** -0.5


def test_gradients_reach_only_the_adapter_and_the_rows_tasks():
    model = _poly()
    loss = model(**make_causal_lm_inputs(model), task_ids=TASKS).loss
    loss.backward()
    for name, param in model.named_parameters():
        if ".deltas.default." in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
            if name.endswith("module_logits"):
                assert param.grad[1].abs().sum() == 0 and param.grad[[0, 2]].abs().min() > 0  # no row has task 1
        else:
            assert not param.requires_grad, name
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.PolyConfig(**LLAMA))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_save_load_round_trip_and_trainable_load(tmp_path):
    model = _poly(seed=4)
    inputs = _inputs(make_causal_lm_inputs, model)
    want = logits(model, inputs, task_ids=TASKS)
    config = dt.PolyConfig(**LLAMA)
    model.save_pretrained(tmp_path)
    assert config.target_modules == LLAMA["target_modules"]  # the user's config is not modified
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, inputs, task_ids=TASKS), want)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    trainable(**make_causal_lm_inputs(model), task_ids=TASKS).loss.backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_cached_generate_with_task_ids_equals_full_forward_loop(family, padded):
    factory, task = GEN_FAMILIES[family]
    kwargs = {**CASES[family][2], "task_type": task}
    model = _distinct(_poly(factory, seed=5, **kwargs), skills=4.0 if family == "llama" else 1.5)
    _check_cached_equals_loop(model, task == "SEQ_2_SEQ_LM", padded, positions=family == "llama", task_ids=TASKS)


def test_beams_repeat_each_rows_task_and_rows_generate_alone():
    model = _distinct(_poly(seed=6))
    ids = make_causal_lm_inputs(model, batch=2, seq=5)["input_ids"]
    kwargs = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        together = model.generate(input_ids=ids, task_ids=TASKS, **kwargs)
        alone = torch.cat([model.generate(input_ids=ids[i:i + 1], task_ids=TASKS[i:i + 1], **kwargs)
                           for i in range(2)])
        other = model.generate(input_ids=ids, task_ids=torch.tensor([1, 1]), **kwargs)
    assert torch.equal(together, alone)
    assert not torch.equal(together, other)


def test_adapter_names_rows_use_their_adapters_and_tasks():
    model = _distinct(_poly(seed=7))
    model.add_adapter("lora", dt.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    inputs = _inputs(make_causal_lm_inputs, model)
    ids = {k: v.repeat(2, 1) for k, v in inputs.items()}  # 4 rows: the two inputs, twice
    names, tasks = ["default", "lora", "default", "__base__"], torch.tensor([2, 0, 1, 0])
    mixed = logits(model, ids, adapter_names=names, task_ids=tasks)
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in ids.items()}
        if name == "__base__":
            with model.disable_adapter():
                want = logits(model, row)
        else:
            model.set_adapter(name)
            want = logits(model, row, task_ids=tasks[i:i + 1]) if name == "default" else logits(model, row)
        torch.testing.assert_close(mixed[i:i + 1], want, rtol=1e-5, atol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-4  # same input, another task
    with pytest.raises(TypeError, match="needs task_ids"):
        logits(model, ids, adapter_names=names)
    with pytest.raises(TypeError, match="takes none"):  # no Poly row: task_ids are read by nothing
        logits(model, ids, adapter_names=["lora", "__base__", "lora", "lora"], task_ids=tasks)


def test_bad_task_ids_merging_and_configs_are_refused_by_name():
    model = _poly()
    inputs = _inputs(make_causal_lm_inputs, model)
    with pytest.raises(TypeError, match="needs task_ids"):
        model(**inputs)
    with pytest.raises(TypeError, match="needs task_ids"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"must lie in \[0, 3\)"):
        model(**inputs, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 3\)"):
        model(**inputs, task_ids=torch.tensor([-1, 0]))
    with pytest.raises(ConfigError, match="one integer task index"):
        model(**inputs, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError, match="one integer task index"):
        model(**inputs, task_ids=torch.tensor(1))
    with pytest.raises(AdapterStateError, match="task_ids has 3 entries but the batch has 2 rows"):
        model(**inputs, task_ids=[0, 1, 2])
    with model.disable_adapter():  # the base model computes; the call's task_ids are not read
        assert torch.equal(logits(model, inputs, task_ids=TASKS), logits(tiny_llama(), inputs))
    before = snapshot(model)
    with pytest.raises(AdapterStateError, match="Poly adapters cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(AdapterStateError, match="Poly adapters cannot be merged"):
        model.merge_adapter()
    assert_same_state(before, model)
    lora = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="takes none"):
        lora(**inputs, task_ids=TASKS)
    with pytest.raises(TargetError, match="n_splits=3 must divide"):
        _poly(n_splits=3)
    with pytest.raises(TargetError):  # GPT-2's Conv1D is not a Linear (peft refuses it too)
        dt.get_peft_model(tiny_gpt2(), dt.PolyConfig(task_type="CAUSAL_LM", target_modules=["c_attn"]))
    for bad in (dict(n_tasks=0), dict(n_skills=-1), dict(r=1.5), dict(poly_type="mhr"), dict(init_weights="yes"),
                dict(layers_to_transform=[0])):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            dt.PolyConfig(**bad)


def test_serving_refuses_poly_adapters(tmp_path):
    from deltatune.serve import check_servable

    _poly().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="need task_ids"):
        check_servable(str(tmp_path))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_with_the_forwards_task_ids(reentrant):
    """Checkpointed layers run again in backward, after the forward's call returned: they still see its task_ids
    (and draw the same routing samples), so gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = _poly(seed=8)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        torch.manual_seed(9)
        model(**make_causal_lm_inputs(model), task_ids=TASKS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)

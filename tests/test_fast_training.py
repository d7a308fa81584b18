"""``PeftModel.enable_fast_training``: each part against the standard path it replaces.

* The chunked loss against transformers' own loss functions (``ForCausalLMLoss``: shift, ``ignore_index``,
  ``num_items_in_batch``, ``shift_labels``; T5's unshifted token mean), and at model level the loss and every adapter
  gradient against the same model without the switch, in float32 (rtol 1e-5: only the summation order differs).
* The bfloat16 base against the float32 model: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per
  stored value), and a 2-layer model compounds a few of those, so the loss is checked to 2% and the adapter
  gradients by direction (cosine similarity > 0.98) and size (norms within 10%); adapters stay float32 and saved
  files hold exactly the float32 model's tensors.
* Selective checkpointing recomputes the same numbers (rtol 1e-6) for only the chosen layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import deltatune as dt
from deltatune import fast
from deltatune.errors import ConfigError
from tests.models import (
    make_causal_lm_inputs, make_seq2seq_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_remote_code, tiny_t5,
)

FAMILIES = {
    "llama": (tiny_llama, make_causal_lm_inputs, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, make_causal_lm_inputs, "CAUSAL_LM"),
    "t5": (tiny_t5, make_seq2seq_inputs, "SEQ_2_SEQ_LM"),
}
METHODS = {
    "lora": lambda task: dt.LoraConfig(task_type=task, r=2, lora_alpha=4),
    "dora": lambda task: dt.LoraConfig(task_type=task, r=2, lora_alpha=4, use_dora=True),
    "ia3": lambda task: dt.IA3Config(task_type=task),
    "loha": lambda task: dt.LoHaConfig(task_type=task, r=2),
}


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every trainable parameter, so that no adapter is the identity and every gradient is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def _pair(family: str, method: str) -> tuple[nn.Module, nn.Module, dict]:
    make, inputs, task = FAMILIES[family]
    model = _perturbed(dt.get_peft_model(make(), METHODS[method](task))).train()
    batch = inputs(model.get_base_model(), batch=2, seq=7)
    batch["labels"][0, :3] = fast.IGNORE_INDEX  # a masked prompt
    return model, copy.deepcopy(model), batch


def _loss_and_grads(model: nn.Module, batch: dict, **extra) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in both models
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.loss.detach(), grads


# --- the loss function itself -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias,trained_head", [(False, False), (True, True)])
@pytest.mark.parametrize("items", [None, 5])
def test_chunked_loss_equals_transformers_causal_lm_loss(bias: bool, trained_head: bool, items: int | None) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(trained_head)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[1, :4] = labels[2, -1] = fast.IGNORE_INDEX
    num = None if items is None else torch.tensor(items)
    params = [hidden, *(p for p in head.parameters() if p.requires_grad)]

    ref = ForCausalLMLoss(head(hidden), labels, vocab_size=50, num_items_in_batch=num)
    ref_grads = torch.autograd.grad(ref, params)
    got = fast.linear_cross_entropy(head, hidden, labels, shift=True, num_items_in_batch=num, chunk_logits=200)
    got_grads = torch.autograd.grad(got, params)  # chunks of 4 rows: several, the last one partial

    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_chunked_loss_with_shift_labels_and_without_shift() -> None:
    torch.manual_seed(1)
    head = nn.Linear(8, 30, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 30, (2, 5))
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    ref = ForCausalLMLoss(head(hidden), labels, vocab_size=30, shift_labels=shifted)
    got = fast.linear_cross_entropy(head, hidden, labels, shift=True, shift_labels=shifted, chunk_logits=60)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    # seq2seq: labels line up with the positions; the plain token mean.
    ref = F.cross_entropy(head(hidden).reshape(-1, 30), labels.reshape(-1), ignore_index=-100)
    got = fast.linear_cross_entropy(head, hidden, labels, shift=False, chunk_logits=60)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(ref, hidden)[0],
                               rtol=1e-5, atol=1e-7)


def test_chunked_loss_refuses_label_ids_outside_the_vocabulary() -> None:
    head = nn.Linear(4, 10)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        fast.linear_cross_entropy(head, torch.randn(1, 3, 4), torch.tensor([[1, 2, 10]]), shift=True)


# --- the model with the switch ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,method", [
    ("llama", "lora"), ("llama", "dora"), ("llama", "ia3"), ("llama", "loha"), ("gpt2", "lora"), ("gpt2", "ia3"),
    ("t5", "lora"),
    ("t5", "ia3"),
])
def test_chunked_loss_gives_the_models_loss_and_adapter_gradients(family: str, method: str) -> None:
    fast_model, plain, batch = _pair(family, method)
    state = fast_model.enable_fast_training(compute_dtype=None)
    assert state.chunked_loss and fast_model.fast_training is state
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(fast_model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if family != "t5":  # num_items_in_batch: the sum over targets divided by it
        items = torch.tensor(3.0)
        ref_loss, ref_grads = _loss_and_grads(plain, batch, num_items_in_batch=items)
        loss, grads = _loss_and_grads(fast_model, batch, num_items_in_batch=items)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_chunked_loss_with_a_trained_lm_head(head: str) -> None:
    """An adapted head takes the checkpointed per-chunk path, a head trained in full the fused one with its grad."""
    if head == "lora":
        config = dt.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "lm_head"])
    else:
        config = dt.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    fast_model = _perturbed(dt.get_peft_model(tiny_llama(), config)).train()
    plain = copy.deepcopy(fast_model)
    batch = make_causal_lm_inputs(plain.get_base_model(), batch=2, seq=6)
    fast_model.enable_fast_training(compute_dtype=None, chunk_logits=300)
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(fast_model, batch)
    assert any("lm_head" in n for n in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_logits_are_none_in_training_and_returned_in_eval() -> None:
    model, plain, batch = _pair("llama", "lora")
    model.enable_fast_training(compute_dtype=None)
    assert model(**batch).logits is None
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits)
    model.eval()
    out = model(**batch)
    torch.testing.assert_close(out.logits, plain.eval()(**batch).logits)
    model.disable_fast_training()
    assert model.fast_training is None and model.train()(**batch).logits is not None


def test_a_short_training_run_follows_the_standard_one() -> None:
    """Five AdamW steps: the losses of the fast and the standard path stay within float32 rounding of each other."""
    fast_model, plain, batch = _pair("llama", "lora")
    fast_model.enable_fast_training(compute_dtype=None)
    losses = []
    for model in (plain, fast_model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(5):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]  # it trains
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


# --- bfloat16 base ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,method", [("llama", "lora"), ("llama", "dora"), ("gpt2", "ia3"), ("t5", "lora")])
def test_bfloat16_base_stays_close_to_float32_and_saves_the_same_file(family: str, method: str, tmp_path) -> None:
    model, plain, batch = _pair(family, method)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = model.enable_fast_training(compute_dtype="bf16")
    assert state.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert any(p.dtype == torch.bfloat16 for p in model.get_base_model().parameters())
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(model, batch)
    assert loss.dtype == torch.float32
    assert abs(float(loss) / float(ref_loss) - 1) < 2e-2
    for name, g in grads.items():
        r = ref_grads[name].flatten()
        assert g.dtype == torch.float32
        assert F.cosine_similarity(g.flatten(), r, dim=0) > 0.98, name
        assert abs(float(g.norm() / r.norm()) - 1) < 0.1, name
    model.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fast", "plain"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert all(torch.equal(p, adapter[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.disable_fast_training()
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- selective checkpointing ------------------------------------------------------------------------------------------

def test_checkpoint_every_second_layer_recomputes_the_same_gradients() -> None:
    model, plain, batch = _pair("llama", "lora")
    model.enable_fast_training(chunked_loss=False, compute_dtype=None, checkpoint_every=2)
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [False, True]
    recomputed = []
    layers[1].mlp.register_forward_pre_hook(lambda *_: recomputed.append(1))
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(model, batch)
    assert len(recomputed) == 2  # forward, and again in backward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _deep_llama(checkpoint_every: int | None = None) -> tuple[dt.PeftModel, dict]:
    """A 6-layer Llama with LoRA everywhere, and a training batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = dt.get_peft_model(LlamaForCausalLM(config), dt.LoraConfig(r=4, target_modules="all-linear"))
    model.enable_fast_training(compute_dtype=None, checkpoint_every=checkpoint_every)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def _held_after_forward(model: nn.Module, batch: dict) -> int:
    """Net bytes the CPU allocator handed out during a training forward and still holds at its end (what backward
    will read), from ``torch.profiler``'s allocation records: an account independent of autograd's saved tensors."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        outputs = model(**batch)
    total, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if isinstance(node.extra_fields, _ExtraFields_Allocation):
            total += node.extra_fields.alloc_size
    del outputs
    return total


def test_the_activation_profile_predicts_what_each_checkpointing_choice_holds() -> None:
    model, batch = _deep_llama()
    profile = fast.profile_activations(model, batch)
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert profile.static == sum(p.numel() * 4 for p in model.parameters()) + 3 * trained
    for every in (None, 3, 1):
        checkpointed, _ = _deep_llama(every)
        held = _held_after_forward(checkpointed, batch)
        # within 3% of the step's memory (parameters, gradients, AdamW state and activations)
        assert abs(profile.saved(every) - held) <= 0.03 * (profile.static + held), (every, profile.saved(every), held)
    assert profile.saved(None) > profile.saved(3) > profile.saved(1)


def test_a_memory_budget_takes_the_least_checkpointing_that_fits() -> None:
    model, batch = _deep_llama()
    profile = fast.profile_activations(model, batch)
    model.disable_fast_training()
    budget = profile.static + profile.saved(2) + 1  # every 2nd layer fits; every 3rd does not
    assert profile.static + profile.saved(3) > budget
    state = model.enable_fast_training(compute_dtype=None, memory_budget=budget, sample_batch=batch)
    assert state.checkpoint_every == 2
    assert [layer.gradient_checkpointing for layer in model.get_base_model().model.layers] == [False, True] * 3
    state = model.enable_fast_training(compute_dtype=None, memory_budget="1GiB", sample_batch=batch)
    assert state.checkpoint_every is None


def test_a_budget_too_small_for_any_checkpointing_is_refused_with_the_figures() -> None:
    model, batch = _deep_llama()
    model.disable_fast_training()
    before = {n: (p.dtype, p.detach().clone()) for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"memory_budget 0 MiB is too small .* it needs about \d"):
        model.enable_fast_training(compute_dtype="bf16", memory_budget=1000, sample_batch=batch)
    assert model.fast_training is None
    assert all(p.dtype == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.state_dict().items())


def test_memory_sizes_parse_as_people_write_them() -> None:
    assert fast.parse_bytes("6GiB", "b") == 6 * 2**30 and fast.parse_bytes("512 MiB", "b") == 512 * 2**20
    assert fast.parse_bytes("2GB", "b") == 2 * 10**9 and fast.parse_bytes(4096, "b") == 4096
    for bad in ("lots", "-1GiB", "0", "3 parsecs", 0, True):
        with pytest.raises(ConfigError, match="memory_budget must be a positive number of bytes"):
            fast.parse_bytes(bad, "memory_budget")


# --- choices and errors -----------------------------------------------------------------------------------------------

def test_auto_follows_the_hardware_and_the_model() -> None:
    model = dt.get_peft_model(
        tiny_remote_code(), dt.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
    state = model.enable_fast_training()
    assert not state.chunked_loss and any("chunked loss off" in n for n in state.notes)
    dtype, why = fast.fast_dtype(torch.device("cpu"))
    assert state.compute_dtype == dtype and (dtype is not None or any(why in n for n in state.notes))


@pytest.mark.parametrize("options,match", [
    ({"chunked_loss": True}, "chunked_loss=True"),
    ({"compute_dtype": "int8"}, "compute_dtype"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"chunk_logits": 0}, "chunk_logits"),
    ({"memory_budget": "lots"}, "memory_budget must be"),
    ({"memory_budget": "1GiB"}, "give sample_batch"),
    ({"sample_batch": {}}, "sample_batch is only read with memory_budget"),
])
def test_bad_options_raise_and_change_nothing(options: dict, match: str) -> None:
    model = dt.get_peft_model(tiny_bert(), dt.LoraConfig(task_type="SEQ_CLS", r=2))
    before = {n: (p.dtype, p.detach().clone()) for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        model.enable_fast_training(**{"compute_dtype": "bf16", **options})
    assert model.fast_training is None
    assert all(p.dtype == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.state_dict().items())
    with pytest.raises(TypeError):
        model.enable_fast_training(fuse_everything=True)


# --- deltatune train --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "t5"])
def test_train_runs_fast_by_default_and_no_fast_computes_the_same_run(family: str, tmp_path, capsys) -> None:
    from deltatune.train import TrainOptions, train
    from tests.train_utils import read_losses, sentiment_records, write_jsonl, write_llama, write_t5

    model_dir = (write_llama if family == "llama" else write_t5)(tmp_path / family)
    data = write_jsonl(tmp_path / "data.jsonl", sentiment_records(16))
    runs = {}
    for fast_on in (True, False):
        out = tmp_path / f"run-{fast_on}"
        train(TrainOptions(model=model_dir, data=data, r=4, target="all-linear", lr=1e-2, max_steps=3, batch_size=4,
                           eval_split=0, eval_generate=0, save_steps=0, progress=False, out=str(out), fast=fast_on))
        runs[fast_on] = read_losses(out), load_file(out / "adapter" / "adapter_model.safetensors")
    printed = capsys.readouterr()
    assert "fast training: chunked loss" in printed.out + printed.err
    (fast_losses, fast_adapter), (plain_losses, plain_adapter) = runs[True], runs[False]
    assert sorted(fast_losses) == sorted(plain_losses) == [1, 2, 3]
    for step in fast_losses:
        assert fast_losses[step][0] == pytest.approx(plain_losses[step][0], rel=1e-5)
    assert fast_adapter.keys() == plain_adapter.keys()
    for key in fast_adapter:
        torch.testing.assert_close(fast_adapter[key], plain_adapter[key], rtol=1e-3, atol=1e-5)  # Adam: ~1e-2 steps


def test_train_fits_a_memory_budget_by_checkpointing_and_refuses_it_without_the_fast_path(tmp_path, capsys) -> None:
    from deltatune.train import TrainError, TrainOptions, train
    from tests.train_utils import read_losses, sentiment_records, write_jsonl, write_llama

    model_dir = write_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "data.jsonl", sentiment_records(8))
    options = dict(model=model_dir, data=data, r=4, target="all-linear", max_steps=2, batch_size=4, eval_split=0,
                   eval_generate=0, save_steps=0, progress=False)
    train(TrainOptions(**options, out=str(tmp_path / "run"), memory_budget="64MiB"))
    assert "checkpointing" not in capsys.readouterr().out  # a tiny model fits 64 MiB without any
    assert sorted(read_losses(tmp_path / "run")) == [1, 2]
    with pytest.raises(TrainError, match="memory_budget 0 MiB is too small"):
        train(TrainOptions(**options, out=str(tmp_path / "small"), memory_budget="1KiB"))
    for bad, match in [({"fast": False}, "--memory-budget chooses the layers"), ({"memory_budget": "x"}, "size like")]:
        with pytest.raises(TrainError, match=match):
            TrainOptions(**{**options, "memory_budget": "1GiB", **bad}, out=str(tmp_path / "bad"))

"""Activated LoRA (``LoraConfig.alora_invocation_tokens``, arXiv:2504.12397): the update applies from the last
occurrence of the invocation tokens on; peft 0.21.2 is the oracle for files, offsets and outputs."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.errors import AdapterStateError, ConfigError, TargetError
from deltatune.methods.alora import invocation_offsets
from deltatune.prompt import cache_argument
from tests.models import tiny_gpt2, tiny_llama

INVOKE = [5, 6]
# Row 0 invokes at position 3, row 1 at 0 and again at 4 (the last counts), row 2 never; length 8.
IDS = torch.tensor([[9, 8, 7, 5, 6, 10, 11, 12],
                    [5, 6, 3, 4, 5, 6, 13, 14],
                    [3, 4, 7, 8, 9, 10, 11, 6]])
STARTS = [3, 4, None]


def _config(**kwargs) -> dict:
    return dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=INVOKE,
                init_lora_weights=False, **kwargs)


def _alora(model=None, **kwargs) -> dt.PeftModel:
    torch.manual_seed(0)
    return dt.get_peft_model(model or tiny_llama(), dt.LoraConfig(**_config(**kwargs)))


def _base_logits(ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama()(input_ids=ids, **kwargs).logits


def test_offsets_count_from_the_end_to_the_last_invocation_per_row() -> None:
    expected = [0 if s is None else IDS.shape[1] - s for s in STARTS]
    assert invocation_offsets(IDS, INVOKE).tolist() == expected == [5, 4, 0]
    assert invocation_offsets(IDS, [6]).tolist() == [4, 3, 1]  # a one-token invocation; the last position counts
    assert invocation_offsets(IDS[:, :1], INVOKE).tolist() == [0, 0, 0]  # shorter than the invocation


def test_tokens_before_the_invocation_see_the_base_model_exactly() -> None:
    model = _alora()
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    base = _base_logits(IDS)
    for row, start in enumerate(STARTS):
        before = IDS.shape[1] if start is None else start
        torch.testing.assert_close(out[row, :before], base[row, :before], rtol=0, atol=0)
        if start is not None:  # from the invocation on, the adapter acts
            assert (out[row, start:] - base[row, start:]).abs().amax(-1).min() > 1e-3
    # the same rows one at a time give the same result: offsets are per row
    for row in range(len(IDS)):
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS[row:row + 1]).logits[0], out[row], rtol=1e-5, atol=1e-6)


def test_peft_interop_both_ways(tmp_path) -> None:
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**_config())).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - _base_logits(IDS)).abs().max() > 1e-3  # the comparison covers the adapter's effect
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == INVOKE
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
        # cached generation with peft as the oracle (its offsets are the prompt's, as here)
        torch.testing.assert_close(ours.generate(input_ids=IDS, max_new_tokens=4, do_sample=False),
                                   back.generate(input_ids=IDS, max_new_tokens=4, do_sample=False))


def test_cached_generate_equals_a_loop_of_full_forwards() -> None:
    model = _alora()
    ids = IDS[:2]
    generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    loop = ids
    with torch.no_grad():
        for _ in range(5):
            loop = torch.cat([loop, model(input_ids=loop, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert invocation_offsets(loop, INVOKE).tolist() == [5 + 5, 4 + 5]  # no new invocation in what was generated
    torch.testing.assert_close(generated, loop)


def test_the_base_models_kv_cache_before_the_invocation_can_be_reused() -> None:
    """The paper's point: prefill the shared context with the base model once, then run the adapter on it."""
    model = _alora()
    context, rest = IDS[:1, :3], IDS[:1, 3:]  # rest starts with the invocation
    with torch.no_grad():
        base = tiny_llama()
        cache = base(input_ids=context, use_cache=True).past_key_values
        continued = model(input_ids=rest, use_cache=True, **{cache_argument(base): cache}).logits
        full = model(input_ids=IDS[:1]).logits
    torch.testing.assert_close(continued, full[:, 3:], rtol=1e-5, atol=1e-5)


def test_mixed_batch_rows_use_their_own_adapters_invocation() -> None:
    model = _alora()
    model.add_adapter("other", dt.LoraConfig(**{**_config(), "alora_invocation_tokens": [7]}))
    model.add_adapter("plain", dt.LoraConfig(**{**_config(), "alora_invocation_tokens": None}))
    names = ["default", "other", "plain"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
        for row, name in enumerate(names):
            model.set_adapter(name)
            alone = model(input_ids=IDS[row:row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], alone, rtol=1e-5, atol=1e-5)
    # "other" is invoked by token 7 at position 2 of row 1: the base model before it
    torch.testing.assert_close(mixed[1, :2], _base_logits(IDS)[1, :2], rtol=0, atol=0)


def test_explicit_offsets_and_a_missing_invocation_behave_as_peft() -> None:
    model = _alora()
    with torch.no_grad():
        found = model(input_ids=IDS).logits
        torch.testing.assert_close(model(input_ids=IDS, alora_offsets=[5, 4, None]).logits, found, rtol=0, atol=0)
        # only embeddings: no invocation to find, the adapter is not applied (peft warns the same)
        embeds = model.get_base_model().get_input_embeddings()(IDS)
        with pytest.warns(UserWarning, match="no input_ids"):
            out = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(out, _base_logits(IDS), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no adapter of this model has alora_invocation_tokens"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))(input_ids=IDS, alora_offsets=[1])


@pytest.mark.parametrize(("kwargs", "names"), [
    (dict(use_dora=True), "use_dora"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(task_type="SEQ_CLS"), "task_type"),
    (dict(target_modules=[], target_parameters=["q_proj.weight"]), "target_parameters"),
    (dict(alora_invocation_tokens=[]), "non-empty"),
])
def test_combinations_peft_refuses_are_refused_by_name(kwargs, names) -> None:
    with pytest.raises(ConfigError, match=names) as error:
        dt.LoraConfig(**{**_config(), **kwargs})
    assert "alora_invocation_tokens" in str(error.value)


def test_layers_other_than_linear_are_refused_and_merging_too() -> None:
    model = tiny_gpt2()
    with pytest.raises(TargetError, match="alora_invocation_tokens supports Linear and Conv1D"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["wte"], alora_invocation_tokens=INVOKE))
    adapted = dt.get_peft_model(model, dt.LoraConfig(target_modules=["c_attn"], alora_invocation_tokens=INVOKE))
    with pytest.raises(AdapterStateError, match="aLoRA"):
        adapted.merge_adapter()
    with pytest.raises(AdapterStateError, match="aLoRA"):
        adapted.merge_and_unload()
    assert not adapted.base_model.model.transformer.h[0].attn.c_attn.merged


def test_gradients_equal_with_gradient_checkpointing() -> None:
    """Checkpointed layers are recomputed in backward, after the call: they must see the same invocation."""
    grads = []
    for checkpointing in (False, True):
        model = _alora()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_serving_refuses_an_activated_lora(tmp_path) -> None:
    from deltatune.serve import check_servable

    _alora().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="activated LoRA"):
        check_servable(str(tmp_path))

"""Adaption prompts (LLaMA-Adapter): the layer's output against the formula written out, the top-layer selection,
and what is refused. Interop with peft and the shared properties run in the matrix (``tests/cases/adaption_prompt.py``);
cached generation against full forwards in ``tests/test_prompt_methods.py``."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

import deltatune as dt
from deltatune import AdapterStateError, ConfigError, TargetError
from deltatune.layers import AdapterLayer
from tests.models import make_causal_lm_inputs, tiny_bert, tiny_gpt2, tiny_llama


def _open_gates(model: dt.PeftModel, value: float = 0.8) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(value)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def test_llama_layer_adds_the_gated_prompt_attention_written_out():
    """out = attn(x) + o_proj(g · softmax(q Kₚᵀ/√d) Vₚ); q rotated; Kₚ, Vₚ: 2 kv heads shared by 4 query heads."""
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    _open_gates(model, 0.6)
    layer = model.get_base_model().model.layers[1].self_attn
    assert isinstance(layer, AdapterLayer)
    assert not isinstance(model.get_base_model().model.layers[0].self_attn, AdapterLayer)  # the top layer only
    seen = {}
    hook = layer.base_layer.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs=kwargs, out=out[0]), with_kwargs=True)
    ids = make_causal_lm_inputs(model)["input_ids"]
    got = {}
    outer = layer.register_forward_hook(lambda m, a, k, out: got.update(out=out[0]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove(), outer.remove()
    attn, delta = layer.base_layer, layer.deltas["default"]
    x, (cos, sin) = seen["kwargs"]["hidden_states"], seen["kwargs"]["position_embeddings"]
    B, S, _ = x.shape
    q = attn.q_proj(x).view(B, S, 4, 8).transpose(1, 2)  # (B, 4, S, 8)
    q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
    prompt = delta.adaption_prompt[0]  # (3, 32)
    k = attn.k_proj(prompt).view(3, 2, 8).permute(1, 0, 2)  # (2, 3, 8)
    v = attn.v_proj(prompt).view(3, 2, 8).permute(1, 0, 2)
    with torch.no_grad():
        heads = []
        for h in range(4):
            kv = h // 2  # query heads 0,1 read kv head 0; 2,3 read kv head 1
            weights = torch.softmax(q[:, h] @ k[kv].T / math.sqrt(8), dim=-1)  # (B, S, 3)
            heads.append(0.6 * weights @ v[kv])  # (B, S, 8)
        want = seen["out"] + attn.o_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got["out"], want, atol=1e-6, rtol=1e-6)


def test_top_layers_are_selected_and_too_many_is_refused():
    model = dt.get_peft_model(tiny_gpt2(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    keys = sorted(model.adapter_state_dict())
    assert keys == ["base_model.model.transformer.h.1.attn.adaption_gate",
                    "base_model.model.transformer.h.1.attn.adaption_prompt"]
    with pytest.raises(TargetError, match="adapter_layers=3 but LlamaForCausalLM has 2 modules named 'self_attn'"):
        dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(TargetError, match="model types"):
        dt.get_peft_model(tiny_bert("seq_cls"), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


def test_an_o_proj_bias_is_added_once_so_a_fresh_adapter_is_the_base_model():
    reference = tiny_llama()
    config = reference.config
    config.attention_bias = True
    torch.manual_seed(3)
    base = LlamaForCausalLM(config).eval()
    inputs = make_causal_lm_inputs(base)
    with torch.no_grad():
        want = base(**inputs).logits
        model = dt.get_peft_model(base, dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
        assert torch.equal(model(**inputs).logits, want)


def test_two_adapters_switch_and_disable():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    model.add_adapter("other", dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    _open_gates(model)
    inputs = make_causal_lm_inputs(model)
    with torch.no_grad():
        first = model(**inputs).logits
        model.set_adapter("other")
        second = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    assert not torch.allclose(first, second) and not torch.allclose(second, base)
    assert torch.equal(base, tiny_llama()(**inputs).logits)


def test_merging_mixed_batches_and_serving_are_refused_and_bad_configs_named(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(AdapterStateError, match="adaption prompts cannot be merged"):
        model.merge_and_unload()
    inputs = make_causal_lm_inputs(model)
    with pytest.raises(AdapterStateError, match="mixed-adapter batches"):
        model(**inputs, adapter_names=["default", "__base__"])
    gpt2 = dt.get_peft_model(tiny_gpt2(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(AdapterStateError, match="mixed-adapter batches"):
        gpt2(**make_causal_lm_inputs(gpt2), adapter_names=["default", "__base__"])
    model.save_pretrained(tmp_path)
    from deltatune.serve import check_servable

    with pytest.raises(ConfigError, match="ADAPTION_PROMPT adapters cannot be batched per row"):
        check_servable(str(tmp_path))
    with pytest.raises(ConfigError, match="adapter_len"):
        dt.AdaptionPromptConfig(adapter_layers=1)
    with pytest.raises(ConfigError, match="one module name"):
        dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules=["self_attn"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, modules_to_save=["lm_head"])


@pytest.mark.slow
def test_deltatune_train_trains_an_adaption_prompt(tmp_path):
    """``deltatune train --method adaption_prompt --method-option adapter_len=4 ...``: the gates open and the loss
    falls; the saved adapter is peft's format."""
    from deltatune.train import TrainOptions, train
    from tests.train_utils import sentiment_records, write_jsonl, write_llama

    options = TrainOptions(
        model=write_llama(tmp_path / "llama"), data=write_jsonl(tmp_path / "d.jsonl", sentiment_records(16)),
        method="adaption_prompt", method_options={"adapter_len": 4, "adapter_layers": 2}, lr=5e-2, epochs=2,
        batch_size=8, eval_split=8, eval_generate=0, save_steps=0, progress=False, out=str(tmp_path / "run"),
    )
    result = train(options)
    assert result.after["eval_loss"] < result.before["eval_loss"]
    loaded = dt.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "llama"),
                                          tmp_path / "run" / "adapter")
    gates = [p.item() for n, p in loaded.named_parameters() if n.endswith("adaption_gate")]
    assert len(gates) == 2 and all(g != 0 for g in gates)

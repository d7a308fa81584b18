"""LoRA's ``trainable_token_indices``: trainable embedding rows inside a LoRA adapter (peft's TrainableTokensWrapper).

Interop with peft (keys, outputs, both ways; GPT-2's tied head) runs in tests/test_interop_peft.py.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from tests.models import make_causal_lm_inputs, tiny_gpt2, tiny_llama

TOKENS = [1, 3]


def _inputs(model) -> dict[str, torch.Tensor]:
    inputs = make_causal_lm_inputs(model)
    inputs["input_ids"][:, :2] = torch.tensor(TOKENS)  # listed tokens first, then random ones
    return inputs


def test_only_the_listed_rows_train_and_change_only_their_tokens() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    embed = model.get_base_model().model.embed_tokens
    rows = embed.deltas["default"].token_adapter.trainable_tokens_delta
    assert rows.shape == (2, 32) and rows.requires_grad and not embed.base_layer.weight.requires_grad
    base = embed.base_layer.weight.detach().clone()
    torch.testing.assert_close(rows.detach(), base[TOKENS])  # a fresh adapter is the base model
    model.train()
    model(**_inputs(model)).loss.backward()
    assert rows.grad.abs().sum() > 0
    with torch.no_grad():
        rows.add_(1.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = base[ids[0]].clone()
    expected[[0, 2]] += 1.0
    torch.testing.assert_close(embed(ids)[0], expected)  # rows 1 and 3 replaced, 2 and 4 the base's


def test_a_tied_head_follows_the_rows_and_stays_tied_through_merge() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"], trainable_token_indices=TOKENS))
    gpt2 = model.get_base_model()
    rows = gpt2.transformer.wte.deltas["default"].token_adapter.trainable_tokens_delta
    assert gpt2.lm_head.deltas["default"].token_adapter.trainable_tokens_delta is rows
    with torch.no_grad():
        rows.mul_(2.0)
    hidden = torch.randn(1, 4, 32)
    logits = gpt2.lm_head(hidden)
    weight = gpt2.lm_head.base_layer.weight.detach().clone()
    weight[TOKENS] = rows.detach()
    torch.testing.assert_close(logits, hidden @ weight.T)
    inputs = _inputs(model)
    unmerged = model(**inputs).logits
    model.merge_adapter()
    assert gpt2.lm_head.base_layer.weight is gpt2.transformer.wte.base_layer.weight
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_two_adapters_keep_their_own_rows() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS,
                                                          init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(target_modules=["v_proj"], trainable_token_indices=[2]))
    embed = model.get_base_model().model.embed_tokens
    with torch.no_grad():
        embed.deltas["other"].token_adapter.trainable_tokens_delta.fill_(5.0)
    ids = torch.tensor([[1, 2]])
    model.set_adapter("other")
    assert torch.all(embed(ids)[0, 1] == 5.0)
    model.set_adapter("default")
    torch.testing.assert_close(embed(ids)[0, 1], embed.base_layer.weight[2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_modules=["q_proj", "embed_tokens"]), "one kind of delta"),
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), "modules_to_save"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"lm_head": TOKENS}), "nn.Embedding"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"nope": TOKENS}), "matches no module"),
        (dict(target_modules=["q_proj"], trainable_token_indices=[1, 500]), r"\[500\] are beyond"),
    ],
)
def test_targets_peft_refuses_are_refused_and_the_model_is_untouched(kwargs, match) -> None:
    model = tiny_llama()
    config = {"trainable_token_indices": TOKENS, **kwargs}
    with pytest.raises(TargetError, match=match):
        dt.get_peft_model(model, dt.LoraConfig(**config))
    assert not any(isinstance(m, dt.layers.AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("bad", [[], [1, 1], [-1], {"embed_tokens": []}])
def test_bad_indices_are_refused_by_name(bad) -> None:
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        dt.LoraConfig(trainable_token_indices=bad)


def test_ensure_weight_tying_keeps_token_rows_tied() -> None:
    """(LoRA factors and modules_to_save copies of tied layers: tests/test_weight_tying.py.)"""
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"], trainable_token_indices=TOKENS,
                                                         ensure_weight_tying=True))
    gpt2 = model.get_base_model()
    assert (gpt2.lm_head.deltas["default"].token_adapter.trainable_tokens_delta
            is gpt2.transformer.wte.deltas["default"].token_adapter.trainable_tokens_delta)

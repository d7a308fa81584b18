"""Adapters on a scaled embedding (Gemma's ``GemmaTextScaledWordEmbedding``: ``embed_scale · W[x]``, with
``embed_scale = sqrt(hidden)``): the update's rows are scaled too, where peft 0.21.2 scales them (LoRA, DoRA and
MiCA on embeddings, X-LoRA's per-token weighting, trainable tokens), so unmerged equals merged and equals peft."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM

import deltatune as dt
from deltatune.methods.common import embed_scale
from tests.adapter_utils import logits, trainable_by_peft_name
from tests.models import make_causal_lm_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes on saving embedding layers

HIDDEN = 16
TOKENS = [3, 5]


def tiny_gemma(seed: int = 0) -> GemmaForCausalLM:
    """1-layer Gemma with an untied head; its input embedding scales rows by ``sqrt(16) = 4``."""
    config = GemmaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(seed)
    model = GemmaForCausalLM(config).to(torch.float32).eval()
    assert float(model.model.embed_tokens.embed_scale) == math.sqrt(HIDDEN)  # the premise of every test here
    return model


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    inputs = make_causal_lm_inputs(model)
    inputs["input_ids"][:, :2] = torch.tensor(TOKENS)  # trainable-token rows among random ones
    return inputs


CONFIGS = {
    "lora": lambda: dt.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False),
    "dora": lambda: dt.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True, init_lora_weights=False),
    "trainable_tokens": lambda: dt.TrainableTokensConfig(token_indices=TOKENS, init_weights=False),
    "lora_tokens": lambda: dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS,
                                         init_lora_weights=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scaled_embedding_adapter_equals_peft_and_its_merge(name: str, tmp_path: Path) -> None:
    ours = dt.get_peft_model(tiny_gemma(), CONFIGS[name]())
    delta = ours.get_base_model().model.embed_tokens.deltas["default"]
    with torch.no_grad():
        if name == "dora":  # a magnitude away from its initial norm, so the rescaling shows
            delta.lora_magnitude_vector.mul_(1.5)
        if name == "lora_tokens":  # rows away from the base rows they start as
            delta.token_adapter.trainable_tokens_delta.add_(1.0)
    inputs = _inputs(ours)
    unmerged = logits(ours, inputs)
    assert not torch.allclose(unmerged, logits(tiny_gemma(), inputs), atol=1e-3)  # the adapter does something
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gemma(), tmp_path, is_trainable=True)
    torch.testing.assert_close(unmerged, logits(theirs, inputs))
    for model in (ours, theirs):  # the backward through the scaled rows too
        model(**inputs).loss.backward()
    mine = trainable_by_peft_name(ours)
    peft_params = {k.replace("vector.weight", "vector"): p for k, p in trainable_by_peft_name(theirs).items()}
    assert mine.keys() == peft_params.keys()
    for key, param in mine.items():
        torch.testing.assert_close(param.grad, peft_params[key].grad, msg=key)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), unmerged, atol=1e-4, rtol=1e-4)


def test_lora_embedding_output_is_the_scale_times_base_plus_update() -> None:
    model = dt.get_peft_model(tiny_gemma(), dt.LoraConfig(target_modules=["embed_tokens"], r=4, lora_alpha=8,
                                                          init_lora_weights=False))
    layer = model.get_base_model().model.embed_tokens
    delta = layer.deltas["default"]
    weight, a, b = layer.base_layer.weight.detach(), delta.lora_embedding_A.detach(), delta.lora_embedding_B.detach()
    ids = torch.tensor([[0, 7, 63, 7]])
    one_hot = nn.functional.one_hot(ids, 64).float()  # (1, 4, vocab)
    expected = math.sqrt(HIDDEN) * (one_hot @ weight + 2.0 * one_hot @ (b @ a).T)  # scaling = 8 / 4
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), expected)
        # X-LoRA's per-token weighting scales the same rows (peft applies embed_scale there too)
        weights = torch.rand(1, 4, 1)
        base_out = layer.base_layer(ids)
        weighted = delta.weighted_forward(ids, base_out.clone(), layer.base_layer, weights)
        update = math.sqrt(HIDDEN) * 2.0 * one_hot @ (b @ a).T
        torch.testing.assert_close(weighted, base_out + weights * update)


def test_mixed_batch_equals_peft(tmp_path: Path) -> None:
    config = dict(target_modules=["embed_tokens"], init_lora_weights=False)
    ours = dt.get_peft_model(tiny_gemma(), dt.LoraConfig(**config))
    ours.add_adapter("other", dt.LoraConfig(**config, r=4))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gemma(), tmp_path)
    theirs.load_adapter(tmp_path / "other", "other")
    inputs = _inputs(ours)
    rows = ["other", "default"]
    torch.testing.assert_close(logits(ours, inputs, adapter_names=rows), logits(theirs, inputs, adapter_names=rows))


class _Scaled(nn.Embedding):
    def __init__(self, scale: object) -> None:
        super().__init__(8, 4)
        self.embed_scale = scale


@pytest.mark.parametrize("scale, expected", [(2, 2.0), (0.5, 0.5), (torch.tensor(3.0), 3.0), (torch.tensor([3.0]), 3.0),
                                             (None, None), ("2", None)])
def test_embed_scale_is_read_as_peft_reads_it(scale: object, expected: float | None) -> None:
    found = embed_scale(_Scaled(scale) if scale is not None else nn.Embedding(8, 4))
    assert (found is None) if expected is None else float(found) == expected


def test_an_embed_scale_of_several_values_is_not_applied_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="not one value"):
        assert embed_scale(_Scaled(torch.ones(4))) is None

"""Trainable tokens (``deltatune.methods.trainable_tokens``) against independent computations: which rows train,
tied heads reading the trained rows, merge and unmerge, and the config's refusals. The shared matrix and the peft
interchange are in ``tests/cases/trainable_tokens.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.layers import AdapterLayer
from tests.adapter_utils import assert_mixed_batch_equals_each_row_alone, logits, snapshot
from tests.models import make_causal_lm_inputs, tiny_gpt2, tiny_llama

TOKENS = [13, 47, 55, 61]  # in make_causal_lm_inputs' seeded ids before the last position (so they get a gradient)


def _embedding_table(model) -> torch.Tensor:
    """The input embedding's weight as the model sees it now (merged or not, through any wrapper)."""
    return model.get_base_model().get_input_embeddings().weight


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["untied", "tied"])
def test_a_training_step_changes_only_the_listed_rows(factory) -> None:
    base_table = factory().get_input_embeddings().weight.detach().clone()
    model = dt.get_peft_model(factory(), dt.TrainableTokensConfig(token_indices=TOKENS))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.endswith("deltas.default.trainable_tokens_delta")
    ]
    before = snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**make_causal_lm_inputs(model)).loss.backward()
    optimizer.step()
    for name, value in before.items():  # nothing but the trained rows moved
        if not name.endswith("trainable_tokens_delta"):
            assert torch.equal(dict(model.named_parameters(remove_duplicate=False)).get(name, value), value), name
    model.merge_adapter()
    merged = _embedding_table(model).detach()
    others = [i for i in range(merged.shape[0]) if i not in TOKENS]
    assert torch.equal(merged[others], base_table[others])
    assert (merged[TOKENS] - base_table[TOKENS]).abs().amax(dim=1).min() > 0  # every listed row trained


def test_a_tied_head_scores_the_listed_tokens_with_the_trained_rows() -> None:
    """GPT-2's head is tied to ``wte``: its logits equal ``h · Wᵀ`` with ``W`` the table whose listed rows are the
    adapter's, computed here by hand from the hidden states."""
    model = dt.get_peft_model(tiny_gpt2(), dt.TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    inputs = make_causal_lm_inputs(model)
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (B, L, dim), after the final norm
    rows = model.base_model.model.transformer.wte.deltas["default"].trainable_tokens_delta
    table = tiny_gpt2().get_input_embeddings().weight.detach().clone()
    table[TOKENS] = rows.detach()
    torch.testing.assert_close(out.logits, F.linear(hidden, table))
    lm_head = model.base_model.model.lm_head
    assert isinstance(lm_head, AdapterLayer) and lm_head.deltas["default"].trainable_tokens_delta is rows


def test_the_embedding_output_of_a_listed_token_is_its_trained_row() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    embed = model.get_base_model().model.embed_tokens
    ids = torch.tensor([[13, 8, 61, 0]])
    rows = embed.deltas["default"].trainable_tokens_delta
    expected = embed.base_layer.weight[ids].clone()
    expected[0, 0], expected[0, 2] = rows[0], rows[3]
    assert torch.equal(embed(ids), expected)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["untied", "tied"])
def test_merge_writes_the_rows_and_unmerge_restores_them(factory) -> None:
    model = dt.get_peft_model(factory(), dt.TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    inputs = make_causal_lm_inputs(model)
    expected, table = logits(model, inputs), _embedding_table(model).detach().clone()
    model.merge_adapter()
    rows = next(m for n, m in model.named_modules() if n.endswith("deltas.default")).trainable_tokens_delta
    assert torch.equal(_embedding_table(model)[TOKENS], rows.detach())
    torch.testing.assert_close(logits(model, inputs), expected)
    model.unmerge_adapter()
    assert torch.equal(_embedding_table(model), table)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), expected)
    if factory is tiny_gpt2:
        assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied after unloading


def test_mixed_batches_route_rows_to_their_adapter_through_the_tied_head() -> None:
    model = dt.get_peft_model(tiny_gpt2(), dt.TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    model.add_adapter("other", dt.TrainableTokensConfig(token_indices=[7, 9], init_weights=False))
    model.eval()
    assert_mixed_batch_equals_each_row_alone(model, make_causal_lm_inputs(model, 3), ["default", "other", "__base__"])


@pytest.mark.parametrize(
    ("indices", "match"),
    [([], "non-empty"), ([3, -1], "non-negative"), ([3, 3], "twice: \\[3\\]"), ([1.5], "non-negative integers")],
)
def test_bad_token_indices_are_refused(indices, match) -> None:
    with pytest.raises(dt.ConfigError, match=match):
        dt.TrainableTokensConfig(token_indices=indices)


def test_a_token_beyond_the_vocabulary_is_refused_before_the_model_changes() -> None:
    model = tiny_llama()
    with pytest.raises(dt.TargetError, match=r"token_indices \[500\] are beyond its 128 embeddings"):
        dt.get_peft_model(model, dt.TrainableTokensConfig(token_indices=[3, 500]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())

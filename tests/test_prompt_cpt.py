"""Context-aware prompt tuning (CPT): training follows peft's step for step (projection, gradient mask, weighted
loss; peft 0.21.2 is the oracle), files move both ways, the projection's balls and frozen label tokens hold, cached
generation equals full forwards, and bad input is named."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import deltatune as dt
from deltatune import ConfigError
from tests.models import make_causal_lm_inputs, tiny_llama
from tests.test_prompt_methods import GEN_FAMILIES, _check_cached_equals_loop

KW = dict(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7, 8, 9, 10], cpt_tokens_type_mask=[1, 2, 3, 4, 5, 8],
          opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5, opt_projection_epsilon=0.5)
TYPES = torch.tensor([[1, 2, 0, 4, 5, 8], [4, 4, 4, 4, 8, 8]])  # the inputs' own examples (two label groups)


def _train(model, inputs, steps: int = 3) -> list[float]:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**inputs, input_type_mask=TYPES.clone()).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_follows_peft_step_for_step_and_files_move_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.CPTConfig(**KW))
    ours = dt.get_peft_model(tiny_llama(), dt.CPTConfig(**KW))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    inputs = make_causal_lm_inputs(ours)
    want = _train(theirs, inputs)
    assert _train(ours, inputs) == pytest.approx(want, abs=1e-6)
    assert want[-1] < want[0]
    ids = inputs["input_ids"]
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        from_peft = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
        from_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
        torch.testing.assert_close(from_peft(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(from_ours(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)


def test_the_loss_written_out():
    """Mean next-token cross-entropy over label positions (context labels included), example k from the last
    weighted 0.5**k."""
    model = dt.get_peft_model(tiny_llama(), dt.CPTConfig(**KW))
    inputs = make_causal_lm_inputs(model)
    out = model(**inputs, input_type_mask=TYPES.clone())
    labels = torch.cat([torch.tensor(KW["cpt_token_ids"]).expand(2, -1), inputs["labels"]], dim=1)
    types = torch.cat([torch.tensor(KW["cpt_tokens_type_mask"]).expand(2, -1),
                       torch.where(TYPES > 0, TYPES + 8, TYPES)], dim=1)
    logprobs = torch.log_softmax(out.logits.float(), -1)
    terms = []
    for row in range(2):
        groups = sorted({t for t in types[row].tolist() if t > 0 and t % 4 == 0})
        for pos in range(1, labels.shape[1]):
            t = types[row, pos].item()
            if t > 0 and t % 4 == 0:
                weight = 0.5 ** (len(groups) - 1 - groups.index(t))
                terms.append(-weight * logprobs[row, pos - 1, labels[row, pos]])
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_projection_balls_and_frozen_label_tokens():
    model = dt.get_peft_model(tiny_llama(), dt.CPTConfig(**KW))
    encoder = model.prompt_encoder["default"]
    assert not encoder.embedding.weight.requires_grad and encoder.delta_embedding.weight.requires_grad
    start = encoder.embedding.weight.clone()
    inputs = make_causal_lm_inputs(model)
    model(**inputs, input_type_mask=TYPES.clone()).loss.backward()
    grad = encoder.delta_embedding.weight.grad
    trains = [t % 4 in (1, 2, 3) for t in KW["cpt_tokens_type_mask"]]  # types 4 and 8 are labels
    assert all((grad[i].abs().sum() > 0) == trains[i] for i in range(6))
    with torch.no_grad():
        encoder.delta_embedding.weight.add_(torch.randn_like(grad) * 10)
        model(**inputs)  # the forward projects the stored delta
    scale = math.sqrt(32 / 2048)
    radius = [0.1 * scale, 0.5 * scale, 0.1 * scale, 1e-10, 0.1 * scale, 1e-10]  # format, input, format, label ...
    norms = encoder.delta_embedding.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor(radius), rtol=1e-5, atol=1e-9)
    assert torch.equal(encoder.embedding.weight, start)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_cached_generate_equals_full_forward_loop(padded):
    factory, _ = GEN_FAMILIES["llama"]
    torch.manual_seed(0)
    model = dt.get_peft_model(factory(), dt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7]))
    _check_cached_equals_loop(model, False, padded)


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ConfigError, match="only supports task_type='CAUSAL_LM'"):
        dt.CPTConfig(task_type="SEQ_2_SEQ_LM", cpt_token_ids=[5])
    with pytest.raises(ConfigError, match="same length"):
        dt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6], cpt_tokens_type_mask=[1])
    with pytest.raises(ConfigError, match="num_virtual_tokens=4 but cpt_token_ids has 2"):
        dt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6], num_virtual_tokens=4)
    with pytest.raises(ConfigError, match="beyond the vocabulary"):
        dt.get_peft_model(tiny_llama(), dt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 100000]))
    model = dt.get_peft_model(tiny_llama(), dt.CPTConfig(**KW))
    with pytest.raises(ConfigError, match="pass labels with it"):
        model(input_ids=torch.tensor([[5, 6]]), input_type_mask=torch.tensor([[4, 4]]))
    with pytest.raises(ConfigError, match="labels' shape"):
        model(input_ids=torch.tensor([[5, 6]]), labels=torch.tensor([[5, 6]]), input_type_mask=torch.tensor([[4]]))

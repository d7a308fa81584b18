"""The engine's logits processing on controlled logits, each step against its formula written out by hand; the
incremental detokenizer on multi-byte text; stop strings over a stream of deltas."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from deltatune.sampling import Detokenizer, SamplingParams, StopText, knobs, penalize, pick, restrict


def _knob(**settings) -> torch.Tensor:
    return knobs([SamplingParams(**settings)], torch.device("cpu"))


def _kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x[0]).nonzero().flatten().tolist()


def test_penalties_follow_openai_and_ctrl():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    seen = torch.tensor([[True, True, True, False, False]])  # prompt 0, 1; generated 1, 1, 2
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0]])
    out = penalize(logits, _knob(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), counts, seen)
    # repetition on seen tokens (2 / 2, -1 * 2, 0.5 / 2), then - count * 0.5 - (count > 0) * 0.25
    assert out[0].tolist() == pytest.approx([1.0, -2.0 - 1.0 - 0.25, 0.25 - 0.5 - 0.25, 3.0, -2.0])
    assert torch.equal(penalize(logits, _knob(), counts, seen), logits)  # the defaults change nothing


def test_temperature_top_k_min_p_and_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert restrict(logits, _knob(temperature=2.0))[0].tolist() == pytest.approx([0.5, 1.5, 1.0, 0.0])
    assert _kept(restrict(logits, _knob(top_k=2))) == [1, 2]
    assert _kept(restrict(logits, _knob(top_k=-1))) == [0, 1, 2, 3]
    p = torch.softmax(logits[0], -1)  # min_p keeps p >= min_p * max p
    for min_p in (0.1, 0.3, 0.5):
        assert _kept(restrict(logits, _knob(min_p=min_p))) == [i for i in range(4) if p[i] >= min_p * p.max()]
    p = torch.softmax(logits[0] / 0.5, -1)  # on the tempered probabilities
    assert _kept(restrict(logits, _knob(temperature=0.5, min_p=0.1))) == [i for i in range(4) if p[i] >= 0.1 * p.max()]
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert _kept(restrict(probs, _knob(top_p=0.75))) == [0, 1]  # 0.5 < 0.75 <= 0.5 + 0.3
    assert _kept(restrict(probs, _knob(top_p=0.83))) == [0, 1, 2]
    # after top_k=3 the mass renormalises to 0.5/0.95, 0.3/0.95 (= 0.842 >= 0.83): the third goes
    assert _kept(restrict(probs, _knob(top_p=0.83, top_k=3))) == [0, 1]
    assert _kept(restrict(probs, _knob(top_p=0.01))) == [0]  # the most likely token always stays


def test_pick_is_inverse_cdf_and_never_takes_a_removed_token():
    restricted = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]])).repeat(4, 1)
    assert pick(restricted, torch.tensor([0.0, 0.45, 0.55, 0.85])).tolist() == [0, 0, 2, 3]
    first_removed = torch.tensor([[-math.inf, 0.0, -math.inf]])
    assert pick(first_removed, torch.tensor([0.0])).tolist() == [1]


def test_detokenizer_streams_multibyte_text_exactly():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["héllo wörld", "naïve café"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")
    text = "héllo 😺 wörld 日本 café"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # characters split over several byte tokens
    detok = Detokenizer(tokenizer, threading.Lock())
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas) and "" in deltas  # held back, never broken


def test_stop_text_holds_back_a_possible_stop_and_cuts_before_it():
    stop = StopText(["cd", "xyz"])
    assert [stop.feed(d) for d in ["ab", "c", "d", "e"]][:3] == [("ab", None), ("", None), ("", "cd")]
    stop = StopText(["xyz"])
    assert [stop.feed(d) for d in ["ax", "y", "q"]] == [("a", None), ("", None), ("xyq", None)]
    assert stop.flush() == ""
    stop = StopText(["xyz"])
    assert stop.feed("axy") == ("a", None) and stop.flush() == "xy"  # an answer ending early gets the held text

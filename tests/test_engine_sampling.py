"""The engine's logits processing on controlled logits, each step against its formula written out by hand; the
incremental detokenizer against vLLM's rules (offsets written out, and the tokenizers library's ``DecodeStream``
that vLLM's server runs) with byte-level and SentencePiece tokenizers; stop strings over a stream of deltas."""

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


def _byte_level():
    """A GPT-2-style byte-level BPE: a multi-byte character can be split over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["héllo wörld", "naïve café"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def _sentencepiece():
    """A Llama-2-style SentencePiece tokenizer: ``▁`` marks a word's leading space, the decoder strips the first one,
    characters outside the vocabulary fall back to ``<0xNN>`` byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁Hello", "▁world", "▁the",
              "!", "lo", "▁wor", "ld", *"Helowrdth"]
    core = Tokenizer(models.Unigram([(p, -len(pieces) + i / 10 if len(p) > 1 else -50.0) for i, p in
                                     enumerate(pieces)], unk_id=0, byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "▁")  # (no "▁" prepended, so that " world" is one piece)
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tok(request):
    return _byte_level() if request.param == "byte-level" else _sentencepiece()


def _ours(tokenizer, prompt: list[int], answer: list[int], skip: bool = True) -> list[str]:
    detok = Detokenizer(tokenizer, threading.Lock(), prompt, skip)
    return [detok.push(t) for t in answer]


def _decode(tokenizer, ids: list[int], skip: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _offset_rule(tokenizer, prompt: list[int], answer: list[int], skip: bool = True) -> list[str]:
    """vLLM's incremental detokenization by offsets, written out: start 5 tokens before the end of the prompt; a
    step's text is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``, held while it is no longer or ends in
    an incomplete character, and once given the offsets move to the tokens that gave it."""
    ids, prefix, read, out = list(prompt), max(len(prompt) - 5, 0), len(prompt), []
    for token in answer:
        ids.append(token)
        before, after = _decode(tokenizer, ids[prefix:read], skip), _decode(tokenizer, ids[prefix:], skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            out.append("")
        else:
            out.append(after[len(before):])
            prefix, read = read, len(ids)
    return out


def _decode_stream(tokenizer, prompt: list[int], answer: list[int], skip: bool = True) -> list[str]:
    """What vLLM's server runs for a fast tokenizer: the tokenizers library's ``DecodeStream`` prefilled with the
    whole prompt, restarted without context on its invalid-prefix error."""
    from tokenizers.decoders import DecodeStream

    stream, out = DecodeStream(ids=prompt, skip_special_tokens=skip), []
    for token in answer:
        try:
            text = stream.step(tokenizer._tokenizer, token)
        except Exception as exc:  # noqa: BLE001 - only the invalid-prefix error is expected
            assert str(exc).startswith("Invalid prefix")
            stream = DecodeStream(skip_special_tokens=skip)
            text = stream.step(tokenizer._tokenizer, token)
        out.append(text or "")
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt, answer", [
    ("Hello", " world the wörld"), ("<s>", "Hello world!"), ("the café", " 日本😺 naïve"), ("Hello", "! 😺"),
    ("Hello " * 12 + "world", " the world"),  # a prompt longer than the context window
])
def test_detokenizer_equals_vllm_and_the_full_text_after_the_prompt(tok, prompt, answer):
    prompt_ids, answer_ids = _ids(tok, prompt), _ids(tok, answer)
    if prompt == "<s>":
        answer_ids = _ids(tok, answer.split()[0]) + _ids(tok, " " + answer.split(maxsplit=1)[1])
    deltas = _ours(tok, prompt_ids, answer_ids)
    assert deltas == _offset_rule(tok, prompt_ids, answer_ids) == _decode_stream(tok, prompt_ids, answer_ids)
    full = _decode(tok, prompt_ids + answer_ids)
    assert "".join(deltas) == full[len(_decode(tok, prompt_ids)):]
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_gives_the_first_token_its_leading_space_after_the_prompt():
    tok = _sentencepiece()
    prompt, answer = _ids(tok, "Hello"), _ids(tok, " world")
    assert tok.convert_ids_to_tokens(answer) == ["▁world"] and tok.decode(answer) == "world"  # alone: stripped
    assert _ours(tok, prompt, answer) == [" world"]
    assert _ours(tok, _ids(tok, "<s>"), answer) == ["world"]  # after only special tokens: the text's start


def test_detokenizer_holds_split_characters_and_drops_an_unfinished_one(tok):
    answer = _ids(tok, " 日本")
    deltas = _ours(tok, _ids(tok, "Hello"), answer)
    assert len(answer) > 3 and "" in deltas and "".join(deltas) == " 日本"  # held, then whole
    cut = _ours(tok, _ids(tok, "Hello"), answer[:-1])  # the answer ends inside 本: vLLM never shows it
    assert "".join(cut) == " 日" == "".join(_decode_stream(tok, _ids(tok, "Hello"), answer[:-1]))


def test_detokenizer_starts_before_a_prompt_that_ends_inside_a_character(tok):
    ids = _ids(tok, "Hello 日本")
    prompt, answer = ids[:-1], ids[-1:] + _ids(tok, " world")
    assert _decode(tok, prompt).endswith("\ufffd")
    # the completed character and what follows; vLLM's DecodeStream repeats the prompt's text here
    assert "".join(_ours(tok, prompt, answer)) == "本 world"
    assert "".join(_decode_stream(tok, prompt, answer)).startswith("Hello")


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_skip_special_tokens(tok, skip):
    prompt, eos = _ids(tok, "Hello"), tok.eos_token_id
    answer = _ids(tok, " world") + [eos] + _ids(tok, " the")
    deltas = _ours(tok, prompt, answer, skip)
    assert deltas == _offset_rule(tok, prompt, answer, skip) == _decode_stream(tok, prompt, answer, skip)
    assert ("</s>" in "".join(deltas)) is not skip


def test_detokenizer_restarts_like_vllm_when_the_decoder_rewrites_shown_text():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "<unk>": 3}, unk_token="<unk>"))
    core.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])  # "a" then "ab" -> "X"
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    deltas = _ours(tok, [2], [0, 1, 2, 2])
    assert deltas == _decode_stream(tok, [2], [0, 1, 2, 2]) == ["a", "", "c", "c"]


def test_stop_text_holds_back_a_possible_stop_and_cuts_before_it():
    stop = StopText(["cd", "xyz"])
    assert [stop.feed(d) for d in ["ab", "c", "d", "e"]][:3] == [("ab", None), ("", None), ("", "cd")]
    stop = StopText(["xyz"])
    assert [stop.feed(d) for d in ["ax", "y", "q"]] == [("a", None), ("", None), ("xyq", None)]
    assert stop.flush() == ""
    stop = StopText(["xyz"])
    assert stop.feed("axy") == ("a", None) and stop.flush() == "xy"  # an answer ending early gets the held text

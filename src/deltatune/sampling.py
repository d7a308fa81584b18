"""Per-request decoding for the serving engine (:mod:`deltatune.engine`): the settings of one request
(:class:`SamplingParams`), the logits processing of a batch whose rows each carry their own settings, incremental
detokenization and stop strings. Pure functions and small state objects; nothing here knows about threads or caches.

The logits of one row go through these steps, in vLLM's sampler order so that answers and logprobs mean what they
mean with vLLM's OpenAI server:

1. **logprobs** are the log-softmax of the model's raw logits (vLLM's default ``logprobs_mode="raw_logprobs"``):
   before penalties, temperature and truncation, so they are the model's own distribution;
2. **penalties**: ``repetition_penalty`` r over the prompt and the generated tokens (CTRL, arXiv:1909.05858 §4.1, as
   transformers and vLLM apply it: a seen token's logit ``l`` becomes ``l / r`` if ``l > 0`` else ``l * r``), then
   OpenAI's ``l[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty`` with ``c[j]`` the count of token
   ``j`` among the generated tokens;
3. **greedy** rows (``temperature == 0``) take the argmax of the penalised logits;
4. the others: **temperature** (``l / T``), **min_p** (tokens whose tempered probability is below ``min_p`` times the
   largest are removed), **top_k**, then **top_p** (the smallest set of the most likely tokens whose probability,
   renormalised after top_k, reaches ``top_p``);
5. one uniform draw per row from the row's own ``torch.Generator`` picks the token by inverse CDF, so a seeded row
   samples the same tokens whatever rows share its batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .errors import DeltatuneError

__all__ = ["SamplingError", "SamplingParams"]


class SamplingError(DeltatuneError):
    """A sampling setting out of range or of the wrong type; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes (vLLM's ``SamplingParams`` names and meanings).

    Attributes:
        n: Answers to generate for the prompt; the prompt is computed once and its cache shared by the ``n`` rows.
        max_tokens: Most tokens to generate per answer (end-of-sequence included).
        temperature: 0 decodes greedily.
        top_p: Nucleus mass in (0, 1]; 1 is off.
        top_k: Keep the ``top_k`` most likely tokens; 0 or -1 is off.
        min_p: In [0, 1]; remove tokens less likely than ``min_p`` times the most likely one; 0 is off.
        presence_penalty, frequency_penalty: OpenAI's penalties in [-2, 2], over the generated tokens.
        repetition_penalty: > 0; 1 is off. Over the prompt and the generated tokens.
        seed: Seeds this request's own generator (answer ``i`` of ``n`` uses ``seed + i``); ``None`` draws a seed.
        stop: Strings that end an answer when its text contains one; the text is cut before it.
        stop_token_ids: Token ids that end an answer (beside the model's end-of-sequence ids).
        ignore_eos: Keep generating after end-of-sequence (only ``stop_token_ids``, ``stop`` and ``max_tokens`` end).
        logprobs: Report each generated token's logprob and this many most likely alternatives (0: the token's own
            only); ``None`` reports none.
        prompt_logprobs: The same for the prompt tokens (the first has none); what ``echo`` with ``logprobs`` needs.
        skip_special_tokens: Leave special tokens (end-of-sequence, chat markers) out of the text.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("stop", "stop_token_ids"):
                kind = str if f.name == "stop" else int
                if isinstance(value, (str, int)) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                            for v in value):
                    raise SamplingError(f"{f.name!r} must be a list of {kind.__name__}s, got {value!r}")
                object.__setattr__(self, f.name, tuple(value))
            elif f.name in ("ignore_eos", "skip_special_tokens"):
                if not isinstance(value, bool):
                    raise SamplingError(f"{f.name!r} must be true or false, got {value!r}")
            elif value is not None or f.name not in ("seed", "logprobs", "prompt_logprobs"):
                kinds = (int,) if f.type in ("int", "int | None") else (int, float)
                if isinstance(value, bool) or not isinstance(value, kinds):
                    raise SamplingError(f"{f.name!r} must be {'an integer' if kinds == (int,) else 'a number'}, "
                                        f"got {value!r}")
                if isinstance(value, float) and not math.isfinite(value):
                    raise SamplingError(f"{f.name!r} must be finite, got {value!r}")
        checks = [
            ("n", self.n >= 1, "at least 1"), ("max_tokens", self.max_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "at least 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= -1, "-1, 0 (off) or a positive count"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "greater than 0"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "at least 0"),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "at least 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise SamplingError(f"{name!r} must be {what}, got {getattr(self, name)!r}")
        if any(not s for s in self.stop):
            raise SamplingError("'stop' strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


# --- the logits processing of a batch ------------------------------------------------------------------------------

_KNOBS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def knobs(params: Sequence[SamplingParams], device: torch.device) -> torch.Tensor:
    """``(B, 7)`` float32: each row's settings in :data:`_KNOBS` order (one host-to-device copy per batch)."""
    return torch.tensor([[float(getattr(p, k)) for k in _KNOBS] for p in params], dtype=torch.float32, device=device)


def penalize(logits: torch.Tensor, knob: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Repetition, frequency and presence penalties (step 2 of the module docstring).

    Args:
        logits: ``(B, V)`` float32 raw logits.
        knob: ``(B, 7)`` from :func:`knobs`.
        counts: ``(B, V)`` how often each token was generated so far in the row.
        seen: ``(B, V)`` bool, the tokens of the row's prompt and generated text.
    """
    rep = knob[:, 6:7]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - counts * knob[:, 5:6] - (counts > 0).to(logits.dtype) * knob[:, 4:5]


def restrict(logits: torch.Tensor, knob: torch.Tensor) -> torch.Tensor:
    """Temperature, min_p, top_k and top_p (step 4): ``(B, V)`` tempered logits, ``-inf`` where a token is removed.
    Rows with temperature 0 come back divided by 1 (their argmax is taken before, from the penalised logits)."""
    temperature = knob[:, 0:1]
    x = logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(x, dim=-1)
    x = x.masked_fill(probs < knob[:, 3:4] * probs.amax(dim=-1, keepdim=True), -math.inf)
    ordered, order = x.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(x.shape[-1], device=x.device)
    top_k = knob[:, 2:3]
    ordered = ordered.masked_fill((top_k > 0) & (rank >= top_k), -math.inf)
    p = torch.softmax(ordered, dim=-1)
    before = p.cumsum(dim=-1) - p  # mass of the more likely tokens
    top_p = knob[:, 1:2]
    ordered = ordered.masked_fill((top_p < 1) & (before >= top_p) & (rank > 0), -math.inf)
    return torch.full_like(x, -math.inf).scatter(-1, order, ordered)


def pick(restricted: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``(B,)`` tokens drawn by inverse CDF: row ``i`` takes the first token whose cumulative probability exceeds
    ``uniforms[i]`` (in [0, 1)); a removed token (probability 0) can never be the first to exceed it."""
    cdf = torch.softmax(restricted, dim=-1).cumsum(dim=-1)  # (B, V)
    threshold = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, threshold, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


# --- text ----------------------------------------------------------------------------------------------------------

CONTEXT_TOKENS = 16
"""Prompt tokens the first answer token is decoded after. vLLM decodes after the whole prompt; every decoder of the
``tokenizers`` library (byte-level, SentencePiece's ``▁``/strip/byte-fallback, WordPiece, plain joins) makes a
token's text from the tokens just before it, so a short tail gives the same text at a cost that does not grow with
the prompt."""

_INCOMPLETE = "\ufffd"  # what decode shows for a UTF-8 sequence still missing bytes


class Detokenizer:
    """Turns an answer's token ids into the text deltas vLLM's OpenAI server streams (its detokenizer for fast
    tokenizers, the ``tokenizers`` library's ``DecodeStream`` started from the prompt's ids).

    The text of new tokens is ``decode(window)`` minus ``decode`` of the part of the window already shown: the window
    starts at the prompt's last tokens, so the first answer token gets the leading space (SentencePiece ``▁``) or
    merge it has after the prompt, and after each delta it restarts at the tokens that produced that delta. Text
    ending in an incomplete UTF-8 sequence (U+FFFD) is held until a later token completes it, and dropped if none
    does, as vLLM does. Decoding is ``tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces=False)``:
    the raw decoder's text, which is what ``DecodeStream`` decodes.

    Where the prompt ends inside a character, the context starts before it, so the first delta holds the completed
    character (vLLM then repeats the prompt's text in its first delta).
    """

    def __init__(self, tokenizer, lock: threading.Lock, prompt: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer, self.lock, self.skip_special_tokens = tokenizer, lock, skip_special_tokens
        self.window: list[int] = list(prompt[-CONTEXT_TOKENS:])
        self.start = 0  # window[:start] is text already shown (or the prompt's), window[start:] is pending
        self.shown = ""  # decode(window[:start])

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                         clean_up_tokenization_spaces=False)

    def _anchor(self) -> None:
        """Take as shown the longest start of the window that decodes to whole characters."""
        for start in range(len(self.window), -1, -1):
            text = self._decode(self.window[:start])
            if not text.endswith(_INCOMPLETE):
                self.start, self.shown = start, text
                return

    def push(self, token: int) -> str:
        """The new text ``token`` completes ("" while it completes nothing)."""
        if not self.shown and self.window:  # the prompt, or nothing shown since a restart
            self._anchor()
        self.window.append(token)
        text = self._decode(self.window)
        if text.endswith(_INCOMPLETE) or text == self.shown:
            return ""
        if not text.startswith(self.shown):
            # A decoder whose text is not a prefix of its text with one more token: DecodeStream fails here and
            # vLLM restarts the stream with this token alone; shorter text waits (DecodeStream compares bytes).
            if len(text.encode()) <= len(self.shown.encode()):
                return ""
            self.window, self.start, self.shown = [], 0, ""
            return self.push(token)
        delta = text[len(self.shown):]
        self.window = self.window[self.start:]
        self.start, self.shown = len(self.window), self._decode(self.window)
        return delta


class StopText:
    """Stop strings over a stream of text deltas, across token boundaries: :meth:`feed` returns the text that is
    safe to hand out (never a part of a stop string that may still complete) and the stop string once one appears;
    the answer's text is cut just before it, as OpenAI does."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max(map(len, self.stops), default=0)
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, str | None]:
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        if not self.stops:
            return self.flush(), None
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, stop = min(hits)
            out, self.sent = self.text[self.sent:cut], len(self.text)
            return out, stop
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out, None

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

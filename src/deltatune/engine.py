"""The serving engine: continuous batching of generation requests across adapters on one worker thread.

Contract (what the HTTP layer in :mod:`deltatune.serve` builds on):

* ``engine = Engine(model, tokenizer, max_batch_size=..., max_queue=...).start()``; the worker thread alone touches
  the model. ``engine.call(fn) -> Future`` runs ``fn()`` on it between two steps (load or unload an adapter; replace
  ``engine.model``). Rows whose adapter is gone after such a call end with an error.
* ``handle = engine.submit(Request(prompt_ids, adapter, SamplingParams(...)))`` queues a request; it raises
  :class:`QueueFull` when ``max_queue`` requests wait (answer 503), :class:`EngineClosed` after :meth:`Engine.close`,
  and :class:`~deltatune.sampling.SamplingError` / ``AdapterStateError`` (``ValueError``\\ s: answer 400) for bad input.
* ``for event in handle:`` yields :class:`TokenEvent`\\ s as tokens are generated (answers of ``n > 1`` interleave,
  told apart by ``event.index``); the last event of each answer has its ``finish_reason``: ``"stop"`` (end of sequence,
  a stop token or a stop string), ``"length"`` (``max_tokens`` or the model's context) or ``"abort"`` (cancelled).
  Iteration raises the request's error if it failed. ``handle.prompt_logprobs`` is set before the first event.
* ``handle.result(timeout)`` blocks and returns the :class:`RequestOutput`; ``handle.cancel()`` (a client that went
  away) ends the request at the next step boundary, freeing its rows and their cache.
* ``engine.queue_depth`` (requests waiting), ``engine.running`` (rows in the batch) and the counters below are for
  metrics; ``engine.close(drain=True)`` refuses new requests, finishes the accepted ones, and stops the worker
  (``drain=False`` aborts them).

How a step works: the running rows share one transformers ``DynamicCache`` whose rows are right-aligned (row ``i``'s
``L_i`` tokens sit in the last ``L_i`` columns, padding on the left, masked). New requests are prefilled together in a
cache of their own (one row per request, left-padded), copied ``n`` times for ``n`` answers, left-padded or padding
the running cache to the same width and concatenated to it; then every row decodes one token per step, each row with
its own adapter (``adapter_names``, :mod:`deltatune.rows`: the base computed once per batch, each adapter's delta on
its rows). A finished or cancelled row is removed with ``index_select`` and the columns no row needs any more are cut,
so a short request leaves as soon as it is done and never waits for a long one. Positions are per row (the count of
its real tokens), so a row computes what it would compute alone. Decoder-only models with transformers' dynamic cache
(Llama, GPT-2, Mistral, Qwen, ...) are supported; encoder-decoder models (T5) are refused.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import AdapterStateError, DeltatuneError
from .files import BASE_ADAPTER
from .model import PeftModel
from .prompt import cache_argument
from .rows import RowPlan
from .sampling import Detokenizer, SamplingParams, StopText, knobs, penalize, pick, restrict

__all__ = ["Engine", "EngineClosed", "Handle", "QueueFull", "Request", "RequestOutput", "TokenEvent",
           "TokenLogprob", "Choice"]


class QueueFull(RuntimeError):
    """``max_queue`` requests are already waiting; try again later (HTTP 503 with Retry-After)."""


class EngineClosed(RuntimeError):
    """The engine is closing or closed and takes no new requests."""


@dataclass(frozen=True)
class Request:
    """One generation request: the prompt's token ids, the adapter its rows use (``"__base__"``: the base model)
    and how it decodes."""

    prompt: Sequence[int]
    adapter: str = BASE_ADAPTER
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits) and the ``k`` most likely tokens
    at that position as ``(token_id, logprob)``, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of one answer: the token (``None`` on an ``"abort"`` event), the text it adds (empty while an
    incomplete character or a possible stop string is held back; held text comes with a later event), its logprob
    if asked for, and the ``finish_reason`` on the answer's last event (``stop_reason``: the stop string or token
    id that ended it)."""

    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Choice:
    """One finished answer; ``token_ids`` include an ending end-of-sequence / stop token, ``text`` never does."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None
    choices: list[Choice]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


_END = object()
_ids = itertools.count()


class Handle:
    """A submitted request: iterate for its :class:`TokenEvent`\\ s, :meth:`result` for the whole answer,
    :meth:`cancel` to drop it.

    Attributes:
        arrival_time, first_token_time, finish_time: ``time.monotonic()`` when it was submitted, its first token
            came and it finished (latency metrics).
        finish_step: The engine's ``decode_steps`` when it finished (orders completions without clocks).
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.request_id = next(_ids)
        n, logprobs = request.params.n, request.params.logprobs
        self.choices = [Choice(i, logprobs=None if logprobs is None else []) for i in range(n)]
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._events: deque = deque()
        self._cond = threading.Condition()
        self._open = n
        self._done = threading.Event()
        self._engine: Engine | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_step: int | None = None

    # consumer side
    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._events)
                event = self._events.popleft()
            if event is _END:
                if self.error is not None:
                    raise self.error
                return
            yield event

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return RequestOutput(self.request_id, list(self.request.prompt), self.prompt_logprobs, self.choices)

    def cancel(self) -> None:
        """Stop generating (the client went away): the rows leave the batch at the next step boundary and each open
        answer ends with ``finish_reason="abort"``."""
        self.cancelled = True
        if self._engine is not None:
            self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # worker side
    def _emit(self, event: TokenEvent) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        choice = self.choices[event.index]
        choice.text += event.text
        if event.token_id is not None:
            choice.token_ids.append(event.token_id)
        if event.logprob is not None and choice.logprobs is not None:
            choice.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = event.finish_reason, event.stop_reason
            self._open -= 1
        with self._cond:
            self._events.append(event)
            if not self._open:
                self._events.append(_END)
            self._cond.notify_all()
        if not self._open:
            self.finish_time = time.monotonic()
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self.error, self._open, self.finish_time = error, 0, time.monotonic()
        with self._cond:
            self._events.append(_END)
            self._cond.notify_all()
        self._done.set()


@dataclass
class _Row:
    """One answer being generated."""

    handle: Handle
    index: int
    detok: Detokenizer
    stops: StopText
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params

    @property
    def adapter(self) -> str:
        return self.handle.request.adapter

    @property
    def prompt(self) -> Sequence[int]:
        return self.handle.request.prompt

    @property
    def finished(self) -> bool:
        return self.handle.done or self.handle.choices[self.index].finish_reason is not None


@dataclass
class _Task:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


# --- the batch's cache ---------------------------------------------------------------------------------------------

def _cache_layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise DeltatuneError(f"the engine joins and splits plain dynamic KV caches; this model's cache has {odd}")
    return layers


def _map_cache(cache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in _cache_layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)  # (B, heads, W, head_dim)


class _Batch:
    """The running rows with their per-row tensors (batch on dim 0) and their KV cache (rows right-aligned)."""

    def __init__(self, rows: list[_Row], cache, mask: torch.Tensor, positions: torch.Tensor, vocab: int) -> None:
        self.rows, self.cache = rows, cache
        self.mask = mask  # (B, W) 1 on the cache's real columns
        self.positions = positions  # (B,) position of each row's next input token = its count of real tokens
        self.next = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)  # (B,) each row's next input
        self.vocab = vocab
        self.penalties: tuple[torch.Tensor, torch.Tensor] | None = None  # (counts, seen), each (B, V), when needed
        self.knobs: torch.Tensor | None = None
        self.plan: RowPlan | None = None  # the rows' adapters, grouped once while the rows stay the same

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (in that order; an index may repeat) and cut columns no kept row uses."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.next = self.mask[index], self.positions[index], self.next[index]
        cut = self.mask.shape[1] - int(self.mask.sum(dim=1).max())  # leading columns that are padding in every row
        _map_cache(self.cache, lambda t: t.index_select(0, index)[:, :, cut:])
        self.mask = self.mask[:, cut:]
        self.penalties, self.knobs, self.plan = None, None, None

    def extend(self, other: _Batch) -> None:
        """Append ``other``'s rows, padding the narrower cache on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(_cache_layers(self.cache), _cache_layers(other.cache), strict=True):
            a.keys = torch.cat([_pad(a.keys, width), _pad(b.keys, width)])
            a.values = torch.cat([_pad(a.values, width), _pad(b.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(other.mask, (width - other.mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.next = torch.cat([self.next, other.next])
        self.rows += other.rows
        self.penalties, self.knobs, self.plan = None, None, None

    def penalty_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, seen)``: generated-token counts and prompt-or-generated flags, (B, V); built from the rows'
        token lists when the batch changed, then updated step by step."""
        if self.penalties is None:
            device = self.mask.device
            counts = torch.zeros(len(self.rows), self.vocab, device=device)
            seen = torch.zeros(len(self.rows), self.vocab, dtype=torch.bool, device=device)
            for i, row in enumerate(self.rows):
                if row.tokens:
                    counts[i].index_add_(0, torch.tensor(row.tokens, device=device),
                                         torch.ones(len(row.tokens), device=device))
                seen[i, torch.tensor([*row.prompt, *row.tokens], dtype=torch.long, device=device)] = True
            self.penalties = (counts, seen)
        return self.penalties


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[2], 0))  # (B, heads, W, head_dim): zeros on the left of W


# --- the engine ----------------------------------------------------------------------------------------------------

class Engine:
    """Continuous batching over one model (module docstring).

    Args:
        model: A causal LM, or a :class:`~deltatune.PeftModel` of one holding layer adapters.
        tokenizer: Its tokenizer (decoding; end-of-sequence ids).
        max_batch_size: Most rows decoding together (an ``n``-answer request takes ``n``).
        max_queue: Most requests waiting to join; :meth:`submit` raises :class:`QueueFull` beyond.
        batch_wait_ms: When nothing runs, how long the first request waits for others to be prefilled with it.
        device: Where inputs go (the model's device).

    Attributes:
        prefill_sizes, decode_sizes: Rows of the last 1000 prefill forwards and decode steps.
        prefill_calls, decode_steps, tokens_generated, requests_finished: Counters.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch_size: int = 8, max_queue: int = 256,
                 batch_wait_ms: float = 0.0, device: str | torch.device | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_wait_ms < 0:
            raise DeltatuneError("max_batch_size and max_queue must be at least 1 and batch_wait_ms at least 0")
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise DeltatuneError(f"the engine serves decoder-only causal LMs; {type(config).__name__} is an "
                                 f"encoder-decoder model, whose cross-attention cache it does not batch")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use from several threads
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch_wait = batch_wait_ms / 1000
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)
        self.vocab_size: int | None = getattr(config, "vocab_size", None)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = frozenset(e for e in [*eos, tokenizer.eos_token_id] if e is not None)
        self.prefill_sizes: deque[int] = deque(maxlen=1000)
        self.decode_sizes: deque[int] = deque(maxlen=1000)
        self.prefill_calls = self.decode_steps = self.tokens_generated = self.requests_finished = 0
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._tasks: deque[_Task] = deque()
        self._closing = False
        self._drain = True
        self._batch: _Batch | None = None
        self._thread: threading.Thread | None = None
        self._signature: tuple[Any, str | None, bool] = (None, None, False)  # (base model, cache argument, keep)

    # --- the caller's side ----------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    def submit(self, request: Request) -> Handle:
        """Queue ``request``; see the module docstring for what it raises."""
        params = request.params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Request.params must be a SamplingParams, got {type(params).__name__}")
        prompt = request.prompt
        if not prompt:
            raise DeltatuneError("the prompt has no tokens")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (self.vocab_size or t + 1)
                   for t in prompt):
            raise DeltatuneError(f"prompt token ids must be integers from 0 to {self.vocab_size - 1} (the vocabulary)")
        if self.context_length is not None and len(prompt) >= self.context_length:
            raise DeltatuneError(f"the prompt has {len(prompt)} tokens; the model's context of {self.context_length} "
                                 f"leaves no room for an answer")
        if params.n > self.max_batch_size:
            raise DeltatuneError(f"'n' is {params.n} but at most {self.max_batch_size} rows decode together "
                                 f"(max_batch_size)")
        if self._missing(request.adapter):
            raise AdapterStateError(f"no adapter {request.adapter!r}; have {self.adapters}")
        handle = Handle(request)
        handle._engine = self
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_queue})")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker between two steps; the future holds its result or exception."""
        task = _Task(fn)
        with self._cond:
            if self._closing and self._thread is None:
                raise EngineClosed("the engine is closed")
            self._tasks.append(task)
            self._cond.notify_all()
        return task.future

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        batch = self._batch
        return len(batch.rows) if batch is not None else 0

    @property
    def cache_tokens(self) -> int:
        """Rows times columns of the running KV cache (0 when nothing runs: the cache is freed)."""
        batch = self._batch
        return batch.mask.numel() if batch is not None else 0

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain`` finish the accepted ones, else abort them; stop the worker."""
        with self._cond:
            self._closing, self._drain = True, drain
            if self._thread is None and not drain:  # never started: nothing will take them
                self._abort_all()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the worker -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._tasks or self._batch or self._closing)
                if self._closing and not self._drain:
                    self._abort_all()
                if self._closing and not (self._waiting or self._tasks or self._batch):
                    return
                if self._batch is None and self._waiting and self.batch_wait:
                    self._cond.wait_for(lambda: self._rows_waiting() >= self.max_batch_size or self._closing
                                        or self._tasks, timeout=self.batch_wait)
                tasks, self._tasks = list(self._tasks), deque()
                joining = self._admit()
            for task in tasks:  # outside inference mode: a task may create parameters (an adapter load)
                self._run_task(task)
            with torch.inference_mode():
                if tasks:
                    self._drop_orphans()
                self._drop_cancelled()
                if joining:
                    self._prefill(joining)
                if self._batch is not None:
                    self._decode()

    def _rows_waiting(self) -> int:
        return sum(h.request.params.n for h in self._waiting)

    def _admit(self) -> list[Handle]:
        """Take waiting requests, oldest first, while their rows fit in the batch."""
        free, joining = self.max_batch_size - self.running, []
        while self._waiting and (self._waiting[0].cancelled or self._waiting[0].request.params.n <= free):
            handle = self._waiting.popleft()
            if handle.cancelled:
                self._abort(handle)
                continue
            free -= handle.request.params.n
            joining.append(handle)
        return joining

    def _abort_all(self) -> None:
        while self._waiting:
            self._abort(self._waiting.popleft())
        for row in self._batch.rows if self._batch else []:
            row.handle.cancel()

    def _abort(self, handle: Handle, indices: Sequence[int] | None = None) -> None:
        for i in range(handle.request.params.n) if indices is None else indices:
            handle._emit(TokenEvent(i, None, "", finish_reason="abort"))
        if handle.done:
            handle.finish_step = self.decode_steps
            self.requests_finished += 1

    @staticmethod
    def _run_task(task: _Task) -> None:
        try:
            task.future.set_result(task.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            task.future.set_exception(exc)

    def _missing(self, adapter: str) -> bool:
        return adapter != BASE_ADAPTER and adapter not in self.adapters

    def _drop_orphans(self) -> None:
        """Fail the rows whose adapter a task removed: they cannot go on."""
        gone = [r for r in self._batch.rows if self._missing(r.adapter)] if self._batch is not None else []
        for row in gone:
            row.handle._fail(AdapterStateError(f"adapter {row.adapter!r} was unloaded while generating"))
        if gone:
            self._keep(lambda row: not row.handle.done)

    def _drop_cancelled(self) -> None:
        if self._batch is None or not any(r.handle.cancelled for r in self._batch.rows):
            return
        for handle in {id(r.handle): r.handle for r in self._batch.rows if r.handle.cancelled}.values():
            self._abort(handle, [r.index for r in self._batch.rows if r.handle is handle])
        self._keep(lambda row: not row.handle.cancelled)

    def _keep(self, wanted: Callable[[_Row], bool]) -> None:
        keep = [i for i, row in enumerate(self._batch.rows) if wanted(row)]
        if not keep:
            self._batch = None  # the cache goes with it
        elif len(keep) < len(self._batch.rows):
            self._batch.select(keep)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 adapters: list[str] | RowPlan, all_logits: bool) -> torch.Tensor:
        """The model's logits ``(B, T or 1, V)`` for ``ids`` (B, T) appended to ``cache``."""
        model = self.model
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if self._signature[0] is not base:
            keep = "logits_to_keep" in inspect.signature(base.forward).parameters
            self._signature = (base, cache_argument(base), keep)
        _, cache_name, keep = self._signature
        if cache_name is None:
            raise DeltatuneError(f"{type(base).__name__}.forward takes no KV cache; the engine needs one")
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                  "use_cache": True, cache_name: cache}
        if keep and not all_logits:
            kwargs["logits_to_keep"] = 1
        if isinstance(model, PeftModel):
            kwargs["adapter_names"] = adapters
        return model(**kwargs).logits

    def _prefill(self, handles: list[Handle]) -> None:
        """One forward over the new prompts (left-padded, one row per request), then ``n`` rows per request with
        their first token, joined to the running batch."""
        from transformers import DynamicCache

        for h in [h for h in handles if self._missing(h.request.adapter)]:  # unloaded since it was submitted
            h._fail(AdapterStateError(f"no adapter {h.request.adapter!r}; have {self.adapters}"))
            handles.remove(h)
        if not handles:
            return
        try:
            width = max(len(h.request.prompt) for h in handles)
            ids = torch.tensor([[0] * (width - len(h.request.prompt)) + list(h.request.prompt) for h in handles],
                               device=self.device)  # (R, T)
            mask = torch.tensor([[0] * (width - len(h.request.prompt)) + [1] * len(h.request.prompt)
                                 for h in handles], device=self.device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            echo = any(h.request.params.prompt_logprobs is not None for h in handles)
            cache = DynamicCache()
            logits = self._forward(ids, mask, positions, cache, [h.request.adapter for h in handles], echo)
            self.prefill_calls += 1
            self.prefill_sizes.append(len(handles))
            if echo:
                self._prompt_logprobs(handles, logits, ids)
            rows, expand = [], []
            for r, h in enumerate(handles):
                for i in range(h.request.params.n):
                    rows.append(self._row(h, i))
                    expand.append(r)
            index = torch.tensor(expand, device=self.device)
            _map_cache(cache, lambda t: t.index_select(0, index))  # n copies of each request's row
            new = _Batch(rows, cache, mask[index], mask.sum(dim=1)[index], logits.shape[-1])
            first = self._sample(new, logits[:, -1].float()[index])
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the running batch goes on
            for h in handles:
                h._fail(exc)
            return
        new.next = first
        if self._batch is None:
            self._batch = new
        else:
            self._batch.extend(new)
        self._keep(lambda row: not row.finished)

    def _row(self, handle: Handle, index: int) -> _Row:
        seed = handle.request.params.seed
        generator = None
        if not handle.request.params.greedy:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed + index)
        detok = Detokenizer(self.tokenizer, self.tokenizer_lock, handle.request.prompt,
                            handle.request.params.skip_special_tokens)
        return _Row(handle, index, detok, StopText(handle.request.params.stop), generator)

    def _prompt_logprobs(self, handles: list[Handle], logits: torch.Tensor, ids: torch.Tensor) -> None:
        """``handle.prompt_logprobs``: for prompt token ``j >= 1``, its logprob after the tokens before it (logits:
        (R, T, V))."""
        width = ids.shape[1]
        for r, h in enumerate(handles):
            k = h.request.params.prompt_logprobs
            if k is None:
                continue
            n = len(h.request.prompt)
            lp = torch.log_softmax(logits[r, width - n:-1].float(), dim=-1)  # (n - 1, V)
            h.prompt_logprobs = [None, *_logprobs(lp, ids[r, width - n + 1:], k)]

    def _decode(self) -> None:
        batch = self._batch
        try:
            batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
            if batch.plan is None:
                batch.plan = RowPlan([r.adapter for r in batch.rows])
            logits = self._forward(batch.next[:, None], batch.mask, batch.positions[:, None], batch.cache, batch.plan,
                                   False)
            batch.positions = batch.positions + 1
            self.decode_steps += 1
            self.decode_sizes.append(len(batch.rows))
            batch.next = self._sample(batch, logits[:, -1].float())
        except Exception as exc:  # noqa: BLE001 - every running request gets the error; the engine goes on
            for row in batch.rows:
                row.handle._fail(exc)
            self._batch = None
            return
        self._keep(lambda row: not row.finished)

    def _sample(self, batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token from ``logits`` (B, V) float32, emit the rows' events; ``(B,)`` tokens."""
        rows = batch.rows
        params = [r.params for r in rows]
        want_lp = [p.logprobs for p in params]
        logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None
        penalised = any(p.penalised for p in params)
        if penalised:
            counts, seen = batch.penalty_state()
            if batch.knobs is None:
                batch.knobs = knobs(params, logits.device)
            logits = penalize(logits, batch.knobs, counts, seen)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            if batch.knobs is None:
                batch.knobs = knobs(params, logits.device)
            index = torch.tensor(sampled, device=logits.device)
            u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(logits.device)
            tokens[index] = pick(restrict(logits[index], batch.knobs[index]), u)
        if penalised:
            counts[torch.arange(len(rows), device=logits.device), tokens] += 1
            seen[torch.arange(len(rows), device=logits.device), tokens] = True
        ids = tokens.tolist()
        info: list[TokenLogprob | None] = [None] * len(rows)
        if logprobs is not None:
            k = max(x for x in want_lp if x is not None)
            found = _logprobs(logprobs, tokens, k)
            info = [None if want is None else TokenLogprob(f.token_id, f.logprob, f.top[:want])
                    for want, f in zip(want_lp, found)]
        for row, token, lp in zip(rows, ids, info):
            self._advance(row, token, lp)
        self.tokens_generated += len(rows)
        return tokens

    def _advance(self, row: _Row, token: int, logprob: TokenLogprob | None) -> None:
        """Append ``token`` to the row's answer and emit its event (with the finish reason if it ends the answer)."""
        p = row.params
        row.tokens.append(token)
        reason, why = None, None
        if token in p.stop_token_ids or (token in self.eos and not p.ignore_eos):
            text, reason, why = row.stops.flush(), "stop", token  # the stop token's own text is left out
            if token in self.eos and token not in p.stop_token_ids:
                why = None  # vLLM's stop_reason is None for end-of-sequence
        else:
            text, why = row.stops.feed(row.detok.push(token))
            if why is not None:
                reason = "stop"
            elif len(row.tokens) >= p.max_tokens or (
                    self.context_length is not None and len(row.prompt) + len(row.tokens) >= self.context_length):
                text, reason = text + row.stops.flush(), "length"
        row.handle._emit(TokenEvent(row.index, token, text, logprob, reason, why))
        if reason is not None and row.handle.done:
            row.handle.finish_step = self.decode_steps
            self.requests_finished += 1


def _logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row of ``logprobs`` (N, V): the logprob of ``tokens`` (N,) and the ``k`` best ``(token, logprob)``."""
    chosen = logprobs.gather(1, tokens[:, None].to(logprobs.device)).squeeze(1).tolist()
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in
            zip(tokens.tolist(), chosen, top_i.tolist(), top_v.tolist())]

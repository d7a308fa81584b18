"""Serve one base model and several adapters over an OpenAI-style HTTP API, batching requests across adapters.

Requests that arrive together are answered by ONE ``generate()`` call: each row names its own adapter
(``adapter_names``, ``"__base__"`` for the base model) and every adapted layer routes its rows through their adapter
(see :class:`deltatune.layers.RowPlan`). Rows of one call share the sampling settings, so the scheduler groups
requests by them; greedy requests (temperature 0) all share one group.

Three parts, each usable without the next: :class:`Scheduler` (a queue and the one worker thread that owns the model),
:class:`Api` (the endpoints as a pure ``(method, path, body) -> (status, json)`` function) and :func:`http_server`
(stdlib ``ThreadingHTTPServer`` glue).
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .config import TaskType, read_config_file
from .errors import AdapterStateError, ConfigError, DeltatuneError
from .files import BASE_ADAPTER, validate_adapter_name
from .model import PeftModel
from .registry import PromptMethod, get_method

MAX_BODY_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; every row of one ``generate()`` call has the same ones.

    Attributes:
        temperature: 0 decodes greedily; otherwise the softmax temperature.
        top_p: Nucleus mass (1: off).
        seed: Seeds torch's generator before the call. A seeded request is run in a call of its own, since rows
            sampled together draw from one generator and its result would depend on its neighbours.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:  # greedy: also neutralise sampling defaults a generation_config may carry
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class Completion:
    """One row's answer: the text, why it ended (``stop``: end-of-sequence or a stop string; ``length``: max_tokens)
    and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    ids: list[int]
    adapter: str
    max_tokens: int
    stop: tuple[str, ...]
    sampling: Sampling
    key: tuple
    future: Future = field(default_factory=Future)


@dataclass
class _Task:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()
_request_ids = itertools.count()


class Scheduler:
    """Queues rows (one prompt each) and runs them in batches on a worker thread that alone touches the model.

    The worker takes the oldest waiting row, waits up to ``batch_wait_ms`` for more (stopping early once
    ``max_batch_size`` rows with the same sampling settings are there), left-pads the prompts and runs one
    ``generate()`` with one adapter name per row. Rows with other settings wait for the next call.

    Attributes:
        generate_calls: How many ``generate()`` calls ran; ``batch_sizes`` holds the row counts of the last 1000.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 device: str | torch.device = "cpu") -> None:
        if max_batch_size < 1 or batch_wait_ms < 0:
            raise ConfigError("max_batch_size must be at least 1 and batch_wait_ms at least 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.device = torch.device(device)
        self.generate_calls = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self._queue: queue.Queue = queue.Queue()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use from several threads
        self._thread: threading.Thread | None = None
        config = getattr(model, "config", None)
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self._eos = {e for e in [*eos, tokenizer.eos_token_id] if e is not None}

    # --- adapters -------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter (peft format; deltatune's checked loading). On the worker once it runs: use :meth:`call`.

        Raises:
            AdapterStateError: the name is invalid or taken.
            ConfigError: a prompt-learning adapter, or one trained for a task other than causal LM.
            AdapterLoadError: missing, corrupt or mismatched weights.
        """
        validate_adapter_name(name)
        if name in self.adapters:
            raise AdapterStateError(f"an adapter named {name!r} is already loaded")
        config, source = read_config_file(path)
        if isinstance(get_method(config.peft_type, source=source), PromptMethod):
            raise ConfigError(f"{source}: {config.peft_type.value} is a prompt-learning method; serving batches "
                              f"adapters per row, which only layer adapters (LoRA, IA3, ...) support")
        if config.task_type not in (None, TaskType.CAUSAL_LM):
            raise ConfigError(f"{source}: a {config.task_type.value} adapter; serving generates text, which needs a "
                              f"{TaskType.CAUSAL_LM.value} adapter")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.to(self.device).eval()

    # --- queueing -------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, chat: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a prompt: raw text with the tokenizer's special tokens, or ``chat`` messages in the chat
        template (the template adds the special tokens)."""
        with self._tokenizer_lock:
            if chat is None:
                return self.tokenizer(text, add_special_tokens=True)["input_ids"]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, prompts: Sequence[list[int]], adapter: str, max_tokens: int, sampling: Sampling,
               stop: Sequence[str] = ()) -> list[Future]:
        """Queue one row per prompt; each future resolves to a :class:`Completion`."""
        key = (sampling,) if sampling.seed is None else (sampling, next(_request_ids))  # see Sampling.seed
        rows = [_Row(list(ids), adapter, max_tokens, tuple(stop), sampling, key) for ids in prompts]
        self._queue.put(rows)  # as one item: a request's rows reach the worker together
        return [row.future for row in rows]

    @property
    def waiting(self) -> int:
        """Requests and tasks queued that the worker has not taken yet."""
        return self._queue.qsize()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker between two batches (e.g. loading an adapter while serving)."""
        task = _Task(fn)
        self._queue.put(task)
        return task.future

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="deltatune-serve", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    # --- the worker -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: deque = deque()  # rows, tasks and _STOP taken from the queue, in order
        while True:
            if not pending:
                self._take(pending, self._queue.get())
            head = pending.popleft()
            if head is _STOP:
                return
            if isinstance(head, _Task):
                _settle(head.future, head.fn)
                continue
            pending.appendleft(head)
            batch = self._take_batch(pending, head.key)
            _settle_rows(batch, self._generate)

    def _take_batch(self, pending: deque, key: tuple) -> list[_Row]:
        """Wait up to ``batch_wait`` for rows, then remove and return up to ``max_batch_size`` rows with ``key``.

        A seeded request's key is its own, and its rows came together: nothing can join them, so they do not wait.
        """
        alone = key[0].seed is not None
        deadline = time.monotonic() + (0 if alone else self.batch_wait)
        while sum(isinstance(r, _Row) and r.key == key for r in pending) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                self._take(pending, self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        batch = [r for r in pending if isinstance(r, _Row) and r.key == key][: self.max_batch_size]
        for row in batch:
            pending.remove(row)
        return batch

    @staticmethod
    def _take(pending: deque, item: Any) -> None:
        if isinstance(item, list):
            pending.extend(item)
        else:
            pending.append(item)

    def _generate(self, batch: list[_Row]) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(r.ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in batch], device=self.device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=self.device)
        sampling = batch[0].sampling
        kwargs = dict(max_new_tokens=max(r.max_tokens for r in batch), pad_token_id=pad, use_cache=True,
                      **sampling.generate_kwargs())
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [r.adapter for r in batch]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # (B, T + new)
        self.generate_calls += 1
        self.batch_sizes.append(len(batch))
        return [self._finish(row, tokens) for row, tokens in zip(batch, out[:, width:].tolist())]

    def _finish(self, row: _Row, tokens: list[int]) -> Completion:
        tokens = tokens[: row.max_tokens]
        end = next((i for i, t in enumerate(tokens) if t in self._eos), None)
        reason = "length" if end is None else "stop"
        used = len(tokens) if end is None else end + 1
        with self._tokenizer_lock:
            text = self.tokenizer.decode(tokens[:used], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=None)
        if cut is not None:
            text, reason = text[:cut], "stop"
        return Completion(text, reason, len(row.ids), used)


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)


def _settle_rows(rows: list[_Row], fn: Callable[[list[_Row]], list[Completion]]) -> None:
    try:
        results = fn(rows)
    except Exception as exc:
        for row in rows:
            row.future.set_exception(exc)
        return
    for row, result in zip(rows, results):
        row.future.set_result(result)


# --- the API -------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error"}
_KINDS = {str: "a string", int: "an integer", float: "a number", list: "a list"}


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "code": status}}


def _get(body: dict, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    """``body[name]`` if present and not null, else ``default``; 400 when it has another type (JSON true and false
    are not numbers here)."""
    value = body.get(name)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) or not isinstance(value, types):
        raise ApiError(400, f"{name!r} must be {' or '.join(_KINDS[t] for t in types)}, got {json.dumps(value)}")
    return value


class Api:
    """The endpoints, OpenAI-compatible in shape (as vLLM serves LoRA adapters): ``POST /v1/completions``,
    ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and, when allowed, ``POST
    /v1/load_lora_adapter``. The ``model`` field of a request names an adapter or the base model."""

    def __init__(self, scheduler: Scheduler, base_name: str, *, allow_adapter_loading: bool = False) -> None:
        self.scheduler = scheduler
        self.base_name = base_name
        self.allow_adapter_loading = allow_adapter_loading
        self.created = int(time.time())

    def handle(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        """``(HTTP status, JSON object)`` for one request; never raises."""
        routes = {
            ("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
            ("POST", "/v1/completions"): self._completions, ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/load_lora_adapter"): self._load_adapter,
        }
        path = path.split("?", 1)[0].rstrip("/") or "/"
        try:
            route = routes.get((method, path))
            if route is None:
                if any(p == path for _, p in routes):
                    raise ApiError(405, f"{method} is not allowed on {path}")
                raise ApiError(404, f"no endpoint {path}; endpoints: {', '.join(sorted({p for _, p in routes}))}")
            return 200, route(self._json(body) if method == "POST" else {})
        except ApiError as exc:
            status, message = exc.status, str(exc)
        except DeltatuneError as exc:
            status, message = 400, str(exc)
        except Exception as exc:
            status, message = 500, f"{type(exc).__name__}: {exc}"
        return status, _error(status, message)

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def _health(self, _: dict) -> dict:
        s = self.scheduler
        return {"status": "ok", "adapters": s.adapters, "waiting": s.waiting, "generate_calls": s.generate_calls}

    def _models(self, _: dict) -> dict:
        card = {"object": "model", "created": self.created, "owned_by": "deltatune", "root": self.base_name}
        return {"object": "list", "data": [{"id": self.base_name, **card, "parent": None}]
                + [{"id": name, **card, "parent": self.base_name} for name in self.scheduler.adapters]}

    def _adapter(self, body: dict) -> tuple[str, str]:
        """``(model as requested, adapter name for the row)``."""
        name = _get(body, "model", str)
        if name is None:
            raise ApiError(400, "'model' is required: the base model or an adapter name (see GET /v1/models)")
        if name == self.base_name:
            return name, BASE_ADAPTER
        if name not in self.scheduler.adapters:
            known = ", ".join([self.base_name, *self.scheduler.adapters])
            raise ApiError(404, f"model {name!r} is not served here; available: {known}")
        return name, name

    def _settings(self, body: dict, prompts: list[list[int]]) -> tuple[int, Sampling, tuple[str, ...]]:
        if body.get("stream"):
            raise ApiError(400, "'stream' is not supported; send stream=false")
        if _get(body, "n", int, 1) != 1:
            raise ApiError(400, "'n' must be 1 (one answer per prompt)")
        max_tokens = _get(body, "max_tokens", int, _get(body, "max_completion_tokens", int, 16))
        context, longest = self.scheduler.context_length, max(len(p) for p in prompts)
        if max_tokens < 1:
            raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}")
        if context is not None and longest + max_tokens > context:
            raise ApiError(400, f"'max_tokens' is {max_tokens} but the model's context of {context} tokens leaves "
                                f"{context - longest} after the {longest}-token prompt")
        temperature = float(_get(body, "temperature", (int, float), 1.0))
        top_p = float(_get(body, "top_p", (int, float), 1.0))
        if temperature < 0 or not 0 < top_p <= 1:
            raise ApiError(400, f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        seed = _get(body, "seed", int)
        stop = _get(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "'stop' must be a non-empty string or a list of them")
        sampling = Sampling(temperature, top_p, seed) if temperature else Sampling(0.0, 1.0, None)  # greedy ignores them
        return max_tokens, sampling, tuple(stop)

    def _run(self, body: dict, prompts: list[list[int]], adapter: str) -> list[Completion]:
        if not all(prompts):
            raise ApiError(400, "a prompt encodes to no tokens; send a non-empty prompt")
        max_tokens, sampling, stop = self._settings(body, prompts)
        futures = self.scheduler.submit(prompts, adapter, max_tokens, sampling, stop)
        return [f.result() for f in futures]

    @staticmethod
    def _usage(results: list[Completion]) -> dict:
        prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completions(self, body: dict) -> dict:
        model, adapter = self._adapter(body)
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings")
        results = self._run(body, [self.scheduler.encode(t) for t in texts], adapter)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model, "usage": self._usage(results),
                "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                            for i, r in enumerate(results)]}

    def _chat(self, body: dict) -> dict:
        model, adapter = self._adapter(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
        if not getattr(self.scheduler.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        results = self._run(body, [self.scheduler.encode("", chat=chat)], adapter)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "usage": self._usage(results),
                "choices": [{"index": 0, "finish_reason": results[0].finish_reason,
                             "message": {"role": "assistant", "content": results[0].text}}]}

    def _load_adapter(self, body: dict) -> dict:
        """vLLM's runtime-loading endpoint: ``{"lora_name": ..., "lora_path": ...}``."""
        if not self.allow_adapter_loading:
            raise ApiError(403, "loading adapters at run time is off; start the server with --allow-adapter-loading")
        name, path = _get(body, "lora_name", str), _get(body, "lora_path", str)
        if not name or not path:
            raise ApiError(400, "'lora_name' and 'lora_path' are required strings")
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base model's name; choose another adapter name")
        self.scheduler.call(lambda: self.scheduler.load_adapter(name, path)).result()
        return {"id": name, "object": "model", "parent": self.base_name}


# --- HTTP ----------------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server_version = "deltatune-serve"
    protocol_version = "HTTP/1.1"
    api: Api

    def do_GET(self) -> None:
        self._reply(*self.api.handle("GET", self.path))

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would otherwise be taken for the next request
            status = 413 if length > MAX_BODY_BYTES else 400
            return self._reply(status, _error(status, f"Content-Length must be 0 to {MAX_BODY_BYTES} bytes"))
        self._reply(*self.api.handle("POST", self.path, self.rfile.read(length)))

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def http_server(api: Api, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> ThreadingHTTPServer:
    """A threaded HTTP server (one thread per connection) answering with ``api``; port 0 picks a free one."""
    attrs: dict[str, Any] = {"api": api}
    if quiet:
        attrs["log_message"] = lambda self, *args: None
    handler = type("Handler", (_Handler,), attrs)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server

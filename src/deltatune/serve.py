"""Serve one base model and several adapters over an OpenAI-style HTTP API, batching requests across adapters.

Generation is :mod:`deltatune.engine`'s continuous batching: requests join and leave the running batch at token
boundaries, each row with its own adapter (``adapter_names``, ``"__base__"`` for the base model) and its own sampling
settings (:class:`deltatune.sampling.SamplingParams`).

Three parts, each usable without the next: :class:`Scheduler` (the engine, adapter loading and prompt encoding),
:class:`Api` (the endpoints as a pure ``(method, path, body) -> (status, json)`` function) and :func:`http_server`
(stdlib ``ThreadingHTTPServer`` glue).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .config import TaskType, read_config_file
from .engine import Engine, Handle, Request, RequestOutput
from .errors import AdapterStateError, ConfigError, DeltatuneError
from .files import BASE_ADAPTER, validate_adapter_name
from .model import PeftModel
from .registry import PromptMethod, get_method
from .sampling import SamplingParams

MAX_BODY_BYTES = 16 * 2**20


class Scheduler:
    """The model host of the server: the :class:`~deltatune.engine.Engine` (continuous batching on the one worker
    thread that owns the model), adapter loading and prompt encoding.

    Attributes:
        engine: Submit :class:`~deltatune.engine.Request`\\ s to it; its counters and queue are the server's metrics.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 device: str | torch.device = "cpu", max_queue: int = 256) -> None:
        if max_batch_size < 1 or batch_wait_ms < 0:
            raise ConfigError("max_batch_size must be at least 1 and batch_wait_ms at least 0")
        self.device = torch.device(device)
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                             max_queue=max_queue, device=self.device)
        self.tokenizer = tokenizer
        self.context_length = self.engine.context_length

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    # --- adapters -------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self.engine.adapters

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
        if not get_method(config.peft_type, source=source).mixed_batches:  # e.g. adaption prompts
            raise ConfigError(f"{source}: {config.peft_type.value} adapters cannot be batched per row, as serving does")
        if config.task_type not in (None, TaskType.CAUSAL_LM):
            raise ConfigError(f"{source}: a {config.task_type.value} adapter; serving generates text, which needs a "
                              f"{TaskType.CAUSAL_LM.value} adapter")
        model = self.engine.model
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        self.engine.model = model.to(self.device).eval()

    # --- queueing -------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, chat: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a prompt: raw text with the tokenizer's special tokens, or ``chat`` messages in the chat
        template (the template adds the special tokens)."""
        with self.engine.tokenizer_lock:
            if chat is None:
                return self.tokenizer(text, add_special_tokens=True)["input_ids"]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, request: Request) -> Handle:
        """Queue one request (see :mod:`deltatune.engine` for the handle and what it raises)."""
        return self.engine.submit(request)

    @property
    def waiting(self) -> int:
        """Requests queued that have not joined the running batch yet."""
        return self.engine.queue_depth

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker between two steps (e.g. loading an adapter while serving)."""
        return self.engine.call(fn)

    def start(self) -> Scheduler:
        self.engine.start()
        return self

    def close(self) -> None:
        self.engine.close()


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
        return {"status": "ok", "adapters": s.adapters, "waiting": s.waiting, "running": s.engine.running}

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

    def _settings(self, body: dict, prompts: list[list[int]]) -> SamplingParams:
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
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop))

    def _run(self, body: dict, prompts: list[list[int]], adapter: str) -> list[RequestOutput]:
        if not all(prompts):
            raise ApiError(400, "a prompt encodes to no tokens; send a non-empty prompt")
        params = self._settings(body, prompts)
        handles = [self.scheduler.submit(Request(ids, adapter, params)) for ids in prompts]
        return [h.result() for h in handles]

    @staticmethod
    def _usage(results: list[RequestOutput]) -> dict:
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
                "choices": [{"index": i, "text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                             "logprobs": None} for i, r in enumerate(results)]}

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
                "choices": [{"index": 0, "finish_reason": results[0].choices[0].finish_reason,
                             "message": {"role": "assistant", "content": results[0].choices[0].text}}]}

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

"""Serve one base model and several adapters over an OpenAI/vLLM-compatible HTTP API.

Generation is :mod:`deltatune.engine`'s continuous batching: requests join and leave the running batch at token
boundaries, each row with its own adapter and sampling settings. This module is everything around it:

* adapters (:class:`AdapterPool`): which are served, loaded, on the device; vLLM's ``--max-loras`` /
  ``--max-cpu-loras`` limits with LRU eviction; runtime load and unload that really frees; adapter chat templates;
* :class:`Api`: the endpoints as a function ``(method, path, body, headers) -> Reply``: every request field parsed,
  checked and either handed to the engine or refused by name, answers whole or as server-sent events, API keys,
  metrics;
* :func:`http_server`: stdlib ``ThreadingHTTPServer`` glue (chunked streaming, body limits, in-flight counting for a
  graceful stop). ``docs/serving.md`` is the user's view.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import hmac
import itertools
import json
import os
import queue
import threading
import time
import urllib.parse
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .config import TaskType, read_config_file
from .engine import Engine, EngineClosed, Handle, QueueFull, Request, TokenEvent, TokenLogprob
from .errors import AdapterStateError, ConfigError, DeltatuneError
from .files import BASE_ADAPTER, read_json_file, validate_adapter_name
from .model import PeftModel
from .registry import PromptMethod, get_method
from .sampling import SamplingParams

MAX_BODY_BYTES = 16 * 2**20


# --- adapters ------------------------------------------------------------------------------------------------------

def check_servable(path: str, max_rank: int | None = None) -> None:
    """Refuse an adapter that cannot be served, from its config alone (before any weight is read).

    Raises:
        ConfigError: a prompt-learning adapter (no per-row batching), one trained for a task other than causal LM,
            or a rank above ``max_rank`` (vLLM's ``--max-lora-rank``).
    """
    config, source = read_config_file(path)
    method = get_method(config.peft_type, source=source)
    if isinstance(method, PromptMethod):
        raise ConfigError(f"{source}: {config.peft_type.value} is a prompt-learning method; serving batches "
                          f"adapters per row, which only layer adapters (LoRA, IA3, ...) support")
    if not method.mixed_batches:  # e.g. adaption prompts
        raise ConfigError(f"{source}: {config.peft_type.value} adapters cannot be batched per row, as serving does")
    if getattr(config, "alora_invocation_tokens", None):  # the engine's decode steps do not carry the prompt's offsets
        raise ConfigError(f"{source}: an activated LoRA (alora_invocation_tokens) cannot be served yet; use "
                          f"PeftModel.generate")
    if method.num_tasks is not None:  # Poly
        raise ConfigError(f"{source}: {config.peft_type.value} adapters need task_ids (a task index per row), which "
                          f"serving requests have no field for")
    if config.task_type not in (None, TaskType.CAUSAL_LM):
        raise ConfigError(f"{source}: a {config.task_type.value} adapter; serving generates text, which needs a "
                          f"{TaskType.CAUSAL_LM.value} adapter")
    ranks = [getattr(config, "r", None), *(getattr(config, "rank_pattern", None) or {}).values()]
    rank = max((r for r in ranks if isinstance(r, int)), default=None)
    if max_rank is not None and rank is not None and rank > max_rank:
        raise ConfigError(f"{source}: rank {rank} is above --max-lora-rank {max_rank}")


def load_adapter(model: torch.nn.Module, name: str, path: str, device: torch.device) -> PeftModel:
    """``model`` with adapter ``name`` loaded from ``path`` (peft format; deltatune's checked loading), on ``device``:
    the same :class:`PeftModel`, or a new one around a plain model.

    Raises:
        AdapterStateError: the name is invalid or taken.
        ConfigError: see :func:`check_servable`.
        AdapterLoadError: missing, corrupt or mismatched weights (the model is unchanged).
    """
    validate_adapter_name(name)
    if isinstance(model, PeftModel) and name in model.peft_config:
        raise AdapterStateError(f"an adapter named {name!r} is already loaded")
    check_servable(path)
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, path, adapter_name=name)
    move_adapter(model, name, device)  # only this adapter: others may have been moved to CPU on purpose
    return model.eval()


def delete_adapter(model: PeftModel, name: str) -> torch.nn.Module:
    """``model`` without adapter ``name``, its tensors released: the base model itself once no adapter is left."""
    others = [n for n in model.peft_config if n != name]
    if not others:
        return model.unload()
    if name in model.active_adapters:
        model.set_adapter(others[0], inference_mode=True)  # served adapters never train
    model.delete_adapter(name)
    return model


def move_adapter(model: PeftModel, name: str, device: torch.device) -> None:
    """Move adapter ``name``'s tensors (every layer's delta and ``modules_to_save`` copy, shared tensors) to
    ``device``, leaving the base model and the other adapters where they are."""
    from .inject import adapter_layers, save_wrappers

    base = model.get_base_model()
    for _, layer in adapter_layers(base):
        if name in layer.deltas:
            layer.deltas[name].to(device)
    for _, wrapper in save_wrappers(base):
        if name in wrapper.modules_to_save:
            wrapper.modules_to_save[name].to(device)
    if name in model.base_model.shared_state:
        model.base_model.shared_state[name].to(device)


def adapter_chat_template(path: str) -> str | None:
    """The chat template an adapter directory ships (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``: a string, or the entry named ``default`` of a list), or ``None``."""
    if not os.path.isdir(path):
        return None
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8", errors="replace") as f:
            return f.read(MAX_BODY_BYTES)
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    data = read_json_file(config, max_bytes=MAX_BODY_BYTES)
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


class AdapterPool:
    """The adapters a server knows, which of them are in memory and which on the device, with vLLM's limits.

    Every known adapter can be requested; ``max_cpu_loras`` bounds how many are loaded at once (the least recently
    used one that no request holds is deleted, its memory freed, and loaded again from its path when next asked for)
    and ``max_loras`` how many sit on the device at once (the least recently used idle one moves to CPU memory), which
    also bounds how many adapters run in one batch. A request holds its adapter from :meth:`acquire` to
    :meth:`release`. Model changes run on the engine's model thread (``engine.call``).

    Attributes:
        loads, evictions: How many adapter loads (first and repeated) and deletions to make room happened.
    """

    def __init__(self, engine: Engine, *, max_loras: int | None = None, max_cpu_loras: int | None = None,
                 max_lora_rank: int | None = None) -> None:
        if max_loras is not None and max_cpu_loras is not None and max_cpu_loras < max_loras:
            raise ConfigError(f"--max-cpu-loras {max_cpu_loras} must be at least --max-loras {max_loras}")
        self.engine = engine
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.paths: dict[str, str] = {}
        self.templates: dict[str, str | None] = {}
        self.loads = self.evictions = 0
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._on_device: OrderedDict[str, None] = OrderedDict()
        self._holds: Counter[str] = Counter()
        self._cond = threading.Condition()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def add(self, name: str, path: str) -> None:
        """Make adapter ``name`` servable from ``path``: checked now and loaded now (evicting another if full), so a
        bad adapter fails here rather than on its first request."""
        validate_adapter_name(name)
        check_servable(path, self.max_lora_rank)
        template = adapter_chat_template(path)
        with self._cond:
            if name in self.paths:
                raise AdapterStateError(f"an adapter named {name!r} is already loaded")
            self.paths[name] = path
        try:
            self.acquire(name)
        except BaseException:
            with self._cond:
                del self.paths[name]
            raise
        self.release(name)
        self.templates[name] = template

    def remove(self, name: str, timeout: float | None = None) -> None:
        """Stop serving adapter ``name`` (new requests get 404 at once), wait for its requests to finish and delete
        it from the model, releasing its memory."""
        with self._cond:
            if name not in self.paths:
                raise AdapterStateError(f"no adapter named {name!r} is loaded")
            path, template = self.paths.pop(name), self.templates.pop(name, None)
            if not self._cond.wait_for(lambda: not self._holds[name], timeout):
                self.paths[name], self.templates[name] = path, template
                raise TimeoutError(f"adapter {name!r} is still in use after {timeout} s; it stays loaded")
            if name in self._loaded:
                self._unload(name)

    def acquire(self, name: str, timeout: float | None = None) -> None:
        """Hold adapter ``name`` for a request: loaded and on the device until :meth:`release`. Waits while every
        slot is held by other requests.

        Raises:
            AdapterStateError: no such adapter. TimeoutError: no slot freed in time.
        """
        with self._cond:
            def ready() -> bool:
                if name not in self.paths:
                    raise AdapterStateError(f"no adapter named {name!r} is loaded")
                return name in self._on_device or self._room(self._on_device, self.max_loras) is not None and (
                    name in self._loaded or self._room(self._loaded, self.max_cpu_loras) is not None)

            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(f"every adapter slot stayed in use for {timeout} s")
            if name not in self._on_device:
                if name not in self._loaded:  # first make room in memory (which may free a device slot too)
                    victim = self._room(self._loaded, self.max_cpu_loras)
                    if victim:
                        self._unload(victim)
                victim = self._room(self._on_device, self.max_loras)
                if victim:
                    self._run(lambda: move_adapter(self.engine.model, victim, torch.device("cpu")))
                    del self._on_device[victim]
                if name in self._loaded:
                    self._run(lambda: move_adapter(self.engine.model, name, self.engine.device))
                else:
                    self._run(lambda: setattr(self.engine, "model", load_adapter(
                        self.engine.model, name, self.paths[name], self.engine.device)))
                    self.loads += 1
                    self._loaded[name] = None
                self._on_device[name] = None
            self._holds[name] += 1
            self._loaded.move_to_end(name)
            self._on_device.move_to_end(name)

    def release(self, name: str) -> None:
        with self._cond:
            self._holds[name] -= 1
            self._cond.notify_all()

    def _room(self, tier: OrderedDict[str, None], limit: int | None) -> str | None:
        """``""`` when ``tier`` has a free place, else the least recently used adapter in it that no request holds
        (the one to move out), or ``None``: full and every adapter held."""
        if limit is None or len(tier) < limit:
            return ""
        return next((n for n in tier if not self._holds[n]), None)

    def _unload(self, name: str) -> None:
        self._run(lambda: setattr(self.engine, "model", delete_adapter(self.engine.model, name)))
        self._loaded.pop(name, None)
        self._on_device.pop(name, None)
        self.evictions += name in self.paths  # still served: an eviction, not a removal
        gc.collect()
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run(self, fn: Callable[[], Any]) -> Any:
        return self.engine.call(fn).result()


# --- the engine seen by the API ------------------------------------------------------------------------------------

class _Answers:
    """The events of one API request's engine requests (one per prompt, ``n`` answers each) as one stream: choice
    ``i * n + j`` is prompt ``i``'s answer ``j``, as in vLLM and OpenAI. A thread per handle forwards its events into
    one queue, so that the reader can wait with a deadline."""

    def __init__(self, handles: list[Handle], n: int) -> None:
        self.handles = handles
        self._queue: queue.Queue = queue.Queue()
        for offset, handle in enumerate(handles):
            threading.Thread(target=self._forward, args=(handle, offset * n), daemon=True).start()

    def _forward(self, handle: Handle, offset: int) -> None:
        try:
            for event in handle:
                self._queue.put(dataclasses.replace(event, index=offset + event.index))
            self._queue.put(None)
        except BaseException as exc:  # the request failed in the engine: the reader raises it
            self._queue.put(exc)

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every event until every handle ended. Raises ``TimeoutError`` at ``timeout`` seconds from now, or the
        engine's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        open_handles = len(self.handles)
        while open_handles:
            try:
                item = self._queue.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError from None
            if item is None:
                open_handles -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def submit(engine: Engine, prompts: list[list[int]], adapter: str, params: SamplingParams) -> _Answers:
    """One engine request per prompt, all or none (a later one refused cancels the earlier ones)."""
    handles: list[Handle] = []
    try:
        for ids in prompts:
            handles.append(engine.submit(Request(ids, adapter, params)))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return _Answers(handles, params.n)


# --- requests ------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, a message for the client, and extra response headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "BadRequestError", 411: "BadRequestError", 413: "BadRequestError",
                500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError"}
_KINDS = {str: "a string", int: "an integer", float: "a number", list: "a list", bool: "a boolean", dict: "an object"}
MAX_N = 128
MAX_STOP = 16
MAX_LOGPROBS = 20


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "code": status, "param": None}}


class _Fields:
    """A request body read field by field; :meth:`rest` names the fields nothing read, which the API refuses, so no
    parameter is ever silently ignored."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.read: set[str] = set()

    def get(self, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
        """``body[name]`` if present and not null, else ``default``; 400 when it has another type (JSON true and
        false are not numbers here)."""
        self.read.add(name)
        value = self.body.get(name)
        if value is None:
            return default
        types = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ApiError(400, f"{name!r} must be {' or '.join(_KINDS[t] for t in types)}, got {json.dumps(value)}")
        return value

    def number(self, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
        value = float(self.get(name, (int, float), default))
        if not (low < value if open_low else low <= value) or not value <= high:
            raise ApiError(400, f"{name!r} must be {'>' if open_low else '>='} {low} and <= {high}, got {value}")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.get(name, int, default)
        if value is not None and not low <= value <= high:
            raise ApiError(400, f"{name!r} must be {low} to {high}, got {value}")
        return value

    def neutral(self, name: str, *values: Any, why: str) -> None:
        """Accept ``name`` only at a value that asks for what the server does anyway (e.g. ``logit_bias: {}``)."""
        self.read.add(name)
        if name in self.body and self.body[name] is not None and self.body[name] not in values:
            raise ApiError(400, f"{name!r} is not supported: {why}")

    def rest(self) -> list[str]:
        return sorted(set(self.body) - self.read)


@dataclass
class Job:
    """A parsed completion or chat request: what to run and how to answer."""

    model: str
    adapter: str
    prompts: list[list[int]]
    params: SamplingParams
    chat: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: list[str] | None = None  # per prompt: text put before each of its answers
    request_id: str | None = None


# --- the API -------------------------------------------------------------------------------------------------------

@dataclass
class Reply:
    """An HTTP answer: a JSON object, a text (``/metrics``), or (``stream``) server-sent events written as they
    come."""

    status: int
    body: dict | str | None = None
    stream: Generator[bytes, None, None] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    close: Callable[[], None] | None = None  # called once the reply is written or could not be


class Api:
    """The endpoints, OpenAI-compatible as vLLM's server: ``POST /v1/completions`` and ``/v1/chat/completions``
    (streamed as server-sent events on request), ``GET /v1/models`` and ``/v1/models/{id}``, ``POST
    /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (when allowed), ``GET /health`` and ``GET /metrics``.
    The ``model`` field of a request names an adapter or the base model.

    ``handle(method, path, body, headers) -> Reply`` is the whole server without sockets; :func:`http_server` puts it
    on a port.
    """

    def __init__(self, engine: Engine, pool: AdapterPool, base_name: str, *, allow_adapter_loading: bool = False,
                 api_key: str | None = None, request_timeout: float | None = None) -> None:
        self.engine = engine
        self.pool = pool
        self.base_name = base_name
        self.allow_adapter_loading = allow_adapter_loading
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.created = int(time.time())
        self.closing = False
        self.metrics = Metrics()
        tokenizer = engine.tokenizer
        self.vocab_size = max(len(tokenizer), getattr(getattr(engine.model, "config", None), "vocab_size", 0) or 0)

    # --- dispatch -------------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Reply:
        """The reply to one request; never raises."""
        routes: dict[tuple[str, str], Callable[[dict], Reply | dict]] = {
            ("GET", "/health"): self._health, ("GET", "/metrics"): self._metrics, ("GET", "/v1/models"): self._models,
            ("POST", "/v1/completions"): self._completions, ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/load_lora_adapter"): self._load_adapter,
            ("POST", "/v1/unload_lora_adapter"): self._unload_adapter,
        }
        path = path.split("?", 1)[0].rstrip("/") or "/"
        models = method == "GET" and path.startswith("/v1/models/")
        endpoint = "/v1/models/{id}" if models else path if any(p == path for _, p in routes) else "other"
        try:
            if path.startswith("/v1/"):
                self._authorize(headers or {})
            if models:
                reply = self._model(urllib.parse.unquote(path[len("/v1/models/"):]))
            else:
                route = routes.get((method, path))
                if route is None:
                    if endpoint != "other":
                        raise ApiError(405, f"{method} is not allowed on {path}")
                    raise ApiError(404, f"no endpoint {path}; endpoints: {', '.join(sorted({p for _, p in routes}))}")
                if self.closing and method == "POST":
                    raise ApiError(503, "the server is shutting down", {"Connection": "close"})
                reply = route(self._json(body) if method == "POST" else {})
            reply = reply if isinstance(reply, Reply) else Reply(200, reply)
        except ApiError as exc:
            reply = Reply(exc.status, _error(exc.status, str(exc)), headers=exc.headers)
        except QueueFull as exc:
            reply = Reply(503, _error(503, f"{exc}; retry later"), headers={"Retry-After": "1"})
        except EngineClosed as exc:
            reply = Reply(503, _error(503, str(exc)), headers={"Connection": "close"})
        except TimeoutError as exc:
            reply = Reply(504, _error(504, str(exc) or "the request timed out"))
        except DeltatuneError as exc:
            reply = Reply(400, _error(400, str(exc)))
        except Exception as exc:
            reply = Reply(500, _error(500, f"{type(exc).__name__}: {exc}"))
        self.metrics.count("deltatune_requests_total", endpoint=endpoint, status=str(reply.status))
        return reply

    def _authorize(self, headers: Mapping[str, str]) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (headers.get("Authorization") or headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    # --- models and adapters --------------------------------------------------------------------------------------
    def _health(self, _: dict) -> dict:
        return {"status": "shutting down" if self.closing else "ok", "adapters": self.pool.names,
                "loaded": self.pool.loaded, "waiting": self.engine.queue_depth, "running": self.engine.running}

    def _card(self, name: str) -> dict:
        parent = None if name == self.base_name else self.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "deltatune",
                "root": self.base_name if parent is None else self.pool.paths[name], "parent": parent,
                "max_model_len": self.engine.context_length}

    def _models(self, _: dict) -> dict:
        return {"object": "list", "data": [self._card(n) for n in [self.base_name, *self.pool.names]]}

    def _model(self, name: str) -> dict:
        if name != self.base_name and name not in self.pool.paths:
            raise ApiError(404, f"model {name!r} is not served here; available: {self._available()}")
        return self._card(name)

    def _available(self) -> str:
        return ", ".join([self.base_name, *self.pool.names])

    def _adapter_request(self, body: dict, action: str) -> tuple[_Fields, str]:
        """The body's fields and its ``lora_name``, once runtime changes are known to be allowed."""
        if not self.allow_adapter_loading:
            raise ApiError(403, f"{action} adapters at run time is off; start the server with "
                                f"--allow-adapter-loading (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")
        fields = _Fields(body)
        name = fields.get("lora_name", str)
        if not name:
            raise ApiError(400, "'lora_name' is required")
        return fields, name

    @staticmethod
    def _no_rest(fields: _Fields) -> None:
        if fields.rest():
            raise ApiError(400, f"unknown field(s) {', '.join(map(repr, fields.rest()))}")

    def _load_adapter(self, body: dict) -> dict:
        """vLLM's runtime loading: ``{"lora_name": ..., "lora_path": ...}`` (a path on the server)."""
        fields, name = self._adapter_request(body, "loading")
        path = fields.get("lora_path", str)
        fields.neutral("load_inplace", False, why="replacing a loaded adapter in place; unload it first")
        if not path:
            raise ApiError(400, "'lora_path' is required")
        self._no_rest(fields)
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base model's name; choose another adapter name")
        self.pool.add(name, path)
        return self._card(name)

    def _unload_adapter(self, body: dict) -> dict:
        """vLLM's runtime unloading: ``{"lora_name": ...}``; waits for the adapter's requests, then frees it."""
        fields, name = self._adapter_request(body, "unloading")
        fields.neutral("lora_int_id", why="adapters are named here, not numbered")
        self._no_rest(fields)
        if name not in self.pool.paths:
            raise ApiError(404, f"no adapter {name!r} is loaded; loaded: {', '.join(self.pool.names) or 'none'}")
        self.pool.remove(name, self.request_timeout)
        return {"id": name, "object": "model", "deleted": True}

    # --- parsing --------------------------------------------------------------------------------------------------
    def _target(self, fields: _Fields) -> tuple[str, str]:
        """``(model as requested, adapter name for the rows)``."""
        name = fields.get("model", str)
        if name is None:
            raise ApiError(400, "'model' is required: the base model or an adapter name (see GET /v1/models)")
        if name == self.base_name:
            return name, BASE_ADAPTER
        if name not in self.pool.paths:
            raise ApiError(404, f"model {name!r} is not served here; available: {self._available()}")
        return name, name

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self.engine.tokenizer_lock:
            return self.engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        with self.engine.tokenizer_lock:
            return self.engine.tokenizer.decode(ids)

    def _token_ids(self, ids: list) -> list[int]:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "a token-id prompt must be a non-empty list of integers")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})")
        return ids

    def _sampling(self, fields: _Fields, prompts: list[list[int]], max_tokens: int | None,
                  logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's settings (vLLM's ``SamplingParams``), every field checked and named when wrong."""
        context, longest = self.engine.context_length, max(len(p) for p in prompts)
        room = None if context is None else context - longest
        if room is not None and room < 1:
            raise ApiError(400, f"the {longest}-token prompt fills the model's context of {context} tokens")
        if max_tokens is None:
            max_tokens = room if room is not None else 16
        if max_tokens < 1:
            raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}")
        if room is not None and max_tokens > room:
            raise ApiError(400, f"'max_tokens' is {max_tokens} but the model's context of {context} tokens leaves "
                                f"{room} after the {longest}-token prompt")
        stop = fields.get("stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
        stop_ids = fields.get("stop_token_ids", list, [])
        if stop_ids:
            self._token_ids(stop_ids)
        n = fields.integer("n", 1, 1, MAX_N)
        best_of = fields.get("best_of", int)
        if best_of is not None and best_of != n:
            raise ApiError(400, f"'best_of' {best_of} is not supported: only best_of = n (every answer returned)")
        fields.neutral("min_tokens", 0, why="a minimum answer length is not implemented")
        fields.neutral("include_stop_str_in_output", False, why="the text always ends before the stop string")
        fields.neutral("spaces_between_special_tokens", True,
                       why="special tokens are decoded as the tokenizer's decoder joins them")
        return SamplingParams(
            n=n, max_tokens=max_tokens,
            temperature=fields.number("temperature", 1.0, 0.0, 1e4),
            top_p=fields.number("top_p", 1.0, 0.0, 1.0, open_low=True),
            top_k=fields.integer("top_k", 0, -1, 2**31),
            min_p=fields.number("min_p", 0.0, 0.0, 1.0),
            presence_penalty=fields.number("presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=fields.number("frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=fields.number("repetition_penalty", 1.0, 0.0, 1e4, open_low=True),
            seed=fields.get("seed", int), stop=tuple(stop), stop_token_ids=tuple(stop_ids),
            ignore_eos=fields.get("ignore_eos", bool, False), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=fields.get("skip_special_tokens", bool, True),
        )

    def _common(self, fields: _Fields, job: Job) -> None:
        """Fields both endpoints share beyond sampling: streaming, ids, informational and neutral ones."""
        job.stream = fields.get("stream", bool, False)
        options = fields.get("stream_options", dict)
        if options is not None:
            if not job.stream:
                raise ApiError(400, "'stream_options' is only allowed with stream=true")
            unknown = set(options) - {"include_usage", "continuous_usage_stats"}
            if unknown:
                raise ApiError(400, f"unknown stream_options {sorted(unknown)}")
            for key in ("include_usage", "continuous_usage_stats"):
                if not isinstance(options.get(key, False), bool):
                    raise ApiError(400, f"'stream_options.{key}' must be a boolean")
            job.include_usage = options.get("include_usage", False)
            job.continuous_usage = options.get("continuous_usage_stats", False)
        job.request_id = fields.get("request_id", str)
        fields.get("user", str)  # an end user's id for the client's own records: no effect on the answer
        fields.neutral("logit_bias", {}, why="biasing token logits is not implemented")
        fields.neutral("use_beam_search", False, why="beam search is not implemented")
        fields.neutral("length_penalty", 1, 1.0, why="it only applies to beam search")
        fields.neutral("priority", 0, why="requests are served in arrival order")
        fields.neutral("response_format", {"type": "text"}, why="structured output is not implemented")

    def _finish_parse(self, fields: _Fields) -> None:
        rest = fields.rest()
        if rest:
            raise ApiError(400, f"unsupported parameter(s) {', '.join(map(repr, rest))}: deltatune serve does not "
                                f"implement them (see docs/serving.md for the parameters it accepts)")

    def parse_completion(self, body: dict) -> Job:
        fields = _Fields(body)
        model, adapter = self._target(fields)
        prompt = fields.get("prompt", (str, list))
        add_special = fields.get("add_special_tokens", bool, True)
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "'prompt' must be a string, a non-empty list of strings, a list of token ids or a "
                                "list of lists of token ids")
        if all(isinstance(p, str) for p in prompt):
            prompts, texts = [self._encode(p, add_special) for p in prompt], list(prompt)
        elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompts = [self._token_ids(prompt)]
            texts = None
        elif all(isinstance(p, list) for p in prompt):
            prompts, texts = [self._token_ids(p) for p in prompt], None
        else:
            raise ApiError(400, "'prompt' must be a string, a non-empty list of strings, a list of token ids or a "
                                "list of lists of token ids")
        prompts = self._truncate(fields, prompts)
        if not all(prompts):
            raise ApiError(400, "a prompt encodes to no tokens; send a non-empty prompt")
        max_tokens = fields.integer("max_tokens", 16, -2**31, 2**31)
        logprobs = fields.integer("logprobs", None, 0, MAX_LOGPROBS)
        echo = fields.get("echo", bool, False)
        job = Job(model, adapter, prompts, self._sampling(fields, prompts, max_tokens, logprobs,
                                                          logprobs if echo else None))
        self._common(fields, job)
        if echo:
            job.echo = texts if texts is not None else [self._decode(p) for p in prompts]
        fields.neutral("suffix", "", why="insertion (a suffix after the completion) is not implemented")
        self._finish_parse(fields)
        return job

    def _truncate(self, fields: _Fields, prompts: list[list[int]]) -> list[list[int]]:
        """vLLM's ``truncate_prompt_tokens``: keep each prompt's last k tokens."""
        keep = fields.integer("truncate_prompt_tokens", None, 1, 2**31)
        return prompts if keep is None else [p[-keep:] for p in prompts]

    def parse_chat(self, body: dict) -> Job:
        fields = _Fields(body)
        model, adapter = self._target(fields)
        messages = self._messages(fields.get("messages", list))
        template = fields.get("chat_template", str) or self.pool.templates.get(adapter) or getattr(
            self.engine.tokenizer, "chat_template", None)
        if not template:
            raise ApiError(400, "this model's tokenizer has no chat template and the request sends none "
                                "('chat_template'); use /v1/completions")
        kwargs = fields.get("chat_template_kwargs", dict, {})
        add_generation_prompt = fields.get("add_generation_prompt", bool, True)
        continue_final = fields.get("continue_final_message", bool, False)
        if continue_final and (add_generation_prompt or messages[-1]["role"] != "assistant"):
            raise ApiError(400, "'continue_final_message' needs add_generation_prompt=false and a final assistant "
                                "message")
        try:
            with self.engine.tokenizer_lock:
                text = self.engine.tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final, **kwargs)
        except ApiError:
            raise
        except Exception as exc:  # a template error (jinja's TemplateError, a raise_exception() in the template)
            raise ApiError(400, f"the chat template failed on these messages: {exc}") from None
        prompts = self._truncate(fields, [self._encode(text, fields.get("add_special_tokens", bool, False))])
        max_tokens = fields.integer("max_completion_tokens", None, -2**31, 2**31)
        max_tokens = fields.integer("max_tokens", max_tokens, -2**31, 2**31)
        top = fields.integer("top_logprobs", None, 0, MAX_LOGPROBS)
        if fields.get("logprobs", bool, False):
            logprobs = top or 0
        elif top:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true")
        else:
            logprobs = None
        job = Job(model, adapter, prompts, self._sampling(fields, prompts, max_tokens, logprobs), chat=True)
        self._common(fields, job)
        if fields.get("echo", bool, False):  # vLLM: the final message starts the answer when its role answers
            last = messages[-1]
            job.echo = [last["content"] if last["role"] == "assistant" else ""]
        fields.neutral("tools", [], why="tool calling is not implemented")
        fields.neutral("tool_choice", "none", why="tool calling is not implemented")
        fields.neutral("parallel_tool_calls", True, False, why="tool calling is not implemented")
        fields.neutral("modalities", ["text"], why="the server answers with text only")
        fields.neutral("store", False, why="the server stores no completions")
        fields.get("safety_identifier", str)  # like 'user': the client's own record, no effect on the answer
        self._finish_parse(fields)
        return job

    @staticmethod
    def _messages(messages: list | None) -> list[dict[str, str]]:
        """Messages as the chat template takes them: content a string (``{"type": "text"}`` parts joined by a
        newline, as vLLM does); any other part type, tool calls or unknown keys refused by name."""
        if not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role'")
            extra = sorted(k for k, v in message.items() if k not in ("role", "content", "name") and v is not None)
            if extra:
                raise ApiError(400, f"messages[{i}]: {', '.join(map(repr, extra))} not supported (no tool calling)")
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                        raise ApiError(400, f"messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} "
                                            f"parts are supported (the model reads text only), got {json.dumps(part)}")
                    parts.append(part["text"])
                content = "\n".join(parts)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts")
            entry = {"role": message["role"], "content": content}
            if isinstance(message.get("name"), str):
                entry["name"] = message["name"]
            out.append(entry)
        return out

    # --- running --------------------------------------------------------------------------------------------------
    def _completions(self, body: dict) -> Reply:
        return self._answer(self.parse_completion(body))

    def _chat(self, body: dict) -> Reply:
        return self._answer(self.parse_chat(body))

    def _answer(self, job: Job) -> Reply:
        """Submit ``job`` holding its adapter, and answer all at once or as a stream of events."""
        timeout = self.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if job.adapter != BASE_ADAPTER:
            try:
                self.pool.acquire(job.adapter, timeout)
            except AdapterStateError as exc:  # unloaded since the request was parsed
                raise ApiError(404, str(exc)) from None
        try:
            answers = submit(self.engine, job.prompts, job.adapter, job.params)
        except BaseException:
            self._release(job)
            raise
        self.metrics.count("deltatune_adapter_requests_total", model=job.model)
        self.metrics.count("deltatune_prompt_tokens_total", sum(map(len, job.prompts)), model=job.model)
        answer = _Answer(job, answers, deadline, self)
        if job.stream:
            return Reply(200, stream=answer.stream(), close=answer.close,
                         headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        return Reply(200, answer.whole())

    def _release(self, job: Job) -> None:
        if job.adapter != BASE_ADAPTER:
            self.pool.release(job.adapter)

    def token_text(self, token_id: int) -> str:
        with self.engine.tokenizer_lock:
            return self.engine.tokenizer.decode([token_id])

    def _metrics(self, _: dict) -> Reply:
        engine = self.engine
        gauges = {
            "deltatune_requests_waiting": ("requests waiting to join the batch", engine.queue_depth),
            "deltatune_batch_size": ("rows in the running batch", engine.running),
            "deltatune_adapters_loaded": ("adapters in memory", len(self.pool.loaded)),
            "deltatune_adapters_served": ("adapters clients may request", len(self.pool.names)),
        }
        counters = {
            "deltatune_decode_steps_total": ("decode steps (one token for every running row)", engine.decode_steps),
            "deltatune_prefills_total": ("prefill forwards (new requests joining)", engine.prefill_calls),
            "deltatune_adapter_loads_total": ("adapter loads, repeated ones after an eviction included",
                                              self.pool.loads),
            "deltatune_adapter_evictions_total": ("adapters deleted from memory to make room", self.pool.evictions),
        }
        text = self.metrics.render(gauges, counters)
        return Reply(200, text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


class _Answer:
    """One request's engine events turned into the OpenAI/vLLM response shapes, whole or streamed."""

    def __init__(self, job: Job, answers: _Answers, deadline: float | None, api: Api) -> None:
        self.job, self.answers, self.deadline, self.api = job, answers, deadline, api
        self.chat = job.chat
        self.n = job.params.n
        self.choices = len(job.prompts) * self.n
        self.id = job.request_id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tokens = [0] * self.choices
        self.offsets = [len(self._echo(i)) for i in range(self.choices)]  # completions' logprobs.text_offset
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self.finished, self.closed = 0, False

    def _events(self) -> Iterator[TokenEvent]:
        """The engine's events until every choice finished; :meth:`close` once they end or the consumer stops early
        (a timeout, a client that went away)."""
        try:
            remaining = None if self.deadline is None else self.deadline - time.monotonic()
            for event in self.answers.events(remaining):
                self.tokens[event.index] += event.token_id is not None
                self.finished += event.finish_reason is not None
                yield event
        except TimeoutError:
            raise TimeoutError(f"the request took longer than the server's --request-timeout "
                               f"{self.api.request_timeout} s; it was cancelled") from None
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what is unfinished and release the adapter, once (also for a stream never started: the HTTP layer
        calls it whatever happened)."""
        if self.closed:
            return
        self.closed = True
        if self.finished < self.choices:
            self.answers.cancel()
        self.api._release(self.job)
        self.api.metrics.count("deltatune_generation_tokens_total", sum(self.tokens), model=self.job.model)
        for handle in self.answers.handles:
            self.api.metrics.observe_request(handle, self.job.model)

    def _echo(self, index: int) -> str:
        return "" if self.job.echo is None else self.job.echo[index // self.n]

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.model}

    # --- logprobs in OpenAI's two shapes ----------------------------------------------------------------------------
    def _logprobs(self, index: int, items: list[TokenLogprob | None], text: str = "") -> dict | None:
        """``items`` (a choice's tokens, in order) as the ``logprobs`` object of a choice or chunk; ``None`` when the
        request asked for none. ``text`` is the text they make up (a chunk's), for the completions' offsets."""
        if self.job.params.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(item) for item in items if item is not None]}
        tokens = [self.api.token_text(item.token_id) if item else self.api.token_text(tid) for item, tid in items]
        out: dict[str, list] = {"tokens": tokens, "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for (item, _), token in zip(items, tokens):
            out["token_logprobs"].append(None if item is None else _finite(item.logprob))
            out["top_logprobs"].append(None if item is None else {
                self.api.token_text(t): _finite(lp) for t, lp in ((item.token_id, item.logprob), *item.top)})
            out["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(token)
        return out

    def _chat_entry(self, item: TokenLogprob) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.api.token_text(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

        return {**entry(item.token_id, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}

    def _prompt_items(self, index: int) -> list:
        """For echo with logprobs (completions): the prompt's tokens with their logprobs (the first has none)."""
        handle = self.answers.handles[index // self.n]
        ids, logprobs = list(handle.request.prompt), handle.prompt_logprobs or []
        return [(logprobs[i] if i < len(logprobs) else None, tid) for i, tid in enumerate(ids)]

    def _items(self, events: list[TokenEvent]) -> list:
        if self.chat:
            return [e.logprob for e in events if e.token_id is not None]
        return [(e.logprob, e.token_id) for e in events if e.token_id is not None]

    # --- whole ----------------------------------------------------------------------------------------------------
    def whole(self) -> dict:
        per_choice: list[list[TokenEvent]] = [[] for _ in range(self.choices)]
        for event in self._events():
            per_choice[event.index].append(event)
        choices = []
        for i, events in enumerate(per_choice):
            text = self._echo(i) + "".join(e.text for e in events)
            reason = next((e.finish_reason for e in reversed(events) if e.finish_reason), None)
            items = self._items(events)
            if self.job.echo is not None and not self.chat and self.job.params.prompt_logprobs is not None:
                items = self._prompt_items(i) + items
                self.offsets[i] = 0
            choice: dict[str, Any] = {"index": i, "logprobs": self._logprobs(i, items), "finish_reason": reason,
                                      "stop_reason": next((e.stop_reason for e in events if e.finish_reason), None)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage()}

    # --- streamed -------------------------------------------------------------------------------------------------
    def _chunk(self, index: int, text: str | None, reason: str | None, logprobs: dict | None = None,
               role: bool = False, stop_reason: str | int | None = None) -> bytes:
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if role
                     else {} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        if reason is not None:
            choice["stop_reason"] = stop_reason
        chunk = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.job.include_usage:  # OpenAI: every chunk carries "usage", null until the final usage chunk
            chunk["usage"] = self.usage() if self.job.continuous_usage else None
        return _sse(chunk)

    def stream(self) -> Iterator[bytes]:
        """Server-sent events as OpenAI and vLLM send them: for chat a first chunk with the role per choice, then one
        chunk per token that adds text or logprobs (the last one of a choice with ``finish_reason``), a usage chunk
        when ``include_usage`` and ``data: [DONE]``. An error after the first chunk is sent as an ``{"error": ...}``
        event (the status is already 200)."""
        events = self._events()
        try:
            for i in range(self.choices):
                if self.chat:
                    yield self._chunk(i, self._echo(i), None, role=True)
                elif self.job.echo is not None:
                    items = self._prompt_items(i) if self.job.params.prompt_logprobs is not None else []
                    self.offsets[i] = 0 if items else self.offsets[i]
                    yield self._chunk(i, self._echo(i), None, self._logprobs(i, items))
            for event in events:
                items = self._items([event])
                if event.text or event.finish_reason or (items and self.job.params.logprobs is not None):
                    text = event.text if event.text or not self.chat else None
                    yield self._chunk(event.index, text, event.finish_reason, self._logprobs(event.index, items),
                                      stop_reason=event.stop_reason)
            if self.job.include_usage:
                yield _sse({**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                            "choices": [], "usage": self.usage()})
        except Exception as exc:
            status = 504 if isinstance(exc, TimeoutError) else 400 if isinstance(exc, DeltatuneError) else 500
            yield _sse(_error(status, str(exc) if status != 500 else f"{type(exc).__name__}: {exc}"))
        finally:
            events.close()
        yield b"data: [DONE]\n\n"


def _finite(logprob: float) -> float:
    """vLLM's stand-in for a logprob of minus infinity (JSON has no infinities)."""
    return max(logprob, -9999.0)


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class Metrics:
    """Counters and latency histograms by label in Prometheus' text format (``# TYPE`` lines,
    ``name{label="value"} number``; a histogram as cumulative ``_bucket{le=...}`` counts, ``_sum`` and ``_count``)."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter[tuple[tuple[str, str], ...]]] = {}
        # name -> labels -> [count per bucket (the last one +Inf), sum of the observed values]
        self._hists: dict[str, dict[tuple[tuple[str, str], ...], list]] = {}
        self._lock = threading.Lock()

    #: Seconds; the bucket bounds vLLM uses for the same three quantities, so dashboards built for it read these.
    HISTOGRAMS = {
        "deltatune_time_to_first_token_seconds": (
            "time from a request's arrival to its first token, by model",
            (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0)),
        "deltatune_time_per_output_token_seconds": (
            "mean time between a request's output tokens after the first, by model",
            (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0)),
        "deltatune_e2e_request_latency_seconds": (
            "time from a request's arrival to its last token, by model",
            (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
             960.0, 1920.0, 7680.0)),
    }

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        bounds = self.HISTOGRAMS[name][1]
        with self._lock:
            entry = self._hists.setdefault(name, {}).setdefault(tuple(sorted(labels.items())),
                                                                [[0] * (len(bounds) + 1), 0.0])
            entry[0][bisect.bisect_left(bounds, seconds)] += 1  # the first bucket whose bound is >= seconds
            entry[1] += seconds

    def observe_request(self, handle: Handle, model: str) -> None:
        """The latencies of one engine request that finished (not cancelled, not failed)."""
        if handle.error is not None or handle.cancelled or handle.finish_time is None:
            return
        self.observe("deltatune_time_to_first_token_seconds", handle.first_token_time - handle.arrival_time,
                     model=model)
        self.observe("deltatune_e2e_request_latency_seconds", handle.finish_time - handle.arrival_time, model=model)
        tokens = max(len(c.token_ids) for c in handle.choices)
        if tokens > 1:
            self.observe("deltatune_time_per_output_token_seconds",
                         (handle.finish_time - handle.first_token_time) / (tokens - 1), model=model)

    _HELP = {
        "deltatune_requests_total": "HTTP requests answered, by endpoint and status",
        "deltatune_adapter_requests_total": "completion and chat requests accepted, by model (base or adapter)",
        "deltatune_prompt_tokens_total": "prompt tokens of accepted requests (times n), by model",
        "deltatune_generation_tokens_total": "tokens generated, by model",
    }

    def count(self, name: str, amount: int = 1, **labels: str) -> None:
        with self._lock:
            self._counts.setdefault(name, Counter())[tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> int:
        with self._lock:
            return self._counts.get(name, Counter())[tuple(sorted(labels.items()))]

    def render(self, gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, float]]) -> str:
        lines = []
        for kind, table in (("gauge", gauges), ("counter", counters)):
            for name, (text, value) in table.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        with self._lock:
            for name, help_text in self._HELP.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                for labels, value in sorted(self._counts.get(name, Counter()).items()):
                    lines.append(f"{name}{_labels(labels)} {value}")
            for name, (help_text, bounds) in self.HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for labels, (counts, total) in sorted(self._hists.get(name, {}).items()):
                    for bound, cumulative in zip((*map(str, bounds), "+Inf"), itertools.accumulate(counts)):
                        lines.append(f"{name}_bucket{_labels((*labels, ('le', bound)))} {cumulative}")
                    lines += [f"{name}_sum{_labels(labels)} {total}", f"{name}_count{_labels(labels)} {sum(counts)}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels) + "}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- HTTP ----------------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server_version = "deltatune-serve"
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may take to send its request (socket timeout; an idle keep-alive ends too)
    api: Api
    tracker: InFlight

    def do_GET(self) -> None:
        with self.tracker:
            self._reply(self.api.handle("GET", self.path, b"", self.headers))

    def do_POST(self) -> None:
        with self.tracker:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                return self._reply(Reply(411, _error(411, "send the body with a Content-Length, not chunked")))
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the unread body would otherwise be taken for the next request
                status = 413 if length > MAX_BODY_BYTES else 400
                return self._reply(Reply(status, _error(status, f"Content-Length must be 0 to {MAX_BODY_BYTES} bytes")))
            self._reply(self.api.handle("POST", self.path, self.rfile.read(length), self.headers))

    def _reply(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
                if key == "Connection" and value == "close":
                    self.close_connection = True
            if reply.stream is None:
                text = isinstance(reply.body, str)
                data = reply.body.encode() if text else json.dumps(reply.body).encode()
                if not text:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in reply.stream:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away: closing the stream cancels its generation
            self.close_connection = True
        finally:
            if reply.stream is not None:
                reply.stream.close()
            if reply.close is not None:
                reply.close()


class InFlight:
    """Counts the HTTP requests being answered, so that a shutdown can wait for them (:meth:`wait_idle`)."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self.count += 1

    def __exit__(self, *_: Any) -> None:
        with self._cond:
            self.count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count == 0, timeout)


def http_server(api: Api, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> ThreadingHTTPServer:
    """A threaded HTTP server (one thread per connection) answering with ``api``; port 0 picks a free one. Its
    ``tracker`` (:class:`InFlight`) counts the requests being answered."""
    tracker = InFlight()
    attrs: dict[str, Any] = {"api": api, "tracker": tracker}
    if quiet:
        attrs["log_message"] = lambda self, *args: None
    handler = type("Handler", (_Handler,), attrs)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.tracker = tracker  # type: ignore[attr-defined]
    return server

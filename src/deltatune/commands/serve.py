"""``deltatune serve``: one base model and several adapters behind an OpenAI-style HTTP API."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

from ._common import one_line_errors

if TYPE_CHECKING:
    from ..engine import Engine
    from ..serve import Api

DESCRIPTION = """\
Serve a base model and any number of adapters over HTTP. A request names an adapter (or the base model) in its
"model" field; requests for different adapters that arrive together are answered by one batched generate() call.
Endpoints (OpenAI-compatible, as vLLM serves LoRA adapters): POST /v1/completions, POST /v1/chat/completions
(both stream with "stream": true), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus), and
POST /v1/load_lora_adapter and /v1/unload_lora_adapter with --allow-adapter-loading.
An adapter PATH is an adapter directory, a run directory (its final adapter) or a hub id in the local cache.
vLLM's flags work too: --lora-modules, --max-loras, --max-cpu-loras, --max-lora-rank, --max-num-seqs, --enable-lora.
SIGTERM stops accepting requests, finishes those in flight and exits.

Examples:
  deltatune serve --model smollm2-135m-instruct --adapter sql=./adapters/sql --adapter chat=runs/chat --port 8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 32, "temperature": 0}'
"""

_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "auto": None}  # auto: the checkpoint's torch_dtype
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a base model and several adapters over HTTP",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH",
                   help="base model: directory, .gguf file, built-in name or cached hub id (default: the adapters' "
                        "base model; with no adapter, smollm2-135m-instruct as in `deltatune train`)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve the adapter at PATH as model NAME (repeatable)")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH|JSON",
                   help="vLLM's spelling of --adapter: NAME=PATH or a JSON object {\"name\", \"path\", "
                        "\"base_model_name\"}")
    p.add_argument("--enable-lora", action="store_true",
                   help="accepted for vLLM compatibility; adapters are always served")
    p.add_argument("--max-loras", type=int, metavar="N",
                   help="at most N adapters on the device and in one batch; the least recently used idle one moves "
                        "to CPU memory (default: no limit)")
    p.add_argument("--max-cpu-loras", type=int, metavar="N",
                   help="at most N adapters in memory; the least recently used idle one is freed and loaded again "
                        "from its path when requested (default: no limit; at least --max-loras)")
    p.add_argument("--max-lora-rank", type=int, metavar="R", help="refuse adapters of rank above R")
    p.add_argument("--served-model-name", metavar="NAME", help="the base model's name in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch-size", "--max-num-seqs", type=int, default=8, metavar="N",
                   help="rows decoding together (an n-answer request takes n; default 8)")
    p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests waiting to join the batch at most; beyond, requests get 503 with Retry-After "
                        "(default 256)")
    p.add_argument("--request-timeout", type=float, metavar="S",
                   help="cancel a request not answered within S seconds (504; default: no limit)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ endpoints (default: $DELTATUNE_API_KEY or "
                        "$VLLM_API_KEY); needed to listen beyond localhost")
    p.add_argument("--allow-no-api-key", action="store_true",
                   help="listen on a non-local --host without an API key (only on a network you trust)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                   help="when nothing runs, how long the first request waits for others to start with (default 10)")
    p.add_argument("--dtype", choices=[*_DTYPES, *_DTYPE_ALIASES], default="float32",
                   help="dtype of the base model (default float32; vLLM's half/float/auto also accepted)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="let clients load adapters from server paths and unload them (POST /v1/load_lora_adapter, "
                        "/v1/unload_lora_adapter); also on with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    p.set_defaults(func=run)
    one_line_errors(p)


@dataclass
class Served:
    """What :func:`start` built: the engine (already running), the API and the HTTP server (not yet serving)."""

    engine: Engine
    api: Api
    httpd: ThreadingHTTPServer
    base_name: str

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def drain(self, timeout: float | None = None) -> bool:
        """Graceful stop, once ``serve_forever`` has returned: refuse new requests, let those in flight finish (up to
        ``timeout`` seconds), then close the port and the engine. Returns whether everything finished."""
        self.api.closing = True
        idle = self.httpd.tracker.wait_idle(timeout)
        self.close()
        return idle

    def close(self) -> None:
        self.httpd.server_close()
        self.engine.close()


def _adapter_specs(values: list[str], lora_modules: list[str], base_names: set[str]) -> dict[str, str]:
    """``--adapter NAME=PATH`` and vLLM's ``--lora-modules`` (``NAME=PATH`` or ``{"name", "path",
    "base_model_name"}``) as ``{name: path}``."""
    from ..train.options import TrainError

    pairs = [("--adapter", value) for value in values] + [("--lora-modules", value) for value in lora_modules]
    specs: dict[str, str] = {}
    for flag, value in pairs:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TrainError(f"{flag} {value!r}: not valid JSON ({exc})") from None
            unknown = set(spec) - {"name", "path", "base_model_name"} if isinstance(spec, dict) else {"?"}
            if unknown or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
                raise TrainError(f"{flag} {value!r}: expected {{\"name\": ..., \"path\": ..., "
                                 f"\"base_model_name\": ...}}")
            base = spec.get("base_model_name")
            if base is not None and base not in base_names:
                raise TrainError(f"{flag} {spec['name']}: base_model_name {base!r} is not the served base model "
                                 f"({' / '.join(sorted(n for n in base_names if n))})")
            name, path = spec["name"], spec["path"]
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise TrainError(f"{flag} {value!r}: expected NAME=PATH, e.g. {flag} sql=./adapters/sql")
        if name in specs:
            raise TrainError(f"{flag} {name!r} is given twice; each adapter needs its own name")
        specs[name] = path
    return specs


def _checked(name: str, fn, *args) -> None:
    """``fn(*args)``, its error (every deltatune error is a ValueError) prefixed with the flag that caused it."""
    from ..train.options import TrainError

    try:
        fn(*args)
    except ValueError as exc:
        raise TrainError(f"--adapter {name}: {exc}") from None


def _options(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The API key and whether runtime adapter loading is on, from the flags and vLLM's environment variables;
    refuses a non-local ``--host`` without a key (the API can load files from server paths and spend compute)."""
    from ..train.options import TrainError

    for flag in ("max_batch_size", "max_waiting", "max_loras", "max_cpu_loras", "max_lora_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise TrainError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.batch_wait_ms < 0 or (args.request_timeout is not None and args.request_timeout <= 0):
        raise TrainError("--batch-wait-ms must be at least 0 and --request-timeout above 0")
    key = args.api_key or os.environ.get("DELTATUNE_API_KEY") or os.environ.get("VLLM_API_KEY") or None
    if key is None and args.host not in _LOCAL_HOSTS and not args.allow_no_api_key:
        raise TrainError(f"--host {args.host} accepts requests from other machines; pass --api-key (or set "
                         f"DELTATUNE_API_KEY), or --allow-no-api-key on a network you trust")
    allow = args.allow_adapter_loading or os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in (
        "1", "true")
    return key, allow


def start(args: argparse.Namespace) -> Served:
    """Check every input, load the model and adapters, start the engine and bind the port."""
    import torch

    from ..config import read_config_file
    from ..files import validate_adapter_name
    from ..engine import Engine
    from ..serve import AdapterPool, Api, http_server
    from ..train.artifacts import locate
    from ..train.models import load_model, load_tokenizer
    from ..train.options import TrainError
    from ..train.presets import DEFAULT_PRESET, PRESETS, resolve_model

    api_key, allow_loading = _options(args)
    adapters, bases = {}, set()
    specs = _adapter_specs(args.adapter, args.lora_modules, {args.model, args.served_model_name})
    for name, path in specs.items():
        validate_adapter_name(name)
        if os.path.isdir(path):  # a run or adapter directory: the run's adapter, the base it was trained on
            source = locate(path, args.model)
            if source.task != "causal-lm":
                raise TrainError(f"--adapter {name}: {path} is a {source.task} adapter; serve generates text")
            path = source.adapter_dir
            bases.add(source.model)
        else:  # a hub id: fail now rather than after loading the model
            _checked(name, read_config_file, path)
        adapters[name] = path
    model = args.model
    if model is None:
        if len(bases) > 1:
            raise TrainError(f"the adapters were trained on different base models {sorted(bases)}; pass --model")
        model = bases.pop() if bases else PRESETS[DEFAULT_PRESET]["model"]
    base_name = args.served_model_name or model
    if base_name in adapters:
        raise TrainError(f"--adapter {base_name!r} has the base model's name; rename it or pass --served-model-name")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    dtype = _DTYPE_ALIASES.get(args.dtype, args.dtype)
    base = load_model(model_dir, "causal-lm", None, dtype="auto" if dtype is None else getattr(torch, dtype))
    engine = Engine(base.to(device), tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_waiting,
                    batch_wait_ms=args.batch_wait_ms, device=device).start()
    try:
        pool = AdapterPool(engine, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                           max_lora_rank=args.max_lora_rank)
        for name, path in adapters.items():
            _checked(name, pool.add, name, path)
        api = Api(engine, pool, base_name, allow_adapter_loading=allow_loading, api_key=api_key,
                  request_timeout=args.request_timeout)
        try:
            httpd = http_server(api, args.host, args.port, quiet=args.quiet)
        except OSError as exc:
            raise TrainError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except BaseException:
        engine.close()
        raise
    return Served(engine, api, httpd, base_name)


def run(args: argparse.Namespace) -> int:
    served = start(args)
    names = ", ".join(served.api.pool.names) or "none"
    print(f"serving {served.base_name} (adapters: {names}) on {served.url}; Ctrl-C or SIGTERM stops",
          file=sys.stderr, flush=True)

    def stop(*_) -> None:  # serve_forever runs on this thread: shut it down from another one
        threading.Thread(target=served.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        served.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        finished = served.drain(args.request_timeout)
    print("stopped" + ("" if finished else "; some requests did not finish in time"), file=sys.stderr, flush=True)
    return 0

"""``deltatune serve``: one base model and several adapters behind an OpenAI-style HTTP API."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

from ._common import one_line_errors

if TYPE_CHECKING:
    from ..serve import Scheduler

DESCRIPTION = """\
Serve a base model and any number of adapters over HTTP. A request names an adapter (or the base model) in its
"model" field; requests for different adapters that arrive together are answered by one batched generate() call.
Endpoints (OpenAI-compatible, as vLLM serves LoRA adapters): POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, and POST /v1/load_lora_adapter with --allow-adapter-loading.
An adapter PATH is an adapter directory, a run directory (its final adapter) or a hub id in the local cache.

Examples:
  deltatune serve --model smollm2-135m-instruct --adapter sql=./adapters/sql --adapter chat=runs/chat --port 8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 32, "temperature": 0}'
"""

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a base model and several adapters over HTTP",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH",
                   help="base model: directory, .gguf file, built-in name or cached hub id (default: the adapters' "
                        "base model; with no adapter, smollm2-135m-instruct as in `deltatune train`)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve the adapter at PATH as model NAME (repeatable)")
    p.add_argument("--served-model-name", metavar="NAME", help="the base model's name in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="rows per generate() call (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long the first waiting request waits for others to batch with (default 10)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of the base model (default float32)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="let clients load adapters from server paths with POST /v1/load_lora_adapter")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    p.set_defaults(func=run)
    one_line_errors(p)


@dataclass
class Served:
    """What :func:`start` built: the scheduler (already running) and the HTTP server (not yet serving)."""

    scheduler: Scheduler
    httpd: ThreadingHTTPServer
    base_name: str

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.httpd.server_close()
        self.scheduler.close()


def _adapter_specs(values: list[str]) -> dict[str, str]:
    from ..train.options import TrainError

    specs: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise TrainError(f"--adapter {value!r}: expected NAME=PATH, e.g. --adapter sql=./adapters/sql")
        if name in specs:
            raise TrainError(f"--adapter {name!r} is given twice; each adapter needs its own name")
        specs[name] = path
    return specs


def _checked(name: str, fn, *args) -> None:
    """``fn(*args)``, its error (every deltatune error is a ValueError) prefixed with the flag that caused it."""
    from ..train.options import TrainError

    try:
        fn(*args)
    except ValueError as exc:
        raise TrainError(f"--adapter {name}: {exc}") from None


def start(args: argparse.Namespace) -> Served:
    """Check every input, load the model and adapters, start the scheduler and bind the port."""
    import torch

    from ..config import read_config_file
    from ..files import validate_adapter_name
    from ..serve import Api, Scheduler, http_server
    from ..train.artifacts import locate
    from ..train.models import load_model, load_tokenizer
    from ..train.options import TrainError
    from ..train.presets import DEFAULT_PRESET, PRESETS, resolve_model

    if args.max_batch_size < 1 or args.batch_wait_ms < 0:
        raise TrainError("--max-batch-size must be at least 1 and --batch-wait-ms at least 0")
    adapters, bases = {}, set()
    for name, path in _adapter_specs(args.adapter).items():
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
    base = load_model(model_dir, "causal-lm", None, dtype=getattr(torch, args.dtype)).to(device)
    scheduler = Scheduler(base, tokenizer, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                          device=device)
    for name, path in adapters.items():
        _checked(name, scheduler.load_adapter, name, path)
    api = Api(scheduler, base_name, allow_adapter_loading=args.allow_adapter_loading)
    try:
        httpd = http_server(api, args.host, args.port, quiet=args.quiet)
    except OSError as exc:
        raise TrainError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return Served(scheduler.start(), httpd, base_name)


def run(args: argparse.Namespace) -> int:
    served = start(args)
    names = ", ".join(served.scheduler.adapters) or "none"
    print(f"serving {served.base_name} (adapters: {names}) on {served.url}; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        served.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        served.close()
    return 0

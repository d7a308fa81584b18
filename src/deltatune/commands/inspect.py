"""``deltatune inspect PATH_OR_REPO``: describe an adapter from its files alone.

Reads ``adapter_config.json`` as JSON and the header of ``adapter_model.safetensors`` (a length-checked JSON
preamble, which also holds the base-model fingerprint deltatune saves); never loads the base model, never imports code a file names, and never unpickles: an adapter that only has
a pickled ``adapter_model.bin`` is reported with its weights marked "not inspected".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from collections import Counter
from typing import Any

from ..config import PeftConfig
from ..errors import ConfigError, DeltatuneError
from ..files import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, read_json_file, read_safetensors_header, resolve_file
from ..fingerprint import METADATA_KEY, describe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="describe an adapter (method, base model, targets, size) without loading any model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", metavar="PATH_OR_REPO", help="adapter directory or hub repo id")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of the adapter")
    parser.add_argument("--subfolder", help="sub-folder of the directory / repo that holds the adapter")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--check", choices=["vllm"], help="also say whether vLLM will load the adapter, and why not (exit status 1)"
    )
    parser.add_argument(
        "--max-lora-rank", type=int, metavar="N", help="with --check vllm: the server's --max-lora-rank"
    )
    parser.set_defaults(func=run)


def inspect_adapter(adapter: str, revision: str | None = None, subfolder: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` reports, as a dict (see the module docstring for what is and is not read).

    Raises:
        ConfigError: no readable ``adapter_config.json`` at that place.
        AdapterLoadError: the location cannot be resolved, or the safetensors header is corrupt.
    """
    hub = {"revision": revision, "subfolder": subfolder}
    config_path = resolve_file(adapter, CONFIG_NAME, **hub)
    if config_path is None:
        where = os.path.join(adapter, subfolder or "")
        raise ConfigError(f"no {CONFIG_NAME} in {where!r}; is this an adapter directory?")
    data = read_json_file(config_path)
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: expected a JSON object, got {type(data).__name__}")

    report: dict[str, Any] = {
        "adapter": adapter,
        "revision": revision,
        "subfolder": subfolder,
        "config_file": config_path,
        "method": data.get("peft_type"),
        "task": data.get("task_type"),
        "base_model": data.get("base_model_name_or_path"),
        "base_model_revision": data.get("revision"),
        "target_modules": data.get("target_modules"),
        "modules_to_save": data.get("modules_to_save"),
    }
    lora = data.get("peft_type") == "LORA"
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "num_virtual_tokens"):
        if key in data and (lora or key == "num_virtual_tokens"):
            report[key] = data[key]
    report["options"] = _other_options(data, shown=set(report) | _BOOKKEEPING)
    report["loadable"], report["load_problem"] = _loadable(data, config_path)
    report["weights"] = _weights(adapter, hub)
    if os.path.isdir(adapter):
        root = os.path.join(adapter, subfolder or "")
        report["other_adapters"] = sorted(
            name for name in os.listdir(root) if os.path.isfile(os.path.join(root, name, CONFIG_NAME))
        )
    return report


# Config fields no report row is about: where the file came from and how peft tracks it.
_BOOKKEEPING = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                "peft_version", "target_modules", "modules_to_save"}


def _other_options(data: dict, shown: set[str]) -> dict[str, Any]:
    """The method's remaining settings that differ from its config class's defaults (AdaLoRA's ``init_r`` and
    ``target_r``, OFT's block size, ...); all of them when the method is unknown."""
    from dataclasses import MISSING, fields

    from ..registry import config_class

    try:
        defaults = {
            f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(config_class(str(data.get("peft_type"))))
            if f.default is not MISSING or f.default_factory is not MISSING
        }
    except DeltatuneError:
        defaults = {}
    return {k: v for k, v in sorted(data.items()) if k not in shown and (k not in defaults or defaults[k] != v)}


def _loadable(data: dict, source: str) -> tuple[bool, str | None]:
    """Whether this deltatune version can load the config (validation only: no model, no imports from the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftConfig.from_dict(data, source=source)
    except DeltatuneError as exc:
        return False, str(exc)
    return True, None


def _weights(adapter: str, hub: dict) -> dict[str, Any]:
    path = resolve_file(adapter, SAFETENSORS_NAME, **hub)
    if path is not None:
        header = read_safetensors_header(path)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        return {
            "file": path,
            "format": "safetensors",
            "inspected": True,
            "tensors": len(tensors),
            "parameters": sum(math.prod(v["shape"]) for v in tensors.values()),
            "dtypes": dict(sorted(Counter(v["dtype"] for v in tensors.values()).items())),
            "file_bytes": os.path.getsize(path),
            "base_fingerprint": describe(header.get("__metadata__", {}).get(METADATA_KEY)),
        }
    path = resolve_file(adapter, PICKLE_NAME, **hub)
    if path is not None:
        return {"file": path, "format": "pickle", "inspected": False, "file_bytes": os.path.getsize(path)}
    return {"file": None, "format": None, "inspected": False}


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _names(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if isinstance(value, str):
        return value if value == "all-linear" else f"regex {value!r}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return repr(value)


def _fingerprint(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "none (saved by peft or another tool: loading cannot check its base model)"
    vocab = f", vocabulary {summary['vocab_size']}" if summary["vocab_size"] is not None else ""
    return (f"{summary['architecture']} ({summary['model_type'] or 'no model_type'}{vocab}); {summary['weights']} "
            f"targeted base weights, {summary['sampled']} sampled")


def format_report(report: dict[str, Any]) -> str:
    where = report["adapter"]
    if report["revision"]:
        where += f" (revision {report['revision']})"
    if report["subfolder"]:
        where += f" [subfolder {report['subfolder']}]"
    base = report["base_model"] or "-"
    if report["base_model_revision"]:
        base += f" (revision {report['base_model_revision']})"
    rows = [
        ("adapter", where),
        ("config", report["config_file"]),
        ("method", report["method"] or "-"),
        ("task", report["task"] or "-"),
        ("base model", base),
        ("target modules", _names(report["target_modules"])),
        ("modules to save", _names(report["modules_to_save"])),
    ]
    if "r" in report:
        rank = str(report["r"])
        alpha = report.get("lora_alpha")
        if alpha is not None:
            try:
                scale = alpha / (math.sqrt(report["r"]) if report.get("use_rslora") else report["r"])
                rank += f" (alpha {alpha}, scaling {scale:g}{', rsLoRA' if report.get('use_rslora') else ''})"
            except (TypeError, ValueError, ZeroDivisionError):
                rank += f" (alpha {alpha!r})"
        if report.get("use_dora"):
            rank += ", DoRA"
        rows.append(("rank", rank))
        for key in ("rank_pattern", "alpha_pattern"):
            if report.get(key):
                rows.append((key.replace("_", " "), json.dumps(report[key], sort_keys=True)))
    if "num_virtual_tokens" in report:
        rows.append(("virtual tokens", str(report["num_virtual_tokens"])))
    if report["options"]:
        rows.append(("settings", ", ".join(f"{k}={json.dumps(v)}" for k, v in report["options"].items())))
    weights = report["weights"]
    if weights["format"] == "safetensors":
        dtypes = ", ".join(f"{d}" if len(weights["dtypes"]) == 1 else f"{d}×{n}" for d, n in weights["dtypes"].items())
        rows.append((
            "weights",
            f"{os.path.basename(weights['file'])}: {weights['tensors']} tensors, {weights['parameters']:,} parameters"
            f" ({dtypes or 'none'}), {_size(weights['file_bytes'])}",
        ))
        rows.append(("fingerprint", _fingerprint(weights["base_fingerprint"])))
    elif weights["format"] == "pickle":
        rows.append((
            "weights",
            f"{os.path.basename(weights['file'])} (pickle), {_size(weights['file_bytes'])}: weights not inspected "
            f"(deltatune does not unpickle files to inspect them; convert to safetensors)",
        ))
    else:
        rows.append(("weights", f"none found (no {SAFETENSORS_NAME} or {PICKLE_NAME})"))
    verdict = "can load this adapter" if report["loadable"] else f"cannot load: {report['load_problem']}"
    rows.append(("deltatune", verdict))
    if report.get("other_adapters"):
        rows.append(("other adapters", ", ".join(report["other_adapters"])))
    if "vllm" in report:
        verdict = report["vllm"]
        if verdict["loads"]:
            rows.append(("vllm", f"loads it (with --enable-lora --max-lora-rank {verdict['max_lora_rank']} or more)"))
        else:
            rows.append(("vllm", "refuses it: " + "; ".join(verdict["problems"])))
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    report = inspect_adapter(args.adapter, revision=args.revision, subfolder=args.subfolder)
    if args.check == "vllm":
        from dataclasses import asdict

        from ..deploy import check_vllm

        report["vllm"] = asdict(check_vllm(
            args.adapter, revision=args.revision, subfolder=args.subfolder, max_lora_rank=args.max_lora_rank
        ))
    print(json.dumps(report, indent=2, sort_keys=True, default=str) if args.json else format_report(report))
    return 1 if "vllm" in report and not report["vllm"]["loads"] else 0

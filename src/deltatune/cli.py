"""The ``deltatune`` command. Each sub-command lives in ``deltatune.commands.<name>`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int`` as the handler."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DeltatuneError

_COMMANDS: tuple[str, ...] = ("inspect", "train", "generate", "merge", "export", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"deltatune.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DeltatuneError, FileNotFoundError) as exc:
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the train / generate / merge sub-commands."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make usage errors (bad option values, missing arguments) one line instead of argparse's usage block."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see {parser.prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser

"""Helpers shared by the train / generate / merge / export sub-commands."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make usage errors (bad option values, missing arguments) one line instead of argparse's usage block."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see {parser.prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser


def check_output_directory(out: str, flag: str, overwrite: bool) -> str:
    """The absolute path of an output directory option, refused before any work when it is a file or already holds
    files (unless ``overwrite``).

    Raises:
        TrainError: either case, naming ``flag``.
    """
    from ..train.options import TrainError

    path = os.path.abspath(out)
    if os.path.isfile(path):
        raise TrainError(f"{flag} {out} is a file; choose a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise TrainError(f"{flag} {out} already holds files; choose another directory or pass --overwrite")
    return path


def replace_directory(out: str, fill: Callable[[str], None], what: str) -> None:
    """Write directory ``out`` all at once: ``fill`` writes into a temporary sibling, which then takes ``out``'s place
    (a previous ``out`` is removed only after that), so a failure leaves ``out`` as it was and no half-written
    directory behind.

    Raises:
        TrainError: writing failed (``what`` names the content), with ``out`` unchanged.
    """
    from ..train.options import TrainError

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        try:
            fill(tmp)
        except OSError as exc:
            raise TrainError(f"could not write the {what} ({exc.strerror or exc}); {out} is unchanged") from None
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

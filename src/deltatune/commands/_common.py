"""Helpers shared by the train / generate / merge / export sub-commands."""

from __future__ import annotations

import argparse
import os
import sys
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
    """Write directory ``out`` all at once (:func:`deltatune.files.publish_directory`): ``fill`` writes into a hidden
    sibling that is then swapped in atomically, so a failure or a crash leaves ``out`` as it was and no half-written
    directory behind.

    Raises:
        TrainError: writing failed (``what`` names the content), with ``out`` unchanged.
    """
    from ..files import publish_directory
    from ..train.options import TrainError

    try:
        publish_directory(out, fill)
    except OSError as exc:
        raise TrainError(f"could not write the {what} ({exc.strerror or exc}); {out} is unchanged") from None

"""What every console script does alike: parse without exiting, and turn errors into one line
and an exit status."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable


def parse_or_status(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status argparse chose (it has printed usage and the problem)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def report_errors(prog: str, action: Callable[[], int], *, user_errors: tuple[type[BaseException], ...],
                  user_status: int, debug: bool = False, bug: tuple[str, int, str] | None = None) -> int:
    """``action()``, or one line on stderr and a status when it fails.

    ``user_errors`` print ``PROG: error: ...`` (with the traceback under ``debug``) and return
    ``user_status``; any other exception, when ``bug = (label, status, hint)`` is given, prints
    ``PROG: label: Type: message (hint)`` and returns ``status`` (under ``debug`` it propagates).
    """
    try:
        return action()
    except user_errors as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return user_status
    except Exception as err:
        if bug is None or debug:
            raise
        label, status, hint = bug
        print(f"{prog}: {label}: {type(err).__name__}: {err} ({hint})", file=sys.stderr)
        return status

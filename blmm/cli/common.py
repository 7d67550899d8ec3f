"""What every console script does alike: parse without exiting, and turn errors into one line
and an exit status.

One convention for ``blmm``, ``blmm_compare``, ``blmm_view`` and ``python -m blmm.report``:
0 on success, 2 for bad input (argparse's usage errors and every ``InputError``), 1 for a failure
during the run (a full disk, a failed engine, an unexpected error), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from blmm.errors import BlmmError, InputError

BAD_INPUT = 2  # the command line, a file or a value is unusable (as argparse's usage errors)
RUN_FAILED = 1  # the inputs were accepted but the run failed
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def parse_or_status(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status argparse chose (it has printed usage and the problem)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def report_errors(prog: str, action: Callable[[], int], *, debug: bool = False) -> int:
    """``action()``, or one line on stderr and the convention's status when it fails.

    An ``InputError`` prints ``PROG: error: ...`` and returns BAD_INPUT; another ``BlmmError`` or an
    ``OSError`` (a full disk, a failed engine) prints the same and returns RUN_FAILED; any other
    exception prints ``PROG: unexpected error: Type: message (...)`` and returns RUN_FAILED.  Under
    ``debug`` the traceback is printed too, and an unexpected error propagates.
    """
    try:
        return action()
    except InputError as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return BAD_INPUT
    except (BlmmError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return RUN_FAILED
    except Exception as err:
        if debug:
            raise
        print(f"{prog}: unexpected error: {type(err).__name__}: {err} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return RUN_FAILED

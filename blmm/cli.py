"""Command-line entry points."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("blmm: the imaging pipeline is not available yet", file=sys.stderr)
    return 2


def compare_main(argv: list[str] | None = None) -> int:
    print("blmm_compare: not available yet", file=sys.stderr)
    return 2

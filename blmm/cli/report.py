"""``python -m blmm.report OUTDIR``: (re)write the report of a run or comparison folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from blmm.cli.common import parse_or_status, report_errors
from blmm.errors import InputError
from blmm.io.outdir import COMPARE_FILE
from blmm.report import write_compare_report, write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m blmm.report",
                                     description="Write OUTDIR/report.html for a blmm or blmm_compare folder.")
    parser.add_argument("outdir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m blmm.report OUTDIR``: exit 0 on success, 2 for bad input, 1 for a failure during the run."""
    args = parse_or_status(_parser(), argv)
    if isinstance(args, int):
        return args

    def write() -> int:
        folder = Path(args.outdir)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder (expected a blmm or blmm_compare output folder)")
        written = write_compare_report(folder) if (folder / COMPARE_FILE).is_file() else write_report(folder)
        print(f"blmm.report: wrote {written}")
        return 0

    return report_errors("blmm.report", write, debug=args.debug)

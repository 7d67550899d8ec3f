"""``python -m blmm.report OUTDIR``: (re)write the report of a run or comparison folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blmm.io.outdir import COMPARE_FILE
from blmm.report import write_compare_report, write_report


def main(argv: list[str] | None = None) -> int:
    """``python -m blmm.report OUTDIR``: (re)write the report of a run or comparison folder."""
    parser = argparse.ArgumentParser(prog="python -m blmm.report",
                                     description="Write OUTDIR/report.html for a blmm or blmm_compare folder.")
    parser.add_argument("outdir")
    args = parser.parse_args(argv)
    folder = Path(args.outdir)
    if not folder.is_dir():
        print(f"blmm.report: error: {folder}: not a folder", file=sys.stderr)
        return 1
    written = write_compare_report(folder) if (folder / COMPARE_FILE).is_file() else write_report(folder)
    print(f"blmm.report: wrote {written}")
    return 0

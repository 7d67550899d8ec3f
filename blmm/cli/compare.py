"""``blmm_compare out1 out2 outdir``: a likelihood-ratio test of two nested analyses per voxel."""
from __future__ import annotations

import argparse
import sys

from blmm.cli.common import parse_or_status, report_errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blmm_compare",
        description="Likelihood-ratio test, per voxel, of two nested blmm analyses of the same images.")
    parser.add_argument("out1", help="output folder of one analysis")
    parser.add_argument("out2", help="output folder of the other analysis (the order does not matter)")
    parser.add_argument("outdir", help="folder for blmm_vox_Chi2, blmm_vox_Chi2lp, blmm_vox_mask, "
                                       "blmm_compare.json and report.html")
    parser.add_argument("--force", action="store_true", help="overwrite an outdir that already holds a comparison (this one or another)")
    parser.add_argument("--fdr", choices=("bh", "by", "false"), default="bh",
                        help="blmm_vox_Chi2lp_fdr: -log10 q, Benjamini-Hochberg (default), -Yekutieli, or none")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    """``blmm_compare out1 out2 outdir``: exit 0 on success, 2 for bad input, 1 for a failure during the run."""
    args = parse_or_status(_parser(), argv)
    if isinstance(args, int):
        return args

    def run() -> int:
        from blmm.compare import compare, summary_text

        result = compare(args.out1, args.out2, args.outdir, force=args.force,
                         fdr=None if args.fdr == "false" else args.fdr)
        for note in result.notes:
            print(f"blmm_compare: note: {note}")
        print(summary_text(result))
        return 0

    return report_errors("blmm_compare", run, debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(compare_main())

"""``blmm_compare out1 out2 outdir``: a likelihood-ratio test of two nested analyses per voxel."""
from __future__ import annotations


def compare_main(argv: list[str] | None = None) -> int:
    """Parse the arguments, compare, print the summary (see ``blmm.compare.compare_main``)."""
    from blmm.compare import compare_main as _compare_main

    return _compare_main(argv)

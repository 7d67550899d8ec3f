"""Command-line entry points, one module per console script.

* ``run``: ``blmm inputs.yml`` (also ``python -m blmm``);
* ``compare``: ``blmm_compare out1 out2 outdir``;
* ``view``: ``blmm_view OUTDIR MAP -o page.html``;
* ``report``: ``python -m blmm.report OUTDIR``.
"""
from blmm.cli.compare import compare_main
from blmm.cli.run import main

__all__ = ["compare_main", "main"]

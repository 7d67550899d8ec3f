"""Command-line entry points, one module per console script; every argparse parser lives here.

* ``run``: ``blmm inputs.yml`` (also ``python -m blmm``);
* ``compare``: ``blmm_compare out1 out2 outdir``;
* ``view``: ``blmm_view OUTDIR MAP -o page.html``;
* ``report``: ``python -m blmm.report OUTDIR``;
* ``common``: parsing without exiting, and errors as one line and an exit status.
"""
from blmm.cli.compare import compare_main
from blmm.cli.run import main
from blmm.cli.view import view_main

__all__ = ["compare_main", "main", "view_main"]

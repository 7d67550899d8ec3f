"""python -m blmm.report OUTDIR."""
import sys

from blmm.cli.report import main

sys.exit(main())

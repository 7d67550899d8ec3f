"""python -m blmm inputs.yml (same as the blmm command)."""
import sys

from blmm.cli import main

sys.exit(main())

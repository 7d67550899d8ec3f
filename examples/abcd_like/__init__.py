"""An ABCD-like example dataset for blmm (see README.md and simulate.py)."""

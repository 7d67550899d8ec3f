"""Deprecated: moved to ``blmm.core.sufficient``; this path works for one more release."""
from blmm._moved import forward

__getattr__ = forward("blmm.stats", "blmm.core.sufficient")

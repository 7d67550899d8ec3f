"""Deprecated: moved to ``blmm.core.fit``; this path works for one more release."""
from blmm._moved import forward

__getattr__ = forward("blmm.fit", "blmm.core.fit")

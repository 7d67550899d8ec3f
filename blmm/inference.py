"""Deprecated: moved to ``blmm.core.inference``; this path works for one more release."""
from blmm._moved import forward

__getattr__ = forward("blmm.inference", "blmm.core.inference")

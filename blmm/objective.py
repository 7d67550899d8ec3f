"""Deprecated: moved to ``blmm.core.objective``; this path works for one more release."""
from blmm._moved import forward

__getattr__ = forward("blmm.objective", "blmm.core.objective")

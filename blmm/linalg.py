"""Deprecated: moved to ``blmm.core.linalg``; this path works for one more release."""
from blmm._moved import forward

__getattr__ = forward("blmm.linalg", "blmm.core.linalg")

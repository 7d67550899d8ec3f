"""Deprecated: moved to ``blmm.core.design``; this path works for one more release."""
from blmm._moved import forward

__getattr__ = forward("blmm.design", "blmm.core.design")

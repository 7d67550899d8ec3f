"""blmm: Big Linear Mixed Models for brain images.

The library follows the data flow: config -> design -> io -> stats -> fit ->
inference -> compare, with engine (dask) and viewer beside it.
"""
from blmm.design import RandomFactor, Contrast

__version__ = "0.1.0"

__all__ = ["RandomFactor", "Contrast", "__version__"]

# Models as lme4 formulas (docs/formula.md); imported on first use, as they need pandas.
__all__ += ["fit_formula", "build_design"]


def __getattr__(name):
    if name in ("fit_formula", "build_design"):
        import blmm.formula

        return getattr(blmm.formula, name)
    raise AttributeError(f"module 'blmm' has no attribute {name!r}")

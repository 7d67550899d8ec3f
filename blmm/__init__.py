"""blmm: Big Linear Mixed Models for brain images.

The library follows the data flow: config -> design -> io -> stats -> fit ->
inference -> compare, with engine (dask) and viewer beside it.
"""
from blmm.core.design import RandomFactor, Contrast

__version__ = "0.1.0"

__all__ = ["RandomFactor", "Contrast", "__version__"]

"""blmm: Big Linear Mixed Models for brain images.

Public API: ``fit_lmm``, ``infer``, ``RandomFactor``, ``Contrast``.  The layout, and who
may import whom, is described in docs/architecture.md.
"""
__version__ = "0.1.0"

from blmm.core.design import Contrast, RandomFactor  # noqa: E402
from blmm.core.inference import infer  # noqa: E402
from blmm.fit import fit_lmm  # noqa: E402

__all__ = ["Contrast", "RandomFactor", "fit_lmm", "infer", "__version__"]

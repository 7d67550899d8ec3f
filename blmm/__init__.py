"""blmm: Big Linear Mixed Models for brain images.

Public API: ``fit_lmm``, ``infer``, ``RandomFactor``, ``Contrast``.  The layout, and who
may import whom, is described in docs/architecture.md.
"""
__version__ = "0.1.0"

from blmm.core.design import Contrast, RandomFactor  # noqa: E402
from blmm.core.inference import infer  # noqa: E402
from blmm.core.fit import fit_lmm  # noqa: E402

# Models as lme4 formulas (docs/formula.md); imported on first use, as they need pandas.
__all__ = ["Contrast", "RandomFactor", "fit_lmm", "infer", "fit_formula", "build_design", "__version__"]


def __getattr__(name):
    if name in ("fit_formula", "build_design"):
        import blmm.formula

        return getattr(blmm.formula, name)
    raise AttributeError(f"module 'blmm' has no attribute {name!r}")

"""blmm: Big Linear Mixed Models for brain images.

Public API (docs/tutorial.md, "From Python"), each with an example in its docstring:

* ``load_images(paths, mask=None)``: image files -> ``ImageData`` with ``Y`` (n x v, NaN =
  missing) and ``save_map`` to write per-voxel results back as images;
* ``fit_lmm(Y, X, factors)``: the model at every voxel -> ``FitResult``;
* ``RandomFactor``: one random factor of Z; ``Contrast``: a T (one row) or F contrast;
* ``infer(fit, contrasts)``: T and F tests with Satterthwaite df; every result has ``stat``
  (T or F), ``df`` and ``mlog10p``;
* ``fit_formula(formula, table, Y)`` and ``build_design``: models as lme4 formulas
  (docs/formula.md).

The layout, and who may import whom, is described in docs/architecture.md.
"""
from blmm.version import __version__
from blmm.core.design import Contrast, RandomFactor  # noqa: E402
from blmm.core.inference import infer  # noqa: E402
from blmm.core.fit import fit_lmm  # noqa: E402

__all__ = ["Contrast", "ImageData", "RandomFactor", "fit_lmm", "infer", "load_images", "fit_formula",
           "build_design", "__version__"]

# Loaded on first use: the formula names need pandas, the image names nibabel.
_ON_FIRST_USE = {"fit_formula": "blmm.formula", "build_design": "blmm.formula",
                 "load_images": "blmm.io.image_data", "ImageData": "blmm.io.image_data"}


def __getattr__(name):
    if name in _ON_FIRST_USE:
        import importlib

        return getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    raise AttributeError(f"module 'blmm' has no attribute {name!r}")

"""Fit an lme4 formula over a participants table: ``fit_formula``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from blmm.core.design import identifiability_problems
from blmm.core.fit import FitResult, fit_lmm
from blmm.formula.design import ModelDesign, build_design
from blmm.formula.errors import FormulaError


@dataclass
class FormulaFit:
    """A fit together with the design names that give its coefficients and factors meaning."""

    fit: FitResult
    design: ModelDesign

    @property
    def columns(self) -> list[str]:
        return self.design.columns

    def beta(self, name: str) -> np.ndarray:
        """One coefficient's estimate per voxel, by formulaic or R name."""
        return self.fit.beta[:, self.design.column_index(name)]

    def infer(self, contrasts, two_sided: bool = False):
        """blmm.inference.infer with named contrasts (see blmm.formula.contrasts)."""
        from blmm.core.inference import infer

        return infer(self.fit, self.design.contrasts(contrasts), two_sided=two_sided)


def fit_formula(formula: str, table: pd.DataFrame, Y, reml: bool = True, images: str | None = None,
                na_action: str = "omit", safe_mode: bool = True, **fit_options) -> FormulaFit:
    """Fit ``formula`` (lme4 syntax) at every voxel (column) of Y.

    Y has one row per table row (rows the formula drops for missing values are dropped from
    Y too) or one row per kept row.  safe_mode (default on, as lme4): a design lme4 refuses is a
    ValueError naming the term.  Other options go to :func:`blmm.fit_lmm`.

    Example::

        table = pandas.read_csv("participants.tsv", sep="\t")
        images = blmm.load_images(table["image"], mask="mask.nii.gz")
        model = blmm.fit_formula("~ age + sex + (1 | subject)", table, images.Y)
        result = model.infer({"age": "age"}, two_sided=True)
        images.save_map("out", "age_mlog10p", result["age"].mlog10p)
    """
    design = build_design(formula, table, images=images, na_action=na_action)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[0] == design.n_table:
        Y = Y[design.rows]
    elif Y.shape[0] != design.n:
        raise FormulaError(f"Y has {Y.shape[0]} rows; expected one per table row ({design.n_table}) "
                           f"or per row the model uses ({design.n})")
    if safe_mode:  # the same check as fit_lmm's, naming the term as written
        problems = identifiability_problems(design.factors)
        terms = {t.name: t.source for t in design.random_terms}
        if problems:
            raise FormulaError("; ".join(problem.message(terms.get(problem.factor)) for problem in problems)
                               + "; pass safe_mode=False to fit it anyway, or use a simpler term")
    fit = fit_lmm(Y, design.X, design.factors, reml=reml, safe_mode=safe_mode,
                  column_names=list(design.columns), **fit_options)
    return FormulaFit(fit, design)

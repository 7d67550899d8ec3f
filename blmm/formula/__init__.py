"""Models as lme4 formulas over a participants table (docs/formula.md).

    design = build_design("~ age + sex + (1 + time | subject)", table)
    result = fit_formula("~ age + sex + (1 + time | subject)", table, Y)
    result.infer({"age": "age", "sex": "sex[T.M]"})
"""
from blmm.formula.contrasts import make_contrast, make_contrasts
from blmm.formula.design import (DroppedRow, ModelDesign, RandomTermDesign, build_design,
                                 design_from_table, read_table)
from blmm.formula.errors import FormulaError
from blmm.formula.fit import FormulaFit, fit_formula
from blmm.formula.parse import ParsedFormula, RandomTerm, parse_formula

__all__ = ["build_design", "design_from_table", "read_table", "fit_formula", "FormulaFit",
           "ModelDesign", "RandomTermDesign", "DroppedRow", "FormulaError", "make_contrast",
           "make_contrasts", "parse_formula", "ParsedFormula", "RandomTerm"]

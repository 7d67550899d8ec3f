"""blmm.formula: lme4 formulas over a participants table.

Designs are checked against R (model.matrix / lme4::lFormula(...)$reTrms) through the
committed outputs of tests/reference/fit_formula_design.R; the suite never runs R.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blmm.design import Contrast, RandomFactor
from blmm.fit import fit_lmm
from blmm.formula import (FormulaError, build_design, design_from_table, fit_formula,
                          parse_formula)

REF = Path(__file__).parent / "reference" / "data" / "formula"
CASES = pd.read_csv(REF / "cases.csv")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return pd.read_csv(REF / "participants.csv")


# ------------------------------------------------------------------------------------------
# designs equal R's
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,formula", list(CASES.itertuples(index=False)), ids=list(CASES.name))
def test_design_matches_lme4(table, name, formula):
    ref = REF / name
    d = build_design(formula, table)
    # rows kept: R's na.omit over the formula's variables
    rows = pd.read_csv(ref / "rows.csv")["row"].to_numpy() - 1
    np.testing.assert_array_equal(d.rows, rows)
    assert len(d.dropped) == len(table) - rows.size
    # X: R's column names, in R's order, same values
    X = pd.read_csv(ref / "X.csv")
    assert d.r_columns == list(X.columns)
    np.testing.assert_allclose(d.X, X.to_numpy(), rtol=1e-12, atol=1e-12)
    # random terms: lme4's order, group names, cnms and levels
    info = pd.read_csv(ref / "reTrms.csv", dtype={"level": str})
    Z = pd.read_csv(ref / "Z.csv").to_numpy()
    assert len(d.factors) == info.term.nunique()
    for k, (term, fac) in enumerate(zip(d.random_terms, d.factors), start=1):
        sub = info[info.term == k]
        assert term.group == sub.group.iloc[0]
        q = fac.q
        assert list(term.r_columns) == list(sub.cnm.iloc[:q])
        assert list(term.levels) == list(sub.level.iloc[::q])
    # Z: identical, column for column (levels in lme4's order, level-major)
    np.testing.assert_allclose(d.Z(), Z, rtol=1e-12, atol=1e-12)
    # flist: the level of each row
    flist = pd.read_csv(ref / "flist.csv", dtype=str)
    for term, fac in zip(d.random_terms, d.factors):
        levels, codes = fac.codes()
        assert list(np.asarray(term.levels)[codes]) == list(flist[term.group])

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


def test_lme4_term_order_and_names(table):
    d = build_design("~ time + (1 | site) + (1 + time || subject) + (1 | family/subject)", table)
    # lme4: (1|site) (1|subject) (0+time|subject) (1|subject:family) (1|family), then sorted
    # by decreasing levels, ties in reverse order (rev(order(nl)))
    assert [t.group for t in d.random_terms] == ["subject:family", "subject", "subject", "family", "site"]
    # names as lme4's VarCorr: the first of a repeated group keeps the plain name
    assert d.factor_names == ["subject:family", "subject", "subject.1", "family", "site"]
    assert [t.r_columns for t in d.random_terms][1:3] == [("time",), ("(Intercept)",)]


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------

def test_parse_expands_like_lme4():
    p = parse_formula("img ~ x + (1 | a/b/c) + (1 + t || g) + (0 + t | a:b)")
    assert p.lhs == "img" and p.fixed == "x"
    assert [(t.expr, t.group_name) for t in p.random] == [
        ("1", "c:b:a"), ("1", "b:a"), ("1", "a"), ("1", "g"), ("0 + t", "g"), ("0 + t", "a:b")]
    assert parse_formula("~ (1 | g)").fixed == "1"
    assert parse_formula("~ 0 + C(x, levels=['a|b']) + (1|g)").fixed == "0 + C(x, levels=['a|b'])"


@pytest.mark.parametrize("formula,message", [
    ("~ x + (1 | g) y", "must be added to the formula with"),
    ("~ x + (1 | )", "is not a column name"),
    ("~ x + (| g)", "nothing before '|'"),
    ("~ x | g", "'|' outside a random term"),
    ("~ x + (1 | g", "unbalanced"),
    ("a ~ b ~ c", "more than one '~'"),
])
def test_parse_errors(formula, message):
    with pytest.raises(FormulaError, match=message):
        parse_formula(formula)


# ------------------------------------------------------------------------------------------
# fit_formula == fit_lmm on a hand-built design
# ------------------------------------------------------------------------------------------

def test_fit_formula_matches_hand_built_fit_lmm(table):
    rng = np.random.default_rng(7)
    Y = rng.normal(size=(len(table), 3))
    Y[:, 0] += table.time.to_numpy()
    Y[3, 1] = np.nan  # a voxel-level missing value
    formula = "~ age + sex + time * nih_score + (1 + time | subject) + (1 | family)"
    res = fit_formula(formula, table, Y, reml=True)

    keep = table[["age", "sex", "time", "nih_score", "subject", "family"]].notna().all(axis=1).to_numpy()
    t = table[keep]
    X = np.column_stack([np.ones(len(t)), t.age, (t.sex == "M").astype(float), t.time, t.nih_score,
                         t.time * t.nih_score])
    factors = [RandomFactor("subject", t.subject.to_numpy(), np.column_stack([np.ones(len(t)), t.time])),
               RandomFactor("family", t.family.to_numpy(), np.ones((len(t), 1)))]
    ref = fit_lmm(Y[keep], X, factors, reml=True)
    np.testing.assert_array_equal(res.design.rows, np.flatnonzero(keep))
    np.testing.assert_allclose(res.design.X, X, rtol=0, atol=1e-12)
    for a, b in [(res.fit.beta, ref.beta), (res.fit.sigma2, ref.sigma2), (res.fit.llh, ref.llh),
                 (res.fit.cov_beta, ref.cov_beta)] + list(zip(res.fit.D, ref.D)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert res.fit.factor_names == ["subject", "family"]
    np.testing.assert_allclose(res.beta("sexM"), ref.beta[:, 2], rtol=1e-12)

    out = res.infer({"age": "age", "time": "time", "sex": "sex[T.M]", "mix": "age - 2 * time:nih_score",
                     "F": "age, time"})
    from blmm.inference import infer
    L = np.zeros((1, 6))
    L[0, 1], L[0, 5] = 1, -2
    direct = infer(ref, [Contrast("mix", L, True)])
    assert [c.name for c in out.t] == ["age", "time", "sex", "mix"] and [c.name for c in out.f] == ["F"]
    np.testing.assert_allclose(out.t[3].t, direct.t[0].t, rtol=1e-12)
    np.testing.assert_allclose(out.t[3].df, direct.t[0].df, rtol=1e-12)

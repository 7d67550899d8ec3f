"""blmm.formula: lme4 formulas over a participants table.

Designs are checked against R (model.matrix / lme4::lFormula(...)$reTrms) through the
committed outputs of tests/reference/fit_formula_design.R; the suite never runs R.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_lmm
from blmm.formula import (FormulaError, build_design, design_from_table, fit_formula,
                          parse_formula)

REF = Path(__file__).parents[1] / "reference" / "data" / "formula"
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
    np.testing.assert_allclose(d.X, X.to_numpy(), rtol=1e-12, atol=1e-12)  # R's doubles in 15-17 digits: float64
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
    np.testing.assert_allclose(d.Z(), Z, rtol=1e-12, atol=1e-12)  # as X: float64
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
    np.testing.assert_allclose(res.design.X, X, rtol=0, atol=1e-12)  # the same columns built twice: float64
    for a, b in [(res.fit.beta, ref.beta), (res.fit.sigma2, ref.sigma2), (res.fit.llh, ref.llh),
                 (res.fit.cov_beta, ref.cov_beta)] + list(zip(res.fit.D, ref.D)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)  # the same fit of the same arrays: float64
    assert res.fit.factor_names == ["subject", "family"]
    np.testing.assert_allclose(res.beta("sexM"), ref.beta[:, 2], rtol=1e-12)

    out = res.infer({"age": "age", "time": "time", "sex": "sex[T.M]", "mix": "age - 2 * time:nih_score",
                     "F": "age, time"})
    from blmm.core.inference import infer
    L = np.zeros((1, 6))
    L[0, 1], L[0, 5] = 1, -2
    direct = infer(ref, [Contrast("mix", L, True)])
    assert [c.name for c in out.t] == ["age", "time", "sex", "mix"] and [c.name for c in out.f] == ["F"]
    # the same contrast from a formula and from a matrix: float64
    np.testing.assert_allclose(out.t[3].t, direct.t[0].t, rtol=1e-12)
    np.testing.assert_allclose(out.t[3].df, direct.t[0].df, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# bad formulas and tables
# ------------------------------------------------------------------------------------------

def _bad(table, formula, message, **kw):
    with pytest.raises(FormulaError, match=message) as info:
        build_design(formula, table, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_error_unknown_column(table):
    msg = _bad(table, "~ age + sexx + (1 | subject)", "unknown column")
    assert "fixed term 'sexx'" in msg and "did you mean 'sex'" in msg
    msg = _bad(table, "~ poly(agee, 2) + (1 | subject)", "unknown column")
    assert "'agee'" in msg and "poly(agee, 2)" in msg
    assert "random term (1 + tme | subject)" in _bad(table, "~ age + (1 + tme | subject)", "unknown column")
    assert "groups by 'subj'" in _bad(table, "~ age + (1 | subj)", "unknown column")


def _refused(table, formula, message):
    """fit_formula's safe mode (lme4's checks) refuses the design, naming the term, before fitting."""
    Y = np.zeros((len(table), 1))
    with pytest.raises(FormulaError, match=message) as info:
        fit_formula(formula, table, Y)
    return str(info.value)


def test_error_grouping_with_one_level(table):
    t = table.assign(scanner="X")
    msg = _refused(t, "~ age + (1 | subject) + (1 | scanner)", "has 1 level")
    assert "term (1 | scanner)" in msg and "check.nlev.gtr.1" in msg and "safe_mode=False" in msg
    build_design("~ age + (1 | subject) + (1 | scanner)", t)  # the design itself is built


def test_error_grouping_as_many_levels_as_rows(table):
    msg = _refused(table, "~ age + (1 | image)", "as many levels")
    n = int(table[["age", "image"]].notna().all(axis=1).sum())
    assert f"({n})" in msg and "term (1 | image)" in msg and "check.nobs.vs.nlev" in msg


def test_error_more_random_effects_than_observations(table):
    t = table.dropna(subset=["age", "time"]).drop_duplicates("subject")
    t = pd.concat([t, t.iloc[:1].assign(image="extra.nii", time=t.time.iloc[0] + 1)])  # one subject seen twice
    msg = _refused(t, "~ age + (1 + time | subject)", "random effects")
    levels = t.subject.nunique()
    assert (f"term (1 + time | subject): {len(t)} observations against {2 * levels} random effects "
            f"({levels} levels x 2)") in msg and "check.nobs.vs.nRE" in msg


def test_error_slope_constant_within_groups(table):
    msg = _bad(table, "~ age + (1 + sex | subject)", "constant within every level")
    assert "(1 + sex | subject)" in msg and "'sexM'" in msg
    # also when || splits it from the intercept
    _bad(table, "~ age + (1 + sex || subject)", "constant within every level")
    # varies within some site: fine
    build_design("~ age + (1 + sex | site)", table)


def test_error_rank_deficient_X(table):
    t = table.assign(age_months=table.age * 12)
    msg = _bad(t, "~ age + age_months + (1 | subject)", "rank deficient")
    assert "'age_months'" in msg and "'age'" in msg
    t = table.assign(zero=0.0)
    _bad(t, "~ zero + (1 | subject)", "zero in every used row")


def test_error_duplicate_images(table):
    t = table.copy()
    t.loc[4, "image"] = t.loc[0, "image"]
    msg = _bad(t, "image ~ age + (1 | subject)", "more than one row")
    assert "sub-01/ses-0.nii.gz" in msg
    build_design("~ age + (1 | subject)", t)  # without an images column, no check


def test_lhs_must_be_the_images_column(table):
    assert build_design("image ~ age + (1 | subject)", table).images == "image"
    _bad(table, "image ~ age + (1 | subject)", "must be the images column", images="path")
    _bad(table, "~ age + (1 | subject)", "unknown images column", images="path")


def test_na_omit_and_error(table):
    d = build_design("~ age + sex + nih_score + (1 | subject)", table)
    assert [(r.row, r.reason) for r in d.dropped] == [
        (5, "NA in nih_score"), (17, "NA in sex"), (30, "NA in nih_score")]
    assert d.n == len(table) - 3 and d.n_table == len(table)
    msg = _bad(table, "~ age + sex + nih_score + (1 | subject)", "3 row", na_action="error")
    assert "nih_score (2)" in msg and "sex (1)" in msg
    # only the columns the model uses count
    assert build_design("~ age + (1 | subject)", table, na_action="error").n == len(table)
    with pytest.raises(FormulaError, match="na_action"):
        build_design("~ age", table, na_action="drop")


# ------------------------------------------------------------------------------------------
# contrasts
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def design(table):
    return build_design("~ age + sex * site + time * nih_score + (1 | subject)", table)


def test_contrast_by_coefficient_name(design):
    assert design.columns[:6] == ["Intercept", "age", "sex[T.M]", "site[T.b]", "site[T.c]", "time"]
    for spec in ("sex[T.M]", "sexM", "`sex[T.M]`"):
        c = design.contrast(spec)
        assert c.is_t and c.matrix.shape == (1, design.p) and c.matrix[0, 2] == 1 and c.matrix.sum() == 1
    assert design.contrast("(Intercept)").matrix[0, 0] == 1
    j = design.columns.index("time:nih_score")
    assert design.contrast("nih_score:time").matrix[0, j] == 1  # either factor order


def test_contrast_by_term(design):
    c = design.contrast("site")
    assert not c.is_t and c.matrix.shape == (2, design.p)
    np.testing.assert_array_equal(np.flatnonzero(c.matrix.sum(0)), design.terms["site"])
    c = design.contrast("sex:site")
    assert not c.is_t and c.n_rows == 2
    assert design.contrast("age").is_t


def test_contrast_linear_combination(design):
    c = design.contrast("age - 2 * sex[T.M]", name="mix")
    assert c.name == "mix" and c.is_t
    expected = np.zeros(design.p)
    expected[1], expected[2] = 1, -2
    np.testing.assert_array_equal(c.matrix[0], expected)
    np.testing.assert_array_equal(design.contrast("age - 2 * sexM").matrix, c.matrix)
    c = design.contrast("site[T.b], site[T.c] - site[T.b]")
    assert not c.is_t and c.n_rows == 2
    c = design.contrast("(site[T.b] + site[T.c]) / 2 - time:nih_score")
    assert c.matrix[0, 3] == 0.5 and c.matrix[0, design.columns.index("time:nih_score")] == -1
    with pytest.raises(FormulaError, match="L beta = 0"):
        design.contrast("age = 1")


def test_contrast_unknown_names(design):
    with pytest.raises(FormulaError, match=r"unknown coefficient or term 'agee'; did you mean 'age'"):
        design.contrast("agee")
    with pytest.raises(FormulaError, match="unknown coefficient or term 'foo'") as info:
        design.contrast("2 * foo + age")
    assert str(info.value).count(",") < 10  # the first few names, not all of them (issue 18)


@pytest.mark.parametrize("spec", ["sex[T.F]", "sexF"])
def test_contrast_naming_the_reference_level_says_so(design, spec):
    # issue 18: --contrast "sex[T.F]", F the reference, suggested 'sex[T.M]' or 'site[T.site14]' and all names
    with pytest.raises(FormulaError) as info:
        design.contrast(spec)
    text = str(info.value)
    assert "'F' is the reference level of sex" in text and "coded by 'sex[T.M]'" in text
    assert "did you mean" not in text and "site" not in text
    np.testing.assert_array_equal(design.contrast("-1 * sex[T.M]").matrix,
                                  -design.contrast("sex[T.M]").matrix)  # the spelling the message offers


def test_contrasts_mapping_and_list(design):
    cs = design.contrasts({"age": "age", "site": "site"})
    assert [(c.name, c.is_t) for c in cs] == [("age", True), ("site", False)]
    cs = design.contrasts(["age", [0] * (design.p - 1) + [1]])
    assert cs[0].name == "age" and cs[1].is_t
    with pytest.raises(FormulaError, match="entries"):
        design.contrasts([[1, 0]])


# ------------------------------------------------------------------------------------------
# table + images column -> design and image paths
# ------------------------------------------------------------------------------------------

def test_design_from_table(tmp_path, table):
    path = tmp_path / "participants.tsv"
    table.to_csv(path, sep="\t", index=False)
    d, images = design_from_table(path, "image ~ age + sex + (1 | subject)")
    assert d.images == "image" and len(images) == d.n == len(table) - 1
    assert images[0] == tmp_path / "sub-01/ses-0.nii.gz"
    d2, images2 = design_from_table(table, "~ age + (1 | subject)", images="image", table_dir="/data")
    assert str(images2[0]) == "/data/sub-01/ses-0.nii.gz" and d2.n == len(table)
    with pytest.raises(FormulaError, match="no images column"):
        design_from_table(table, "~ age + (1 | subject)")
    with pytest.raises(FormulaError, match="not found"):
        design_from_table(tmp_path / "missing.csv", "image ~ age")


def test_fit_formula_row_checks(table):
    with pytest.raises(FormulaError, match="Y has 5 rows"):
        fit_formula("~ age + (1 | subject)", table, np.zeros((5, 2)))


def test_formulaic_transforms_and_bool(table):
    t = table.assign(patient=table.subject.isin(["s01", "s02", "s03"]))
    d = build_design('~ C(site, contr.treatment("b")) + center(age) + patient + (1 | subject)', t)
    assert d.columns[1:3] == ['C(site, contr.treatment("b"))[T.a]', 'C(site, contr.treatment("b"))[T.c]'] or \
        d.columns[1:3] == ["C(site, contr.treatment('b'))[T.a]", "C(site, contr.treatment('b'))[T.c]"]
    assert abs(d.X[:, 3].mean()) < 1e-12  # centred in float64
    assert d.columns[4] == "patient[T.True]" and d.r_columns[4] == "patientTRUE"
    assert d.contrast("patientTRUE").matrix[0, 4] == 1


# ------------------------------------------------------------------------------------------
# R's spellings (issue 18)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["factor(site_code)", "as.factor(site_code)"])
def test_factor_and_as_factor_are_C(table, spelling):
    t = table.assign(site_code=table.site.map({"a": 1, "b": 2, "c": 3}))
    d = build_design(f"~ age + {spelling} + (1 | subject)", t)
    ref = build_design("~ age + C(site_code) + (1 | subject)", t)
    np.testing.assert_array_equal(d.X, ref.X)  # the same columns, exactly
    assert d.columns[2:] == ["factor(site_code)[T.2]", "factor(site_code)[T.3]"]
    assert d.r_columns[2:] == ["factor(site_code)2", "factor(site_code)3"]  # R's names of factor(site_code)
    assert not d.notes
    F = d.contrast("factor(site_code)")
    assert not F.is_t and F.matrix.shape == (2, d.p)
    assert np.array_equal(d.contrast(spelling).matrix, F.matrix)  # the term by the formula's own spelling
    with pytest.raises(FormulaError, match=r"'site_code'; the formula uses it as 'factor\(site_code\)'"):
        d.contrast("site_code")
    grouped = build_design("~ age + (1 | factor(subject))", t)  # a grouping factor written as a factor
    assert grouped.factors[0].n_levels == t.subject.nunique()


def test_numeric_codes_used_as_a_slope_get_a_note(table):
    t = table.assign(site_code=table.site.map({"a": 1, "b": 2, "c": 3}))
    d = build_design("~ age + site_code + (1 | subject)", t)
    assert d.p == 3 and len(d.notes) == 1  # fitted as one slope, as R does
    assert "'site_code' is numeric with 3 distinct values (1 to 3)" in d.notes[0]
    assert "write factor(site_code)" in d.notes[0]
    assert not build_design("~ age + nih_score + (1 | subject)", table).notes  # continuous: no note


@pytest.mark.parametrize("formula,term", [
    ("~ as.factor(site) + age^", "age^"),
    ("~ age + sex b", "sex b"),
    ("~ age + sex$x", "sex$x"),
    ("~ age + 1/0", "1/0"),
    ("~ .", "."),
    ("~ age + sex[1] + (1 | subject)", "sex[1]"),
    ("~ age + offset(nih_score)", "offset(nih_score)"),
    ("~ age + (0 | subject)", "(0 | subject)"),
])
def test_every_rejected_formula_names_its_term(table, formula, term):
    # issue 18: as.factor(site) gave "unexpected error: SyntaxError: invalid syntax"
    with pytest.raises(FormulaError) as info:
        build_design(formula, table)
    text = str(info.value)
    assert term in text and "\x1b" not in text and "⧛" not in text

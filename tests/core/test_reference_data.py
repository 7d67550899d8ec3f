"""The committed lme4/lmerTest reference results are complete and self-consistent.

No R is needed: these tests read tests/reference/data/ only.  Besides shapes, they check that
R's numbers agree with the model as the package states it (V = sigma2 (I + Z D Z'), D relative
to sigma2, Z built from the level labels and per-factor designs), by recomputing with numpy
the GLS estimate, its covariance, the (RE)ML log-likelihood and the contrast statistics from
R's own variance estimates.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_LOAD = Path(__file__).resolve().parents[1] / "reference" / "load.py"
_spec = importlib.util.spec_from_file_location("blmm_reference_load", _LOAD)
ref = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ref
_spec.loader.exec_module(ref)


@pytest.fixture(scope="module", params=ref.CASES + ref.SINGULAR_CASES)
def case(request):
    return ref.load_case(request.param)


def _marginal_cov(case, rows, D):
    """V / sigma2 = I + sum_k (same level)_k * (Z_k D_k Z_k') on the given rows."""
    n = int(rows.sum())
    V = np.eye(n)
    for name, labels, design in case.factors:
        lab = labels[rows]
        Zd = design[rows]
        same = lab[:, None] == lab[None, :]
        V += same * (Zd @ D[name] @ Zd.T)
    return V


def _gls(case, res, v):
    """R's variance estimates of voxel v -> (rows, beta, vcov, llh_ML, llh_REML)."""
    rows = ~np.isnan(case.Y[:, v])
    X = case.X[rows]
    y = case.Y[rows, v]
    n, p = X.shape
    s2 = res["sigma2"][v]
    D = {name: res["D"][name][v] for name, _, _ in case.factors}
    V = s2 * _marginal_cov(case, rows, D)
    Vi_X = np.linalg.solve(V, X)
    Vi_y = np.linalg.solve(V, y)
    XtViX = X.T @ Vi_X
    beta = np.linalg.solve(XtViX, X.T @ Vi_y)
    r = y - X @ beta
    quad = r @ np.linalg.solve(V, r)
    logdetV = np.linalg.slogdet(V)[1]
    llh_ml = -0.5 * (n * np.log(2 * np.pi) + logdetV + quad)
    llh_reml = -0.5 * ((n - p) * np.log(2 * np.pi) + logdetV + np.linalg.slogdet(XtViX)[1] + quad)
    return rows, beta, np.linalg.inv(XtViX), llh_ml, llh_reml


def test_shapes(case):
    n, p, V = case.n, case.p, case.n_voxels
    assert p == (5 if case.name in ref.SINGULAR_CASES else 3)
    assert case.Y.shape == (n, V) and 8 <= V <= 16
    assert np.all(case.X[:, 0] == 1.0)
    assert len(case.factors) in (1, 2, 3)
    for name, labels, design in case.factors:
        assert labels.shape == (n,) and design.shape[0] == n
        assert design.shape[1] in (1, 2, 3)
    expected = ["X2", "X5", "X2-X3", "F_X2_X5"] if p == 5 else ["X2", "X3", "X2-X3", "F_X2_X3"]
    assert [c[0] for c in case.contrasts] == expected
    assert case.contrasts[3][1].shape == (2, p)
    for res in (case.reml, case.ml):
        assert res["beta"].shape == (V, p)
        assert res["sigma2"].shape == (V,)
        assert res["vcov"].shape == (V, p, p)
        assert res["llh"].shape == (V,)
        assert res["singular"].shape == (V,)
        assert len(res["T"]) == 3 and len(res["F"]) == 1
        for name, labels, design in case.factors:
            q = design.shape[1]
            assert res["D"][name].shape == (V, q, q)
            assert res["theta"][name].shape == (V, q * (q + 1) // 2)
        # observation counts and level counts after dropping each voxel's NA rows
        for v in range(V):
            rows = ~np.isnan(case.Y[:, v])
            assert res["n_obs"][v] == rows.sum()
            for name, labels, _ in case.factors:
                assert res["n_levels"][name][v] == np.unique(labels[rows]).size


def test_values_finite_and_consistent(case):
    for res in (case.reml, case.ml):
        assert np.all(np.isfinite(res["llh"]))
        assert np.all(np.isfinite(res["beta"])) and np.all(np.isfinite(res["vcov"]))
        assert np.all(res["sigma2"] > 0)
        for name, _, _ in case.factors:
            s2D = res["sigma2D"][name]
            D = res["D"][name]
            # one product in R, one here, each written with 15-17 significant digits: float64
            np.testing.assert_allclose(s2D, D * res["sigma2"][:, None, None], rtol=1e-12, atol=0)
            np.testing.assert_allclose(D, np.swapaxes(D, 1, 2), rtol=0, atol=0)
            # positive semi-definite (eigenvalues >= 0 up to rounding)
            assert np.all(np.linalg.eigvalsh(D) >= -1e-10 * np.abs(D).max())
        for T in res["T"]:
            for k in ("estimate", "se", "t", "df", "p"):
                assert np.all(np.isfinite(T[k])), (case.name, T["name"], k)
            assert np.all(T["df"] > 0)
        for F in res["F"]:
            assert np.all(np.isfinite(F["F"])) and np.all(F["DenDF"] > 0)
            assert np.all(F["NumDF"] == 2)
        # the kept fit is the best of the optimisers, and the best two agree tightly
        llhs = np.vstack(list(res["llh_by_optimizer"].values()))
        np.testing.assert_array_equal(res["llh"], llhs.max(axis=0))
        second = np.sort(llhs, axis=0)[-2]
        # lme4's reproducibility: the best two optimisers agree to 6.6e-10 at worst (q3_singular), 4e-13 elsewhere
        assert np.all(res["llh"] - second < 1e-9)


def test_gls_and_likelihood_agree_with_r(case):
    """beta, vcov and logLik implied by R's (sigma2, D) agree with R's own numbers."""
    for res, is_reml in ((case.reml, True), (case.ml, False)):
        for v in range(case.n_voxels):
            _, beta, cov, llh_ml, llh_reml = _gls(case, res, v)
            # R's sparse Cholesky against dense n x n solves here (n <= ~900, cond(V) ~1e3): float64, ~1e-12
            np.testing.assert_allclose(beta, res["beta"][v], rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(cov, res["vcov"][v], rtol=1e-9, atol=1e-14)
            llh = llh_reml if is_reml else llh_ml
            assert abs(llh - res["llh"][v]) < 1e-8, (case.name, v, is_reml, llh, res["llh"][v])


def test_contrast_statistics_agree_with_r(case):
    for res in (case.reml, case.ml):
        for T in res["T"]:
            L = T["L"]
            est = res["beta"] @ L
            se = np.sqrt(np.einsum("i,vij,j->v", L, res["vcov"], L))
            # R's arithmetic on the numbers it wrote (15-17 digits): float64
            np.testing.assert_allclose(T["estimate"], est, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(T["se"], se, rtol=1e-10)
            np.testing.assert_allclose(T["t"], est / se, rtol=1e-10)
        for F in res["F"]:
            L = F["L"]
            Lb = res["beta"] @ L.T
            LVL = np.einsum("ij,vjk,lk->vil", L, res["vcov"], L)
            stat = np.einsum("vi,vi->v", Lb, np.linalg.solve(LVL, Lb[..., None])[..., 0]) / L.shape[0]
            np.testing.assert_allclose(F["F"], stat, rtol=1e-8)  # a 2 x 2 solve of R's own numbers: float64


def test_case_features():
    """Each case carries the feature it is there for."""
    b = ref.load_case("boundary")
    assert b.reml["singular"].sum() >= 3 and b.ml["singular"].sum() >= 3
    assert (~b.reml["singular"]).sum() >= 3
    # a singular fit of a single-intercept factor has D == 0 exactly
    assert np.all(b.reml["D"]["f1"][b.reml["singular"]] == 0.0)
    m = ref.load_case("missing")
    n_missing = np.isnan(m.Y).sum(axis=0)
    assert (n_missing == 0).sum() >= 2 and n_missing.max() > 0
    assert np.all(n_missing <= 0.2 * m.n + 1)
    assert m.factors[0][2].shape[1] == 2
    s = ref.load_case("singletons")
    _, counts = np.unique(s.factors[0][1], return_counts=True)
    assert 0.6 < np.mean(counts == 1) < 0.9
    for name in ("intercept", "slope", "crossed", "nested", "singletons"):
        c = ref.load_case(name)
        assert c.reml["singular"].sum() <= 1, name
    nest = ref.load_case("nested")
    site, subj = nest.factors[0][1], nest.factors[1][1]
    # subject ids are nested in sites: every subject sits in exactly one site
    for s_id in np.unique(subj):
        assert np.unique(site[subj == s_id]).size == 1


def _nested_in(inner: np.ndarray, outer: np.ndarray) -> bool:
    """Every level of inner sits in exactly one level of outer."""
    return all(np.unique(outer[inner == i]).size == 1 for i in np.unique(inner))


def _times_by_subject(case, column: int = 1) -> dict:
    subj = case.factors[0][1]
    return {s: tuple(case.X[subj == s, column]) for s in np.unique(subj)}


def test_new_case_features():
    """Issue 9's cases carry the feature they are there for."""
    b = ref.load_case("balanced_q2")
    times = _times_by_subject(b)
    assert len(times) == 18 and set(times.values()) == {tuple(range(10))}
    assert np.array_equal(b.factors[0][2][:, 1], b.X[:, 1])  # (1 + day | subject)
    v = ref.load_case("balanced_visits")
    times = list(_times_by_subject(v).values())
    assert set(times) == {(0.0, 1.0), (0.0, 1.0, 2.0)}
    assert times.count((0.0, 1.0, 2.0)) > len(times) / 2
    q3 = ref.load_case("balanced_q3")
    Z = q3.factors[0][2]
    assert Z.shape[1] == 3
    subj = q3.factors[0][1]
    rows = [Z[subj == s] for s in np.unique(subj)]
    assert all(np.array_equal(r, rows[0]) for r in rows)  # identical design for every subject
    n3 = ref.load_case("nested3")
    site, fam, subj = (f[1] for f in n3.factors)
    assert _nested_in(fam, site) and _nested_in(subj, fam)
    assert np.unique(site).size < np.unique(fam).size < np.unique(subj).size
    cs = ref.load_case("crossed_slope")
    subj, scanner = cs.factors[0][1], cs.factors[1][1]
    assert cs.factors[0][2].shape[1] == 2 and cs.factors[1][2].shape[1] == 1
    assert not _nested_in(subj, scanner)  # crossed: subjects visit several scanners
    tm = ref.load_case("two_factor_missing")
    n_missing = np.isnan(tm.Y).sum(axis=0)
    assert (n_missing == 0).sum() >= 2 and n_missing.max() > 0
    for res in (tm.reml, tm.ml):
        # a voxel that loses a whole subject, one that loses a whole site
        assert res["n_levels"]["f1"].min() < np.unique(tm.factors[0][1]).size
        assert res["n_levels"]["f2"].min() < np.unique(tm.factors[1][1]).size
    for name in ("family_intercept", "family_slope"):
        c = ref.load_case(name)
        fam, subj = c.factors[0][1], c.factors[1][1]
        assert _nested_in(subj, fam)
        sizes = np.array([np.unique(subj[fam == f]).size for f in np.unique(fam)])
        assert sizes.max() <= 3 and 0.5 < np.mean(sizes == 1) < 0.9  # mostly singletons
        _, visits = np.unique(subj, return_counts=True)
        assert visits.min() == 1 and visits.max() == 3
    assert ref.load_case("family_slope").factors[1][2].shape[1] == 2
    # every new case has a voxel at (R: singular) or near the boundary (true variance 0)
    for name in ("balanced_q2", "balanced_q3", "nested3", "crossed_slope", "family_intercept",
                 "family_slope"):
        c = ref.load_case(name)
        assert c.reml["singular"].any() and c.ml["singular"].any(), name
        assert (~c.reml["singular"]).sum() >= 5, name

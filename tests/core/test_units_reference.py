"""blmm on covariates in their own units and raw-intensity Y against lme4/lmerTest (issue 17).

The `units_icv` case (tests/reference/make_units_reference.py, fit_units.R): X = [1, age, sex,
time, ICV in mm³], a random intercept and slope on time, Y raw intensities (mean ~7e3).  lme4
was fitted on standardised data and mapped back exactly; lme4's own deviance function on the
raw data agrees with the mapped llh (checked below).  The suite never runs R.
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from blmm.core.design import Contrast, RandomFactor
from blmm.core.design_basis import DesignNote
from blmm.core.fit import fit_lmm
from blmm.core.scoring import METHODS
from blmm.core.inference import infer

CASE = Path(__file__).resolve().parents[1] / "reference" / "data" / "units_icv"

LLH_ATOL = 1e-6  # lme4's reproducibility of the optimum (tests/core/test_fit_reference.py uses the same)
REL = 1e-5  # β, σ², Cov(β̂) and T: lme4's optimum is determined to ~1e-6 in θ at these voxels
D_REL = 1e-6  # D: fits of the centred Y agree with lme4's mapped D to 1.5e-7 (every method, REML/ML)
DF_REL = 1e-3  # Satterthwaite df: lmerTest's numerical Hessian of the deviance (as test_fit_reference.py)
DEVFUN_ATOL = 1e-9  # lme4's deviance on raw data vs the mapped llh: both exact, rounding of ~1e3 values


def _csv(name: str) -> np.ndarray:
    with open(CASE / name, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return np.array([[float(v) for v in row] for row in rows if row])


def load():
    X, Y, Z = _csv("X.csv"), _csv("Y.csv"), _csv("Z_f1.csv")
    labels = _csv("factors.csv")[:, 0].astype(np.int64)
    contrasts = [Contrast.from_vector(c["name"], c["vector"]) for c in json.loads((CASE / "contrasts.json").read_text())]
    refs = {reml: json.loads((CASE / f"lme4_units_{'REML' if reml else 'ML'}.json").read_text())["voxels"]
            for reml in (True, False)}
    return X, Y, [RandomFactor("f1", labels, Z)], contrasts, refs


def test_reference_is_lme4s_own_deviance_on_raw_units():
    """The mapped lme4 optimum is what lme4's deviance function gives on the raw data."""
    *_, refs = load()
    for voxels in refs.values():
        for v in voxels:
            assert abs(v["llh"] - v["llh_devfun"]) < DEVFUN_ATOL
            assert not v["singular"]


def problems_against_lme4(X, Y, factors, contrasts, ref, reml, method, y_shift):
    """Every criterion blmm misses against lme4 (y_shift: per-voxel constant taken out of Y)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_lmm(Y - y_shift, X, factors, reml=reml, method=method)
    out = []
    if not any(issubclass(w.category, DesignNote) for w in caught):  # ICV's sd is ~1e5 times sex's
        out.append("no scale note")
    if not (fit.converged.all() and (fit.status == 0).all()):
        out.append(f"stop {fit.stop.tolist()}, status {fit.status.tolist()}")
    beta_fit = fit.beta.copy()
    beta_fit[:, 0] += y_shift  # X's first column is the intercept: a constant in Y moves β₀ only
    llh = np.array([v["llh"] for v in ref])
    beta = np.array([v["beta"] for v in ref])
    cov = np.array([v["vcov"] for v in ref])
    sigma2 = np.array([v["sigma2"] for v in ref])
    D = np.array([v["D"] for v in ref])
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    inf = infer(fit, contrasts, two_sided=True)
    checks = {
        "llh below lme4's": (np.max(llh - fit.llh), LLH_ATOL),
        "beta (in SEs)": (np.max(np.abs(beta_fit - beta) / se), REL),
        "sigma2": (np.max(np.abs(fit.sigma2 / sigma2 - 1)), REL),
        "D": (np.max(np.abs(fit.D[0] - D) / np.sqrt(np.einsum("vii,vjj->vij", D, D))), D_REL),
        "cov": (np.max(np.abs(fit.cov_beta - cov) / np.sqrt(np.einsum("vii,vjj->vij", cov, cov))), REL),
    }
    for k, ours in enumerate(inf.t):
        theirs = {key: np.array([v["T"][k][key] for v in ref]) for key in ("se", "t", "df")}
        checks[f"{ours.name} t"] = (np.max(np.abs(ours.t - theirs["t"])) / max(1.0, np.abs(theirs["t"]).max()), REL)
        checks[f"{ours.name} se"] = (np.max(np.abs(ours.se / theirs["se"] - 1)), REL)
        checks[f"{ours.name} df"] = (np.max(np.abs(ours.df / theirs["df"] - 1)), DF_REL)
    checks["F"] = (np.max(np.abs(inf.f[0].F / np.array([v["F"]["F"] for v in ref]) - 1)), REL)
    checks["F df"] = (np.max(np.abs(inf.f[0].df / np.array([v["F"]["DenDF"] for v in ref]) - 1)), DF_REL)
    out += [f"{name} off by {d:.3g} (limit {limit:g})" for name, (d, limit) in checks.items() if not d <= limit]
    return [f"{'REML' if reml else 'ML'} {method}: {o}" for o in out]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_covariates_in_their_units_against_lme4(reml, method):
    """ICV in mm³ and time in years as given; Y with its mean taken out (raw Y: the test below)."""
    X, Y, factors, contrasts, refs = load()
    assert np.mean(X[:, 4]) > 1e6
    problems = problems_against_lme4(X, Y, factors, contrasts, refs[reml], reml, method, Y.mean(axis=0))
    assert not problems, "\n".join(problems)


def test_raw_intensities_against_lme4():
    """The same with raw-intensity Y (mean ~7e3): without the per-voxel centre the sums lost ~1e-5 of D."""
    X, Y, factors, contrasts, refs = load()
    assert np.mean(Y) > 1e3
    problems = [problem for reml in (True, False) for method in METHODS
                for problem in problems_against_lme4(X, Y, factors, contrasts, refs[reml], reml, method, 0.0)]
    assert not problems, "\n".join(problems)

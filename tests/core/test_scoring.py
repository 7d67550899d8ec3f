"""The stop rules of the scoring loop (docs/model.md "Convergence"): every stop reason is produced
here, and no label depends on the units of the data or on llh's additive constant."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.fit import fit_lmm
from blmm.core.objective import LevelObjective
from blmm.core.scoring import METHODS, score
from blmm.core.status import CONVERGED, ITERATION_LIMIT, NOT_FINITE, NOT_FITTED, STEP_FAILED, STOP_NAMES
from blmm.core.sufficient import sufficient_stats

TOL = 1e-6  # fit_lmm's default convergence tolerance on llh


def simulate(seed=0, n_sub=40, v=4, time_unit=1.0):
    """Random intercept + slope on time (in years, times `time_unit`), X = [1, time, covariate]."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(2, 5, n_sub)
    sub = np.repeat(np.arange(n_sub), visits)
    n = sub.size
    t = rng.uniform(0, 3, n)
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    Zd = np.column_stack([np.ones(n), t])
    Y = np.empty((n, v))
    for j in range(v):
        b = rng.multivariate_normal(np.zeros(2), [[1.0 + j, 0.2], [0.2, 0.3]], n_sub)
        Y[:, j] = X @ [1, 0.5, -0.2] + np.sum(Zd * b[sub], 1) + rng.normal(size=n) * 1.3
    scale = np.array([1.0, time_unit, 1.0])
    return X * scale, RandomFactor("subject", sub, Zd * scale[:2]), Y


def level_problem(reml=True, **kw):
    """(objective, data, n, p) of one complete-data pattern."""
    X, f, Y = simulate(**kw)
    st = sufficient_stats(Y, X, [f])
    n, p = int(st.n_obs[0]), st.p
    obj = LevelObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], n, f.q, reml)
    return obj, obj.data(st.XtY, st.ZtY, st.YtY), n, p


class Shifted:
    """The same objective with `shift` added to llh (an arbitrary constant, as llh carries) and, with
    `drift`, every later evaluation `drift` lower than the one before: past the point where a step
    gains less than `drift`, no step can succeed (a float64 llh that cannot resolve the gain)."""

    def __init__(self, inner, shift=0.0, drift=0.0):
        self.inner, self.shift, self.drift, self.calls = inner, shift, drift, 0

    def evaluate(self, D_list, data, sigma2=None, grad=False):
        ev = self.inner.evaluate(D_list, data, sigma2=sigma2, grad=grad)
        ev.llh = ev.llh + self.shift - self.drift * self.calls
        self.calls += 1
        return ev


class Blocked:
    """Every D but the starting D = 0 scores `drop` lower: every step fails."""

    def __init__(self, inner, drop=1e6):  # more than any step gains here
        self.inner, self.drop = inner, drop

    def evaluate(self, D_list, data, sigma2=None, grad=False):
        ev = self.inner.evaluate(D_list, data, sigma2=sigma2, grad=grad)
        moved = np.any([np.any(Dk != 0.0, axis=(1, 2)) for Dk in D_list], axis=0)
        ev.llh = ev.llh - self.drop * moved
        return ev


class NaNAt:
    """The objective with a non-finite llh at one voxel (as a σ² of 0 or non-finite data gives)."""

    def __init__(self, inner, voxel):
        self.inner, self.voxel = inner, voxel

    def evaluate(self, D_list, data, sigma2=None, grad=False):
        ev = self.inner.evaluate(D_list, data, sigma2=sigma2, grad=grad)
        if ev.llh.shape[0] == data.XtY.shape[0] == 4:  # the full block: the bad voxel is in it
            ev.llh[self.voxel] = np.nan
            ev.ok[self.voxel] = False
        return ev


@pytest.mark.parametrize("method", METHODS)
def test_converged_is_at_the_optimum(method):
    obj, data, n, p = level_problem()
    res = score(obj, data, [2], method, TOL, 200, True, n, p)
    assert np.all(res.stop == CONVERGED) and res.converged.all()
    # one more iteration from there gains nothing: what is left is below tol (the rule's promise)
    again = score(obj, data, [2], method, 1e-12, 500, True, n, p)
    assert np.all(again.stop == CONVERGED)
    ev_a = obj.evaluate(res.D, data)
    ev_b = obj.evaluate(again.D, data)
    assert np.all(ev_b.llh - ev_a.llh < TOL)


@pytest.mark.parametrize("method", METHODS)
def test_every_step_failing_is_step_failed_not_converged(method):
    """From D = 0 no step and no boundary escape is accepted, and D = 0 is not the optimum
    (the data have a subject variance): STEP_FAILED, never an unearned CONVERGED."""
    obj, data, n, p = level_problem()
    res = score(Blocked(obj), data, [2], method, TOL, 50, True, n, p)
    assert np.all(res.stop == STEP_FAILED), [STOP_NAMES[s] for s in res.stop]
    assert not res.converged.any()
    assert all(np.all(Dk == 0.0) for Dk in res.D)


@pytest.mark.parametrize("method", METHODS)
def test_a_step_flat_within_tol_stops_trying_at_once(method):
    """At the optimum every step fails by less than tol (here 1e-9 per evaluation, as rounding can): the
    voxel stops after its one failed trial, converged where it is, instead of damping the step 39 more
    times (2 evaluations: the start and the trial; 41 before the rule, for pSFS, pFS and FS)."""
    obj, data, n, p = level_problem()
    res = score(obj, data, [2], method, TOL, 200, True, n, p)
    flat = Shifted(obj, drift=1e-9)
    again = score(flat, data, [2], method, TOL, 50, True, n, p, start=res.D)
    assert flat.calls <= 2
    assert np.all(again.stop == CONVERGED)


def test_iteration_limit_and_not_finite():
    obj, data, n, p = level_problem()
    res = score(NaNAt(obj, 1), data, [2], "pSFS", TOL, 2, True, n, p)
    assert res.stop.tolist() == [ITERATION_LIMIT, NOT_FINITE, ITERATION_LIMIT, ITERATION_LIMIT]
    assert not res.converged.any() and res.ok.tolist() == [True, False, True, True]


def test_too_few_rows_is_not_fitted():
    X, f, Y = simulate()
    Y[3:, 2] = np.nan  # 3 observations for p = 3 fixed effects
    fit = fit_lmm(Y, X, [f], safe_mode=False)  # the n <= p rule, not lme4's checks
    assert fit.stop[2] == NOT_FITTED and not fit.converged[2]
    assert np.all(fit.stop[[0, 1, 3]] == CONVERGED)


@pytest.mark.parametrize("drift", [0.0, 1e-4])
@pytest.mark.parametrize("method", ["pSFS", "FS"])
def test_labels_ignore_llh_constant(method, drift):
    """llh + a constant (1e5 is |llh| of ~10⁴ images) is the same objective: the same labels.

    With a drift, steps stop succeeding once they would gain < 1e-4, so voxels end in the
    stuck branch; the rule used to compare the predicted gain with 1e-9 |llh| there."""
    obj, data, n, p = level_problem()
    labels = {}
    for shift in (0.0, 1e5, -1e5):
        res = score(Shifted(obj, shift, drift), data, [2], method, TOL, 200, True, n, p)
        labels[shift] = res.stop.tolist()
    assert labels[1e5] == labels[0.0] == labels[-1e5], labels
    if drift:
        assert STEP_FAILED in labels[0.0]  # the drift leaves more than tol unrealised


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("method", METHODS)
def test_labels_and_fit_ignore_the_unit_of_time(method, reml):
    """Time in days instead of years (X and Z): the same labels and llh differences; D and β rescale."""
    days = 365.25
    X, f, Y = simulate()
    years = fit_lmm(Y, X, [f], reml=reml, method=method)
    X, f, Y = simulate(time_unit=days)
    in_days = fit_lmm(Y, X, [f], reml=reml, method=method)
    assert in_days.stop.tolist() == years.stop.tolist() == [CONVERGED] * 4
    # REML's -½ log|X'V⁻¹X| moves by the constant -log(days) (one column of X scaled); ML's llh does not
    shift = in_days.llh - years.llh
    expect = -np.log(days) if reml else 0.0
    # tol (1e-6) per fit bounds each llh's distance to its optimum
    assert np.all(np.abs(shift - expect) < 2 * TOL), (shift, expect)
    # σ² and the rescaled D at the optimum: the likelihood pins them to ~sqrt(tol)
    np.testing.assert_allclose(in_days.sigma2, years.sigma2, rtol=1e-3)
    S = np.diag([1.0, 1.0 / days])
    np.testing.assert_allclose(S @ years.D[0] @ S, in_days.D[0], rtol=1e-3, atol=1e-3 * np.abs(years.D[0]).max() / days)

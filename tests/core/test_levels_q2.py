"""The fused q = 2 kernel of LevelObjective (core/objective/levels_q2.py) against its reference, the
entry-by-entry array code of LevelObjective (the path every other namespace, q and class layout takes)."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.hessian import variance_hessian
from blmm.core.objective import LevelObjective
from blmm.core.sufficient import sufficient_stats

# the kernel sums the same terms in another order (closed forms, one GEMM for three): float64 rounding times
# the conditioning of X'V⁻¹X; measured 1.4e-11 of the largest entry for β at the 30x D, where the random slope
# nearly absorbs the time column, so 7x margin
RTOL = 1e-10


def irregular_visits(seed: int, subjects: int = 40, voxels: int = 70):
    """Intercept + slope per subject, irregular visit times: every subject its own class (design 2's shape)."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 5, subjects)
    sub = np.repeat(np.arange(subjects), visits)
    n = sub.size
    t = np.concatenate([np.sort(rng.uniform(0, 3, k)) for k in visits])
    X = np.column_stack([np.ones(n), t, rng.normal(size=(n, 3))])
    Z = np.column_stack([np.ones(n), t])
    b = rng.normal(size=(subjects, 2, voxels)) * np.array([1.0, 0.4])[None, :, None]
    Y = rng.normal(size=(n, voxels)) + b[sub, 0] + t[:, None] * b[sub, 1] + X[:, 1:2] * 0.3
    return sufficient_stats(Y, X, [RandomFactor("s", sub, Z)])


def points(rng, v: int) -> np.ndarray:
    """PSD D: full rank, singular (rank 1), zero, and larger (30x), in turn."""
    A = rng.normal(size=(v, 2, 2))
    D = A @ np.swapaxes(A, 1, 2)
    D[1::4] = np.einsum("va,vb->vab", A[1::4, :, 0], A[1::4, :, 0])
    D[2::4] = 0.0
    D[3::4] *= 30.0
    return D


def objective_pair(reml: bool, seed: int = 0):
    st = irregular_visits(seed)
    obj = LevelObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], int(st.n_obs[0]), 2, reml)
    assert obj.q2 is not None and obj.Cb == 0
    plain = LevelObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], int(st.n_obs[0]), 2, reml)
    plain.q2 = None  # the reference: entry-by-entry arrays
    return st, obj, plain


def close(a, b, scale=None) -> float:
    scale = np.max(np.abs(b)) if scale is None else scale
    return float(np.max(np.abs(a - b)) / max(scale, 1e-300))


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_fused_evaluation_equals_entrywise(reml):
    st, obj, plain = objective_pair(reml)
    D = points(np.random.default_rng(1), st.XtY.shape[0])
    data = obj.data(st.XtY, st.ZtY, st.YtY)
    for sigma2 in (None, np.linspace(0.5, 2.0, D.shape[0])):
        got = obj.evaluate([D], data, sigma2=sigma2, grad=True)
        ref = plain.evaluate([D], data, sigma2=sigma2, grad=True)
        assert np.array_equal(got.ok, ref.ok) and got.ok.all()
        for name in ("llh", "beta", "sigma2", "C", "Q", "info", "observed"):
            assert close(getattr(got, name), getattr(ref, name)) <= RTOL, name
        for name in ("T_sum", "uu_sum"):
            assert close(getattr(got, name)[0], getattr(ref, name)[0]) <= RTOL, name
        # the gradient is a difference of its terms: relative to the largest of them
        s2 = ref.sigma2[:, None, None]
        terms = max(np.max(np.abs(ref.T_sum[0])), np.max(np.abs(ref.uu_sum[0] / s2)))
        assert close(got.grad[0], ref.grad[0], terms) <= RTOL
        for a, b in zip(got.cache["R"], ref.cache["R"]):  # what the Hessian reuses
            assert close(a, b) <= RTOL
        without = obj.evaluate([D], data, sigma2=sigma2)
        assert close(without.llh, ref.llh) <= RTOL


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_hessian_from_the_fused_evaluation_equals_entrywise(reml):
    """The analytic Hessian and dCov(β̂) built from the kernel's cached R and P equal the reference's."""
    st, obj, plain = objective_pair(reml, seed=3)
    D = points(np.random.default_rng(4), st.XtY.shape[0])[::4] + 0.05 * np.eye(2)  # full rank, away from 0
    data = obj.data(st.XtY[::4], st.ZtY[::4], st.YtY[::4])
    n, p = int(st.n_obs[0]), st.XtX.shape[-1]
    H, dC = variance_hessian(obj, data, [D], obj.evaluate([D], data, grad=True), [2], reml, n, p)
    H_ref, dC_ref = variance_hessian(plain, data, [D], plain.evaluate([D], data, grad=True), [2], reml, n, p)
    assert close(H, H_ref) <= RTOL
    assert close(dC, dC_ref) <= RTOL


"""The inference quantities at a singular fit (core/boundary.py): lme4's θ, and lmerTest's inverse."""
from __future__ import annotations

import numpy as np
import pytest

import blmm.core.boundary as B
from blmm.core.centre import centre_of, centred_response
from blmm.core.scoring import score
from blmm.core.structure import plan_fit
from blmm.core.sufficient import sufficient_stats
from tests.core.test_fit_properties import DESIGNS, make_design, random_spec


def _singular_point(rng, v=3):
    """A rank-1 2 x 2 D (singular), a random deviance gradient, Hessian and dCov in φ = (σ², vech D)."""
    a = rng.normal(size=(v, 2, 1))
    D = a @ np.swapaxes(a, 1, 2)
    G = rng.normal(size=(v, 2, 2))
    G = G + np.swapaxes(G, 1, 2)
    A = rng.normal(size=(v, 4, 4))
    H = A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(4)
    dC = rng.normal(size=(v, 4, 3, 3))
    dC = dC + np.swapaxes(dC, 2, 3)
    return H, dC, [G], [D]


def test_singular_voxels_invert_the_hessian_on_its_large_eigenvalues(monkeypatch):
    """With every eigenvalue kept, H and dCov are lme4's θ coordinates as they were; with the threshold
    between two eigenvalues, solving with the returned H is the Moore-Penrose inverse on the rest."""
    rng = np.random.default_rng(5)
    H, dC, G, D = _singular_point(rng)
    free = B.free_parameters(D, [2])
    assert not free[:, 1:].any()  # the factor is singular at every voxel
    monkeypatch.setattr(B, "LMERTEST_EIGEN_TOL", -np.inf)
    H_all, dC_all, _ = B.boundary_coordinates(H, dC, G, D, [2], free)
    w, U = np.linalg.eigh(H_all)
    tol = 0.5 * (w[:, 1] + w[:, 2])  # drops the two smallest at every voxel (per-voxel thresholds below)
    for v in range(H.shape[0]):
        monkeypatch.setattr(B, "LMERTEST_EIGEN_TOL", tol[v])
        H_p, dC_p, _ = B.boundary_coordinates(H[[v]], dC[[v]], [G[0][[v]]], [D[0][[v]]], [2], free[[v]])
        L = rng.normal(size=3)
        g_all = np.einsum("p,kpq,q->k", L, dC_all[v], L)
        g_p = np.einsum("p,kpq,q->k", L, dC_p[0], L)
        kept = w[v] > tol[v]
        pinv = (U[v][:, kept] / w[v][kept]) @ U[v][:, kept].T
        # float64: one eigen-decomposition of a 4 x 4 matrix of condition ~1e3
        np.testing.assert_allclose(g_p @ np.linalg.solve(H_p[0], g_p), g_all @ pinv @ g_all, rtol=1e-10)


# ---- the boundary snap: fit_block snaps each voxel's scored D once (docs/model.md, "Convergence") ----------

# complete-data designs of test_fit_properties with boundary optima (random_spec's seeds: true variances 0)
SNAP_DESIGNS = {"boundary-q1": DESIGNS["boundary-q1"], "boundary-q2": DESIGNS["boundary-q2"],
                "nested-q2-boundary": DESIGNS["nested-q2-boundary"], "crossed-q1": DESIGNS["crossed-q1"],
                **{f"random-{seed}": random_spec(seed) for seed in (11, 15, 27, 36)}}


def _objective(name: str, structure: str, reml: bool, v: int):
    """One design of SNAP_DESIGNS with v voxels: (objective, its data, q per factor)."""
    spec = dict(SNAP_DESIGNS[name], v=v)
    X, factors, Y = make_design(spec.pop("kind"), spec.pop("q"), spec.pop("seed"), **spec)
    stats = sufficient_stats(centred_response(Y, X, centre_of(Y, X)), X, factors)
    obj = plan_fit(stats.layout, structure).objective(stats.XtX[0], stats.ZtX[0], stats.ZtZ[0], stats.n_obs[0], reml)
    return obj, obj.data(stats.XtY, stats.ZtY, stats.YtY), list(stats.layout.q)


def _structures(name: str) -> tuple:
    return ("levels", "dense") if SNAP_DESIGNS[name]["second"] is None else ("schur", "dense")


def _random_D(rng, v: int, q: int, largest: float) -> np.ndarray:
    """v PSD q x q matrices: random eigenvectors, the largest eigenvalue `largest`, the others from 1e-9 of
    it up to it, a fifth of them exactly 0."""
    U = np.linalg.qr(rng.normal(size=(v, q, q)))[0]
    w = np.sort(largest * 10.0 ** rng.uniform(-9, 0, size=(v, q)) * (rng.random((v, q)) < 0.8), axis=1)
    w[:, -1] = largest
    return (U * w[:, None, :]) @ np.swapaxes(U, 1, 2)


def _snapped_twice(obj, data, D: list) -> tuple[list, list]:
    once = B.snap_to_boundary(obj, data, D)
    return once, B.snap_to_boundary(obj, data, once)


@pytest.mark.parametrize("name", ["boundary-q1", "boundary-q2", "nested-q2-boundary", "crossed-q1", "random-36"])
def test_a_second_snap_of_a_snapped_optimum_is_bit_for_bit_a_no_op(name):
    """On the scored optima of boundary designs (from D = 0 and from lme4's D = I), every structure, REML and
    ML: snapping the snapped D again returns it bit for bit, so snapping once (fit_block) reports what
    snapping twice did."""
    v = 24
    singular = 0
    for structure in _structures(name):
        for reml in (True, False):
            obj, data, qk = _objective(name, structure, reml, v)
            for start in (None, [np.broadcast_to(np.eye(q), (v, q, q)) for q in qk]):
                once, twice = _snapped_twice(obj, data, score(obj, data, qk, "pSFS", 1e-10, 1000, reml, obj.n,
                                                              obj.p, start).D)
                for O, T in zip(once, twice):
                    np.testing.assert_array_equal(T, O)
                singular += int(np.sum(~np.all(B.free_parameters(once, qk), axis=1)))
    assert singular > 0  # the design has boundary optima (q = 1 ones snapped there; q > 1 ones scored onto it)


@pytest.mark.parametrize("name", SNAP_DESIGNS)
def test_snapping_random_draws_twice(name):
    """Random PSD D with eigenvalues down to exact zeros.  Where each D_k's largest eigenvalue is above the
    snap's 1e-5, a second snap is bit for bit a no-op.  Where all of a D_k's are below it, the first snap
    zeroes every eigenvalue above rounding and keeps the rounding residue (eigenvalues at or below
    RANK_TOL x the largest: an exact 0 computed by eigh); the residue is then the largest, and a second snap
    zeroes it: not idempotent (q > 1), which is why fit_block snaps each voxel once."""
    rng = np.random.default_rng(7)
    v = 200
    residues = 0
    for structure in _structures(name):
        obj, data, qk = _objective(name, structure, True, v)
        for _ in range(3):
            D = [_random_D(rng, v, q, largest=10.0 ** rng.uniform(-4, 0.5)) for q in qk]
            for O, T in zip(*_snapped_twice(obj, data, D)):
                np.testing.assert_array_equal(T, O)
            tiny = [_random_D(rng, v, q, largest=1e-7) for q in qk]
            for Dk, O, T in zip(tiny, *_snapped_twice(obj, data, tiny)):
                # what moves is the residue: q eigenvalues of at most RANK_TOL x D_k's largest (1e-7) each
                assert np.max(np.abs(T - O)) <= Dk.shape[1] * B.RANK_TOL * 1e-7
                residues += int(np.sum(np.any(T != O, axis=(1, 2))))
    assert (residues > 0) == (SNAP_DESIGNS[name]["q"] > 1)  # a 1 x 1 D_k has no rounding residue

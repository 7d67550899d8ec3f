"""The inference quantities at a singular fit (core/boundary.py): lme4's θ, and lmerTest's inverse."""
from __future__ import annotations

import numpy as np

import blmm.core.boundary as B


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

"""Batched helpers on stacks of small symmetric matrices: PSD projection and roots, vech
order, and packing of symmetric matrices to their upper triangle."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def sym(A: np.ndarray) -> np.ndarray:
    return 0.5 * (A + np.swapaxes(A, -1, -2))


def project_psd(D: np.ndarray) -> np.ndarray:
    """Nearest positive semi-definite matrix (eigenvalues clipped at 0)."""
    q = D.shape[-1]
    if q == 1:
        return np.maximum(D, 0.0)
    w, U = np.linalg.eigh(sym(D))
    clipped = (U * np.maximum(w, 0.0)[..., None, :]) @ np.swapaxes(U, -1, -2)
    # per matrix, not per stack: a PSD matrix is returned as is whatever its neighbours are
    return np.where(np.all(w >= 0, axis=-1)[..., None, None], sym(D), clipped)


def lower_triangular_inverse(L: np.ndarray) -> np.ndarray:
    """L⁻¹ for a stack of lower-triangular (v, p, p) matrices, by forward substitution row by row
    across the whole stack (numpy's batched solve/inv costs ~20 µs per small matrix)."""
    p = L.shape[-1]
    Li = np.zeros_like(L)
    d = 1.0 / np.diagonal(L, axis1=-2, axis2=-1)
    for i in range(p):
        row = -(L[:, i, None, :i] @ Li[:, :i, :])[:, 0, :]
        row[:, i] += 1.0
        Li[:, i, :] = row * d[:, i, None]
    return Li


def psd_root(D: np.ndarray) -> np.ndarray:
    """Lambda with Lambda Lambda' = D for PSD D (works when D is singular)."""
    q = D.shape[-1]
    if q == 1:
        return np.sqrt(np.maximum(D, 0.0))
    w, U = np.linalg.eigh(sym(D))
    return U * np.sqrt(np.maximum(w, 0.0))[..., None, :]


@lru_cache(maxsize=None)
def vech_index(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of vech order: the lower triangle, column by column (cached, read-only)."""
    cols, rows = np.triu_indices(q)  # (col, row) pairs of the lower triangle in column order
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def vech(A: np.ndarray) -> np.ndarray:
    r, c = vech_index(A.shape[-1])
    return A[..., r, c]


def unvech(v: np.ndarray, q: int) -> np.ndarray:
    r, c = vech_index(q)
    out = np.zeros(v.shape[:-1] + (q, q))
    out[..., r, c] = v
    out[..., c, r] = v
    return out


@lru_cache(maxsize=None)
def upper_pairs(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (r <= s) of a p x p symmetric matrix, row-major (cached, read-only)."""
    r, s = np.triu_indices(p)
    r.setflags(write=False)
    s.setflags(write=False)
    return r, s


def pack_sym(A: np.ndarray, double_offdiag: bool = False) -> np.ndarray:
    """Upper-triangle entries of symmetric (..., p, p); off-diagonals doubled if asked."""
    p = A.shape[-1]
    r, s = upper_pairs(p)
    out = A[..., r, s]
    if double_offdiag:
        out = out * np.where(r == s, 1.0, 2.0)
    return out


def unpack_sym(a: np.ndarray, p: int) -> np.ndarray:
    r, s = upper_pairs(p)
    out = np.empty(a.shape[:-1] + (p, p))
    out[..., r, s] = a
    out[..., s, r] = a
    return out


def safe_solve(A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve stacked systems A x = b (b: (..., k)); singular or non-finite systems give NaN rows.

    Returns (x, ok).  One bad voxel must not raise for its whole block, so a failed
    batched solve falls back to voxel-by-voxel (rare, and only for that block).
    """
    k = A.shape[-1]
    flatA = A.reshape(-1, k, k)
    flatb = b.reshape(-1, k)
    ok = np.all(np.isfinite(flatA.reshape(flatA.shape[0], -1)), axis=1) & np.all(np.isfinite(flatb), axis=1)
    x = np.full(flatb.shape, np.nan)
    if np.any(ok):
        try:
            x[ok] = np.linalg.solve(flatA[ok], flatb[ok][..., None])[..., 0]
        except np.linalg.LinAlgError:
            for i in np.flatnonzero(ok):
                try:
                    x[i] = np.linalg.solve(flatA[i], flatb[i])
                except np.linalg.LinAlgError:
                    ok[i] = False
    ok &= np.all(np.isfinite(x), axis=1)
    x[~ok] = np.nan
    return x.reshape(b.shape), ok.reshape(b.shape[:-1])


def safe_cholesky(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of stacked matrices; non-PD or non-finite ones give NaN and ok False."""
    k = A.shape[-1]
    flat = A.reshape(-1, k, k)
    ok = np.all(np.isfinite(flat.reshape(flat.shape[0], -1)), axis=1)
    L = np.full_like(flat, np.nan)
    if np.any(ok):
        try:
            L[ok] = np.linalg.cholesky(flat[ok])
        except np.linalg.LinAlgError:
            for i in np.flatnonzero(ok):
                try:
                    L[i] = np.linalg.cholesky(flat[i])
                except np.linalg.LinAlgError:
                    ok[i] = False
    return L.reshape(A.shape), ok.reshape(A.shape[:-2])


@lru_cache(maxsize=None)
def duplication(q: int) -> np.ndarray:
    """Dup with vec(A) = Dup vech(A) for symmetric A, vec in row-major (a*q + b) order (cached, read-only)."""
    r, c = vech_index(q)
    Dup = np.zeros((q * q, r.size))
    Dup[r * q + c, np.arange(r.size)] = 1.0
    Dup[c * q + r, np.arange(r.size)] = 1.0
    Dup.setflags(write=False)
    return Dup

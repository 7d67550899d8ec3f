"""Small batched linear algebra on stacks of q x q matrices (q = random effects per level).

numpy's batched routines call LAPACK once per tiny matrix; for the q <= 2 cases that
dominate neuroimaging designs closed forms are an order of magnitude faster.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def inv_small(A: np.ndarray) -> np.ndarray:
    """Inverse of a stack (..., q, q) of small matrices."""
    q = A.shape[-1]
    if q == 1:
        return 1.0 / A
    if q == 2:
        a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
        det = a * d - b * c
        out = np.empty_like(A)
        out[..., 0, 0] = d / det
        out[..., 0, 1] = -b / det
        out[..., 1, 0] = -c / det
        out[..., 1, 1] = a / det
        return out
    return np.linalg.inv(A)


def logdet_small(A: np.ndarray) -> np.ndarray:
    """log|A| for a stack (..., q, q) with positive determinants."""
    q = A.shape[-1]
    if q == 1:
        return np.log(A[..., 0, 0])
    if q == 2:
        return np.log(A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0])
    sign, logdet = np.linalg.slogdet(A)
    return np.where(sign > 0, logdet, np.nan)


def sym(A: np.ndarray) -> np.ndarray:
    return 0.5 * (A + np.swapaxes(A, -1, -2))


def project_psd(D: np.ndarray) -> np.ndarray:
    """Nearest positive semi-definite matrix (eigenvalues clipped at 0)."""
    q = D.shape[-1]
    if q == 1:
        return np.maximum(D, 0.0)
    w, U = np.linalg.eigh(sym(D))
    if np.all(w >= 0):
        return sym(D)
    return (U * np.maximum(w, 0.0)[..., None, :]) @ np.swapaxes(U, -1, -2)


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


def vech_basis(q: int) -> np.ndarray:
    """E_i for each vech entry i: (q_u, q, q) symmetric unit matrices."""
    r, c = vech_index(q)
    E = np.zeros((r.size, q, q))
    E[np.arange(r.size), r, c] = 1.0
    E[np.arange(r.size), c, r] = 1.0
    return E


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


def solve_spd(A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve A x = b for a stack of SPD A by Cholesky; returns (x, ok) with NaN where A is not PD."""
    x = np.full(b.shape, np.nan)
    ok = np.zeros(A.shape[:-2], dtype=bool)
    try:
        L = np.linalg.cholesky(A)
        ok[...] = True
    except np.linalg.LinAlgError:
        L = np.full_like(A, np.nan)
        for i in np.ndindex(A.shape[:-2]):  # rare path: isolate the failing matrices
            try:
                L[i] = np.linalg.cholesky(A[i])
                ok[i] = True
            except np.linalg.LinAlgError:
                pass
    y = np.linalg.solve(L[ok], b[ok][..., None] if b.ndim == A.ndim - 1 else b[ok])
    z = np.linalg.solve(np.swapaxes(L[ok], -1, -2), y)
    x[ok] = z[..., 0] if b.ndim == A.ndim - 1 else z
    return x, ok

"""The objective's declared interface, its evaluation record, and GLS profiling.

For a given relative covariance D (per voxel), β̂ and σ̂² are profiled out in closed
form and the log-likelihood, its gradient in D and a Fisher information for D are
returned for all voxels at once.  Every structure (levels.py, dense.py, schur.py,
nested.py, and the missing-row ones missing.py, nested_missing.py) implements `Objective`;
the scoring loop knows nothing else about them.

Notation (docs/model.md): V = I + Z D Z', M = D(I + Z'Z D)^-1, R_j = (I + G_j D)^-1,
X_j = Z_j'X, y_j = Z_j'Y, S_j = Z_j'V^-1 X = R_j X_j, u_j = Z_j'V^-1 r, T_j = R_j G_j,
C = (X'V^-1 X)^-1.  The deviance is -2ℓ; its derivative in D_k is tr(G_k dD_k) with
G_k = Σ T_j - [REML] Σ S_j C S_j' - Σ u_j u_j' / σ².
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from blmm.core import linalg as la

LOG2PI = float(np.log(2.0 * np.pi))
LOOP_INVERSE_MIN_VOXELS = 1024  # from here on C's forward substitution beats LAPACK's per-matrix cost


@dataclass
class Evaluation:
    """Objective and derived quantities for a set of voxels at one D."""

    llh: np.ndarray  # (v,) log-likelihood (profiled in σ² unless σ² was given)
    beta: np.ndarray  # (v, p)
    sigma2: np.ndarray  # (v,)
    C: np.ndarray  # (v, p, p) (X'V^-1X)^-1
    Q: np.ndarray  # (v,) r'V^-1 r at the GLS β
    ok: np.ndarray  # (v,) bool, X'V^-1X positive definite and finite llh
    grad: list = field(default_factory=list)  # per factor (v, q_k, q_k) deviance gradient G_k
    info: np.ndarray | None = None  # (v, s, s) expected information, s = Σ q_k², vec order
    T_sum: list = field(default_factory=list)  # per factor Σ_j T_j (v, q_k, q_k)
    uu_sum: list = field(default_factory=list)  # per factor Σ_j u_j u_j' (v, q_k, q_k)
    observed: np.ndarray | None = None  # (v, s, s) observed information in vec D (σ² fixed), where cheap
    cache: dict | None = None  # objective-specific lists of per-voxel arrays (leading axis v) the Hessian reuses


class Objective(Protocol):
    """What every structure provides to the scoring loop (one pattern of observed rows, or the
    complete design with each voxel's missing rows as units: `missing_rows`).

    `tests/core/test_objective_protocol.py` checks every objective of core/structure.py's
    registry against this, signatures included.
    """

    n: int
    p: int
    reml: bool
    missing_rows: bool  # data() takes each voxel's missing-row units (n and X'X then differ per voxel);
    # such an objective's `base` is the complete design's objective, which fits the voxels that miss no row
    has_deviance_hessian: bool  # deviance_hessian() exists: the analytic Hessian (else core/hessian.py differences)

    def data(self, XtY: np.ndarray, ZtY: Any, YtY: np.ndarray, units: dict | None = None) -> Any:
        """Per-voxel data sums arranged for this objective; the result has `.take(idx)` and `.XtY`.
        units: the voxels' missing-row units, only where `missing_rows` (refused elsewhere)."""

    def evaluate(self, D_list: list, data: Any, sigma2: np.ndarray | None = None,
                 grad: bool = False) -> Evaluation:
        """Profiled log-likelihood at D (per factor (v, q_k, q_k)), with gradient and information if asked."""

    def per_voxel_bytes(self) -> int:
        """Working bytes per voxel of one evaluation with its gradient (block sizing)."""

    def held_bytes(self) -> int:
        """Bytes of the arrays the objective holds while its voxels are fitted (round sizing)."""


def array_bytes(*arrays) -> int:
    """Bytes of the arrays given (each an array, or a list, tuple or dict of them, nested)."""
    total = 0
    for a in arrays:
        if isinstance(a, np.ndarray):
            total += a.nbytes
        elif isinstance(a, dict):
            total += array_bytes(*a.values())
        elif isinstance(a, (list, tuple)):
            total += array_bytes(*a)
    return int(total)


def no_units(objective: Objective, units: dict | None) -> None:
    """Refuses missing-row units for an objective of one presence pattern."""
    if units is not None:
        raise ValueError(f"{type(objective).__name__} fits one presence pattern: it takes no missing-row units")


def _gls(XtVX, XtVY):
    """β̂, C = (X'V^-1X)^-1, log|X'V^-1X| and a PD flag, by one Cholesky per voxel."""
    xp = la.namespace(XtVX, XtVY)
    L, ok = la.safe_cholesky(XtVX)  # the voxels that are not PD or not finite: NaN and ok False
    Linv = xp.full_like(XtVX, xp.nan)
    if int(xp.count_nonzero(ok)) >= LOOP_INVERSE_MIN_VOXELS:
        Linv[ok] = la.lower_triangular_inverse(L[ok])
    else:  # a row loop over few voxels is GIL-bound: stalls the other threads' fits more than it saves
        eye = xp.eye(L.shape[-1], dtype=L.dtype, device=la.device_of(L))
        Linv[ok] = xp.linalg.solve(L[ok], xp.broadcast_to(eye, L[ok].shape))
    C = xp.matrix_transpose(Linv) @ Linv
    beta = la.einsum(xp, "vij,vj->vi", C, XtVY)
    logdet = 2.0 * xp.sum(xp.log(xp.abs(xp.linalg.diagonal(L))), axis=1)
    return beta, C, logdet, ok


def _likelihood(Q, logdetV, logdetXVX, n, p, reml, sigma2=None):
    """Profiled (or at given σ²) log-likelihood with lme4's constants."""
    xp = la.namespace(Q)
    N = n - p if reml else n
    if sigma2 is None:
        sigma2 = Q / N
        llh = -0.5 * (N * (LOG2PI + xp.log(sigma2)) + logdetV + N)
    else:
        llh = -0.5 * (N * (LOG2PI + xp.log(sigma2)) + logdetV + Q / sigma2)
    if reml:
        llh = llh - 0.5 * logdetXVX
    return llh, sigma2


def profiled(XtVX, XtVY, YtVY, logdetV, n, p, reml, sigma2) -> Evaluation:
    """β̂ (GLS), C, Q and the (RE)ML log-likelihood from the V⁻¹ products."""
    xp = la.namespace(XtVX, XtVY, YtVY)
    v = XtVX.shape[0]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # bad voxels are flagged by ok
        beta, C, logdetXVX, ok = _gls(XtVX, XtVY)
        Q = YtVY - la.einsum(xp, "vp,vp->v", beta, XtVY)
        llh, s2 = _likelihood(Q, logdetV, logdetXVX, n, p, reml, sigma2)
    ok &= xp.isfinite(llh) & (Q > 0)
    return Evaluation(llh=llh, beta=beta, sigma2=xp.asarray(xp.broadcast_to(s2, (v,)), copy=True), C=C, Q=Q, ok=ok)


def take_rows(data, idx, full_size):
    return data if idx.size == full_size else data.take(idx)


def subset_eval(ev: Evaluation, idx) -> Evaluation:
    rows = la.select_rows
    return Evaluation(
        llh=rows(ev.llh, idx), beta=rows(ev.beta, idx), sigma2=rows(ev.sigma2, idx), C=rows(ev.C, idx),
        Q=rows(ev.Q, idx), ok=rows(ev.ok, idx),
        grad=[rows(g, idx) for g in ev.grad], info=None if ev.info is None else rows(ev.info, idx),
        T_sum=[rows(t, idx) for t in ev.T_sum], uu_sum=[rows(u, idx) for u in ev.uu_sum],
        observed=None if ev.observed is None else rows(ev.observed, idx),
        cache=None if ev.cache is None else {k: [rows(a, idx) for a in arrays] for k, arrays in ev.cache.items()},
    )


def merge_eval(base: Evaluation, new: Evaluation, where, good) -> Evaluation:
    """Copy of base with the rows `where` (sorted host indices) replaced by new's rows `good` (a host mask)."""
    if np.all(good) and np.array_equal(where, np.arange(base.llh.shape[0])):
        return new  # every row replaced: no copies
    out = subset_eval(base, slice(None))
    for name in ("llh", "beta", "sigma2", "C", "Q", "ok"):
        arr = la.copied(getattr(out, name))
        la.put_rows(arr, where, la.select_rows(getattr(new, name), good))
        setattr(out, name, arr)
    for name in ("grad", "T_sum", "uu_sum"):
        lst = []
        for a, b in zip(getattr(out, name), getattr(new, name)):
            a = la.copied(a)
            la.put_rows(a, where, la.select_rows(b, good))
            lst.append(a)
        setattr(out, name, lst)
    info = la.copied(out.info)
    la.put_rows(info, where, la.select_rows(new.info, good))
    out.info = info
    if out.observed is not None and new.observed is not None:
        observed = la.copied(out.observed)
        la.put_rows(observed, where, la.select_rows(new.observed, good))
        out.observed = observed
    else:
        out.observed = None
    if out.cache is not None and new.cache is not None and out.cache.keys() == new.cache.keys():
        cache = {}
        for key, arrays in out.cache.items():
            merged = []
            for arr, new_arr in zip(arrays, new.cache[key]):
                arr = la.copied(arr)
                la.put_rows(arr, where, la.select_rows(new_arr, good))
                merged.append(arr)
            cache[key] = merged
        out.cache = cache
    else:
        out.cache = None
    return out


def level_block_sum(A: np.ndarray, offset: int, n_levels: int, q: int) -> np.ndarray:
    """Σ over a factor's levels of the diagonal q x q blocks of (v, Q, Q) matrices."""
    xp = la.namespace(A)
    v = A.shape[0]
    blk = xp.reshape(A[:, offset:offset + n_levels * q, offset:offset + n_levels * q], (v, n_levels, q, n_levels, q))
    return la.einsum(xp, "vjajb->vab", blk)


def factor_pair_information(T: np.ndarray, offsets, n_levels, qs) -> np.ndarray:
    """Expected information blocks between factors from T = Z'V⁻¹Z (v, Q, Q), vec order.

    F[(k,a,b),(k',c,d)] = Σ_{i in k, j in k'} T[(i,b),(j,c)] T[(i,a),(j,d)].
    """
    xp = la.namespace(T)
    v = T.shape[0]
    sizes = [q * q for q in qs]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    info = xp.zeros((v, int(starts[-1]), int(starts[-1])), dtype=T.dtype, device=la.device_of(T))
    for k, (o1, l1, q1) in enumerate(zip(offsets, n_levels, qs)):
        for k2, (o2, l2, q2) in enumerate(zip(offsets, n_levels, qs)):
            T4 = xp.reshape(T[:, o1:o1 + l1 * q1, o2:o2 + l2 * q2], (v, l1, q1, l2, q2))
            blk = xp.reshape(la.einsum(xp, "vibjc,viajd->vabcd", T4, T4), (v, q1 * q1, q2 * q2))
            info[:, starts[k]:starts[k + 1], starts[k2]:starts[k2 + 1]] = blk
    return info


def diag_blocks(ZtZ: sp.csr_matrix, L: int, q: int) -> np.ndarray:
    """The L diagonal q x q blocks of a block-diagonal sparse matrix."""
    coo = ZtZ.tocoo()
    keep = (coo.row // q) == (coo.col // q)
    G = np.zeros((L, q, q))
    np.add.at(G, (coo.row[keep] // q, coo.row[keep] % q, coo.col[keep] % q), coo.data[keep])
    return G

"""From the scored D to the reported optimum: boundary snap, Newton polish, and lme4's θ on the boundary."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core import linalg as la
from blmm.core.hessian import variance_hessian, vech_grad
from blmm.core.objective.base import Evaluation, merge_eval, subset_eval, take_rows

RANK_TOL = 1e-12  # eigenvalues of D_k at or below this (times the largest) count as zero

# lmerTest's as_lmerModLT: Hessian eigenvalues at or below this are dropped from its inverse (its σ is an
# SD where φ has σ², but that direction's eigenvalue, ~4n/σ², is never near the threshold)
LMERTEST_EIGEN_TOL = 1e-8

# llh a snap or a polish may give up: float64's noise in a difference of two n ≈ 1e4-row llh
# evaluations (an absolute difference, so units and llh's additive constant cannot change it)
LLH_NOISE = 1e-10


def free_parameters(D, qk) -> np.ndarray:
    """(v, k) bool: φ = (σ², vech D_1, …) entries whose factor is not singular."""
    v = D[0].shape[0]
    cols = [np.ones((v, 1), bool)]
    for Dk, q in zip(D, qk):
        w = np.linalg.eigvalsh(la.sym(Dk))
        on_boundary = w[:, 0] <= RANK_TOL * np.maximum(w[:, -1], 1e-300)
        cols.append(np.repeat(~on_boundary[:, None], q * (q + 1) // 2, axis=1))
    return np.concatenate(cols, axis=1)


@dataclass
class SettledPoint:
    """The reported optimum of a block, with the Hessian computed on the way (before the polish)."""

    D: list
    ev: Evaluation
    H: np.ndarray  # (v, k, k) at the point before the polish
    dC: np.ndarray
    moved: np.ndarray  # (v,) bool: the polish moved D, so H and dC are stale there


def settle(obj, data, D, qk, reml, n, p) -> SettledPoint:
    """Move the snapped scored D (`snap_to_boundary`: exact zeros on the boundary) to the reported
    optimum: one Newton polish."""
    ev = obj.evaluate(D, data, grad=True)
    H, dC = variance_hessian(obj, data, D, ev, qk, reml, n, p)
    D_new, ev, moved = newton_polish(obj, data, D, ev, H, free_parameters(D, qk), qk)
    return SettledPoint(D_new, ev, H, dC, moved)


def snap_to_boundary(obj, data, D):
    """Set negligible eigenvalues of each D_k to exactly 0 where that costs no likelihood.

    Cholesky iterations only approach a singular optimum asymptotically; lme4 lands on it
    exactly, and inference needs to know which voxels are singular.
    """
    v = D[0].shape[0]
    out = [Dk.copy() for Dk in D]
    parts = []
    for Dk in D:
        w, U = np.linalg.eigh(la.sym(Dk))
        small = (w < 1e-5) | (w < 1e-6 * w[:, -1:])  # variance below 1e-5 σ² or 1e-6 of the largest
        small &= w > RANK_TOL * np.maximum(w[:, -1:], 1e-300)
        parts.append((w, U, small))
    touched = np.flatnonzero(np.any([np.any(sm, axis=1) for _, _, sm in parts], axis=0))
    if touched.size == 0:  # nothing to snap: no evaluation at all (the common interior case)
        return out
    base = np.full(v, np.nan)
    base[touched] = obj.evaluate([Dk[touched] for Dk in D], take_rows(data, touched, v), grad=False).llh
    for f, (w, U, small) in enumerate(parts):
        rows = np.flatnonzero(np.any(small, axis=1))
        if rows.size == 0:
            continue
        ws = np.where(small[rows], 0.0, np.maximum(w[rows], 0.0))
        trial = [Dj[rows].copy() for Dj in out]
        trial[f] = (U[rows] * ws[:, None, :]) @ np.swapaxes(U[rows], 1, 2)
        ev_t = obj.evaluate(trial, take_rows(data, rows, v), grad=False)
        good = ev_t.ok & (ev_t.llh >= base[rows] - LLH_NOISE)
        out[f][rows[good]] = trial[f][good]
    return out


def lower_cholesky(D: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of PSD (v, q, q) matrices, zero columns where a pivot vanishes."""
    xp = la.namespace(D)
    v, q, _ = D.shape
    L = xp.zeros_like(D)
    scale = xp.maximum(xp.max(xp.abs(xp.linalg.diagonal(D)), axis=1), 1e-300)
    for j in range(q):  # q is tiny; vectorised over voxels
        piv = D[:, j, j] - xp.sum(L[:, j, :j] ** 2, axis=1)
        pos = piv > RANK_TOL * scale
        L[:, j, j] = xp.where(pos, xp.sqrt(xp.where(pos, piv, 1.0)), 0.0)
        for i in range(j + 1, q):
            val = D[:, i, j] - xp.sum(L[:, i, :j] * L[:, j, :j], axis=1)
            L[:, i, j] = xp.where(pos, val / xp.where(pos, L[:, j, j], 1.0), 0.0)
    return L


def _theta_coordinates(D: np.ndarray, G: np.ndarray):
    """lme4's θ (D = ΛΛ', Λ lower) as coordinates of a singular factor.

    Returns J = d vech(D)/dθ (v, q_u, q_u), the curvature term of the deviance Hessian
    Σ_m (∂dev/∂D_m) ∂²D_m/∂θ∂θ' (v, q_u, q_u), and which θ are live (their column of Λ is
    non-zero; the others have zero first derivatives and drop out, as in lmerTest).
    """
    v, q, _ = D.shape
    L = lower_cholesky(D)
    r_idx, c_idx = la.vech_index(q)  # θ uses the same lower-triangle order
    qu = r_idx.size
    J = np.zeros((v, qu, qu))
    curv = np.zeros((v, qu, qu))
    for t, (i, j) in enumerate(zip(r_idx, c_idx)):
        dD = np.zeros((v, q, q))
        dD[:, i, :] += L[:, :, j]
        dD[:, :, i] += L[:, :, j]
        J[:, :, t] = dD[:, r_idx, c_idx]
        for t2, (k, l) in enumerate(zip(r_idx, c_idx)):
            if j == l:  # ∂²D/∂θ_ij∂θ_kl = e_i e_k' + e_k e_i' when j == l
                curv[:, t, t2] = 2.0 * G[:, i, k]
    colnorm = np.sqrt(np.sum(L**2, axis=1))  # (v, q)
    live = colnorm[:, c_idx] > 0
    return J, curv, live


def _phi_transform(G_list, D, qk, free):
    """φ (σ², then vech D_k, or lme4's θ_k where D_k is singular) against (σ², vech D_1, …).

    Returns T = d(σ², vech D)/dφ (v, k, k), the curvature term of the deviance Hessian in φ,
    which φ entries are live (dead θ: a zero Cholesky column, dropped as in lmerTest), the
    voxels with any singular factor, and per factor the Cholesky factors Λ_k of the singular ones.
    """
    v = D[0].shape[0]
    k = free.shape[1]
    T = np.broadcast_to(np.eye(k), (v, k, k)).copy()
    curv = np.zeros((v, k, k))
    live = np.ones((v, k), bool)
    col = 1
    singular_any = np.zeros(v, bool)
    for f, q in enumerate(qk):
        qu = q * (q + 1) // 2
        singular = ~free[:, col]  # _package's rank test of D_k
        if np.any(singular):
            J, cf, lv = _theta_coordinates(D[f][singular], G_list[f][singular])
            sl = slice(col, col + qu)
            rows = np.flatnonzero(singular)
            T[rows[:, None], np.arange(col, col + qu)[None, :]] = 0.0
            T[rows, sl, sl] = J
            curv[rows, sl, sl] = cf
            live[rows, sl] = lv
            singular_any |= singular
        col += qu
    return T, curv, live, singular_any


def boundary_coordinates(H, dC, G_list, D, qk, free):
    """Re-express H and dCov in lme4's θ for singular factors (interior ones keep vech D).

    At an interior optimum the Satterthwaite df does not depend on the parametrisation;
    on the boundary it does, and lmerTest's is θ.  There H is also inverted as lmerTest does, on its
    eigenvalues above LMERTEST_EIGEN_TOL (a direction below it, e.g. two θ that move D alike, carries
    no variance).
    """
    k = H.shape[1]
    T, curv, live, singular_any = _phi_transform(G_list, D, qk, free)
    if not np.any(singular_any):
        return H, dC, live
    Ht = np.swapaxes(T, 1, 2) @ H @ T + curv
    dCt = np.einsum("vij,vipq->vjpq", T, dC)
    dead = ~live
    Ht = np.where(dead[:, :, None] | dead[:, None, :], 0.0, Ht) + dead[:, :, None] * np.eye(k)
    dCt[dead] = 0.0
    # lmerTest inverts its Hessian on the eigenvalues above 1e-8 only (Moore-Penrose): with dCov projected
    # onto those eigenvectors and 1 in place of the others, every solve with H acts as that pseudo-inverse
    rows = np.flatnonzero(singular_any)
    w, U = np.linalg.eigh(la.sym(Ht[rows]))
    kept = w > LMERTEST_EIGEN_TOL
    Ht[rows] = (U * np.where(kept, w, 1.0)[:, None, :]) @ np.swapaxes(U, 1, 2)
    onto_kept = (U * kept[:, None, :]) @ np.swapaxes(U, 1, 2)
    dCt[rows] = np.einsum("vij,vjpq->vipq", onto_kept, dCt[rows])
    return Ht, dCt, live


def newton_polish(obj, data, D, ev, H, free, qk):
    """One Newton step on the profiled deviance with the observed Hessian already at hand.

    Scoring converges linearly; this squares the remaining error of the parameters so that
    they, not just the log-likelihood, match an exact optimiser.  Interior factors step in
    vech D; singular ones within their face, in lme4's θ (D_k = Λ_kΛ_k', dead θ held at 0),
    so a boundary optimum is polished too and D stays PSD.  The step is kept only where it
    does not lower the log-likelihood.  Returns (D, its evaluation with gradient, moved mask).
    """
    v = D[0].shape[0]
    moved = np.zeros(v, bool)
    use = ev.ok & np.all(np.isfinite(H.reshape(v, -1)), axis=1)
    if not np.any(use):
        return D, ev, moved
    rows = np.flatnonzero(use)
    sub_ev = subset_eval(ev, rows)
    Dr = [Dk[rows] for Dk in D]
    T, curv, live, _ = _phi_transform(sub_ev.grad, Dr, qk, free[rows])
    Ht = np.swapaxes(T, 1, 2) @ H[rows] @ T + curv
    g_full = np.concatenate([np.zeros((rows.size, 1)), vech_grad(sub_ev, qk)], axis=1)  # σ̂² is profiled
    g = np.einsum("vij,vi->vj", T, g_full)[:, 1:]
    Hp = Ht[:, 1:, 1:] - Ht[:, 1:, :1] * Ht[:, :1, 1:] / Ht[:, :1, :1]  # σ² profiled out
    lv = live[:, 1:]
    Hp = np.where(lv[:, :, None] & lv[:, None, :], Hp, 0.0) + np.where(lv, 0.0, 1.0)[:, :, None] * np.eye(Hp.shape[-1])
    x, solved = la.safe_solve(Hp, np.where(lv, g, 0.0))
    step = np.where(lv, -np.nan_to_num(x), 0.0)
    trial, start, col = [], 0, 1
    for f, q in enumerate(qk):
        r, c = la.vech_index(q)
        part = step[:, start:start + r.size]
        singular = ~free[rows, col]
        dv = np.zeros((rows.size, q, q))
        dv[:, r, c] = part
        dv[:, c, r] = part
        Dt = Dr[f] + dv
        if np.any(singular):  # within the face: Λ + dΛ in θ, lower triangular
            L = lower_cholesky(Dr[f][singular])
            dL = np.zeros_like(L)
            dL[:, r, c] = part[singular]
            Lt = L + dL
            Dt[singular] = Lt @ np.swapaxes(Lt, 1, 2)
        trial.append(Dt)
        start += r.size
        col += r.size
    psd = solved.copy()
    for Dt in trial:
        psd &= np.min(np.linalg.eigvalsh(la.sym(Dt)), axis=1) >= -1e-14 * np.maximum(
            np.max(np.abs(Dt), axis=(1, 2)), 1e-300)
    trial = [la.project_psd(Dt) for Dt in trial]
    with np.errstate(invalid="ignore", divide="ignore"):  # non-PSD trials are rejected below
        ev_t = obj.evaluate(trial, take_rows(data, rows, v), grad=True)
    # at an optimum the Newton point can differ from the current one by rounding alone
    good = ev_t.ok & psd & (ev_t.llh >= ev.llh[rows] - LLH_NOISE)
    if not np.any(good):
        return D, ev, moved
    D = [Dk.copy() for Dk in D]
    for f in range(len(qk)):
        D[f][rows[good]] = trial[f][good]
    moved[rows[good]] = True
    return D, merge_eval(ev, ev_t, rows[good], good), moved

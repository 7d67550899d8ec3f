"""Fisher scoring for every voxel of a block at once: FS, pFS, SFS and pSFS.

All four methods maximise the same (RE)ML log-likelihood over D (β and σ² are profiled
out, except that FS/pFS carry σ² as a scored parameter) and take monotone steps; they
differ only in the scoring direction.  A voxel stops by the rule in docs/model.md
("Convergence"): converged, iteration limit, or a failed step search.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core import linalg as la
from blmm.core.boundary import lower_cholesky
from blmm.core.objective.base import Evaluation, merge_eval, subset_eval, take_rows
from blmm.core.status import CONVERGED, ITERATION_LIMIT, NOT_FINITE, STEP_FAILED

METHODS = ("pSFS", "SFS", "pFS", "FS")


def check_method(method: str) -> str:
    for m in METHODS:
        if method.lower() == m.lower():
            return m
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


# an escape from the boundary is kept when it realises this fraction of the gain its quadratic
# model predicts (Armijo's sufficient increase): a difference of llh values, free of units
ESCAPE_SUFFICIENT_GAIN = 1e-4


@dataclass
class ScoringResult:
    """Where the scoring iterations of one voxel block stopped."""

    D: list  # per factor (v, q_k, q_k)
    converged: np.ndarray  # (v,) bool
    n_iter: np.ndarray  # (v,) int
    stop: np.ndarray  # (v,) int, STOP_NAMES
    ok: np.ndarray  # (v,) bool, finite throughout


def score(obj, data, qk, method, tol, max_iter, reml, n, p, start: list | None = None) -> ScoringResult:
    """Scoring iterations for one voxel block, with monotone steps and an honest stopping rule.

    ``start``: per factor (v, q_k, q_k) PSD D to start from (e.g. a nearby model's optimum); default D = 0.
    """
    xp = la.namespace(data.XtY)
    v = data.XtY.shape[0]
    if start is None:
        D = [xp.zeros((v, q, q), dtype=data.XtY.dtype, device=la.device_of(data.XtY)) for q in qk]
    else:
        D = [la.copied(xp.asarray(Sk, dtype=data.XtY.dtype, device=la.device_of(data.XtY))) for Sk in start]
    ev = _uncached(obj.evaluate(D, data, grad=True))
    # the bookkeeping (which voxels step, llh, labels) is on the host; D, σ² and evaluations in xp
    ok = np.array(la.to_host(ev.ok), copy=True)
    llh = np.array(la.to_host(ev.llh), copy=True)
    sigma2 = la.copied(ev.sigma2)
    converged = np.zeros(v, bool)
    n_iter = np.zeros(v, np.int64)
    stop = np.where(ok, ITERATION_LIMIT, NOT_FINITE).astype(np.int64)
    prev_change = np.full(v, np.inf)
    # llh a boundary escape was predicted to gain at the current point but did not realise (KKT)
    escape_left = np.zeros(v)
    active = np.flatnonzero(ok)
    ev_act = subset_eval(ev, active)
    n = getattr(data, "n", n)  # (v,) when the objective's voxels differ in their rows
    N = n - p if reml else n
    for it in range(1, max_iter + 1):
        if active.size == 0:
            break
        D_act = [la.select_rows(Dk, active) for Dk in D]
        # the first step from D = 0 is taken in D itself (Λ = 0 has no Cholesky step); every other step,
        # a given start's first included, in Cholesky coordinates (the ridged Λ handles a singular start)
        N_act = la.select_rows(N, active) if np.ndim(N) else N  # per-voxel n where the data carry it (missing rows)
        make_trial, gain = _direction(method, ev_act, D_act, la.select_rows(sigma2, active), N_act, qk,
                                      cholesky=it > 1 or start is not None)
        gain = la.to_host(gain)
        if it > 1:
            # converged: the last step moved llh by < tol and what one more step (or a boundary
            # escape) is predicted to gain is < tol
            settled = (prev_change[active] < tol) & (gain + escape_left[active] < tol)
            converged[active[settled]] = True
            stop[active[settled]] = CONVERGED
        else:
            settled = np.zeros(active.size, bool)
        stepping = np.flatnonzero(~settled)  # rows of the active set that take a step now
        old = llh[active]
        new_llh = old.copy()
        new_D = [la.copied(Dk) for Dk in D_act]
        new_s2 = la.copied(la.select_rows(sigma2, active))
        new_ev = ev_act
        pending = stepping.copy()
        flat_stop = np.zeros(0, np.int64)  # voxels that stopped trying: flat within tol
        adata = take_rows(data, active, v)
        for attempt in range(40):  # shorter (or damped) steps until the log-likelihood does not decrease
            if pending.size == 0:
                break
            trial, s2_trial = make_trial(pending, attempt)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # bad trials are rejected
                ev_t = _uncached(obj.evaluate(trial, take_rows(adata, pending, active.size), sigma2=s2_trial,
                                                   grad=True))
            moved = np.zeros(pending.size, bool)
            for Dt, Dk in zip(trial, D_act):
                moved |= la.to_host(xp.any(xp.abs(Dt - la.select_rows(Dk, pending)) > 0, axis=(1, 2)))
            # a step that lands back on the same point (e.g. projected to D = 0) is no step
            llh_t, ok_t = la.to_host(ev_t.llh), la.to_host(ev_t.ok)
            good = ok_t & ((llh_t > old[pending]) | ((llh_t == old[pending]) & moved))
            new_ev = _accept(pending, good, ev_t, trial, new_llh, new_D, new_s2, new_ev)
            # a failed step that the model predicts to gain < tol and that moved llh by < tol is flat within tol:
            # no shorter or damped step can gain tol, so the voxel stops trying (it is stuck, below)
            flat = ~good & ok_t & (gain[pending] < tol) & (llh_t >= old[pending] - tol)
            flat_stop = np.concatenate([flat_stop, pending[flat]])
            pending = pending[~good & ~flat]
        pending = np.sort(np.concatenate([pending, flat_stop]))
        if it > 1:
            # a voxel whose optimum is a singular D_k creeps towards it (the deviance is flat, quartic,
            # across that face) and would stop short: before giving up or converging, try the face itself
            # (every 8th iteration too: a creep's steps can each gain more than tol for a long time)
            near = stepping if it % 8 == 0 else np.intersect1d(
                np.union1d(pending, np.flatnonzero(np.abs(new_llh - old) < tol)), stepping)
            rows, cand = _face_step([la.select_rows(Dk, near) for Dk in new_D])
            if rows.size:
                sub = near[rows]
                with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                    ev_t = _uncached(obj.evaluate(cand, take_rows(adata, sub, active.size),
                                                  sigma2=la.select_rows(new_s2, sub) if method in ("FS", "pFS") else None,
                                                  grad=True))
                good = la.to_host(ev_t.ok) & (la.to_host(ev_t.llh) > new_llh[sub])
                new_ev = _accept(sub, good, ev_t, cand, new_llh, new_D, new_s2, new_ev)
                pending = np.setdiff1d(pending, sub[good])
        # before giving up or converging, check the KKT condition on singular D_k: leave the
        # boundary along a direction that improves, if there is one
        change = np.abs(new_llh - old)
        check = np.intersect1d(np.union1d(pending, np.flatnonzero(change < tol)), stepping)
        left = np.zeros(active.size)
        if check.size:
            base = [la.select_rows(Dk, check) for Dk in new_D]
            ev_c = subset_eval(new_ev, check)
            rows, cand, predicted = _escape_step(ev_c, base, qk)
            left[check[rows]] = predicted
            frac = np.ones(rows.size)  # the fraction of the model's move t uu' tried
            for _ in range(30):
                if rows.size == 0:
                    break
                sub = check[rows]
                with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                    ev_t = _uncached(obj.evaluate(cand, take_rows(adata, sub, active.size),
                                                  sigma2=la.select_rows(new_s2, sub) if method in ("FS", "pFS") else None,
                                                  grad=True))
                # the quadratic model's gain of the move s t uu' is g²/(2c) (s - s²/2) = predicted (2s - s²)
                want = ESCAPE_SUFFICIENT_GAIN * predicted * (2.0 * frac - frac**2)
                good = la.to_host(ev_t.ok) & (la.to_host(ev_t.llh) - new_llh[sub] > want)
                new_ev = _accept(sub, good, ev_t, cand, new_llh, new_D, new_s2, new_ev)
                pending = np.setdiff1d(pending, sub[good])
                left[sub[good]] = 0.0  # escaped: the new point is checked after its next step
                rows, predicted, frac = rows[~good], predicted[~good], 0.5 * frac[~good]
                start_pts = [la.select_rows(b, rows) for b in base]
                cand = [b + 0.5 * (la.select_rows(c, ~good) - b) for b, c in zip(start_pts, cand)]  # halve the move
        for f in range(len(qk)):
            la.put_rows(D[f], active, new_D[f])
        la.put_rows(sigma2, active, new_s2)
        change = np.abs(new_llh - old)
        llh[active] = new_llh
        n_iter[active[stepping]] = it
        prev_change[active] = change
        escape_left[active] = left
        # a voxel that found no better point stops: converged only if the model predicts less than
        # tol still to gain (a difference of llh, so no unit or additive constant can change the label)
        stuck = np.zeros(active.size, bool)
        stuck[pending] = it > 1
        stuck_converged = stuck & (gain + left < tol)
        converged[active[stuck_converged]] = True
        stop[active[stuck_converged]] = CONVERGED
        stop[active[stuck & ~stuck_converged]] = STEP_FAILED
        keep = ~settled & ~stuck
        active = active[keep]
        ev_act = subset_eval(new_ev, np.flatnonzero(keep))
    return ScoringResult(D=D, converged=converged, n_iter=n_iter, stop=stop, ok=ok)


def _uncached(ev: Evaluation) -> Evaluation:
    """The evaluation without its cache: scoring never reads it (the settled point is evaluated anew), and
    every merge of accepted rows would copy its (voxels x levels) arrays."""
    ev.cache = None
    return ev


def _accept(rows, good, ev_t: Evaluation, trial, new_llh, new_D, new_s2, new_ev: Evaluation) -> Evaluation:
    """Take the trial points that were good: update the running state in place, return the merged evaluation."""
    gi = rows[good]
    new_llh[gi] = la.to_host(ev_t.llh)[good]
    for f in range(len(new_D)):
        la.put_rows(new_D[f], gi, la.select_rows(trial[f], good))
    la.put_rows(new_s2, gi, la.select_rows(ev_t.sigma2, good))
    return merge_eval(new_ev, ev_t, gi, good)


def _direction(method, ev: Evaluation, D, sigma2, N, qk, cholesky: bool):
    """Scoring step; returns trial(rows, lam) -> (D list, σ² or None) along it.

    The system is set up in vec(D) coordinates (plus σ² for FS/pFS).  With `cholesky`,
    it is pulled back to D_k = Λ_k Λ_k' (lower-triangular Λ_k, as lme4's θ), so every
    step is an ascent direction and D stays PSD even on the boundary of the cone.
    """
    xp = la.namespace(ev.llh, sigma2)
    v = ev.llh.shape[0]
    per_voxel_n = np.ndim(N) > 0  # missing rows: n per voxel, moved to where the voxels' arrays are
    N = la.from_host(xp, N, la.device_of(ev.llh)) if per_voxel_n else N
    g = xp.concat([xp.reshape(G, (v, -1)) for G in ev.grad], axis=1)  # vec, row-major
    F = ev.info
    tvec = xp.concat([xp.reshape(Tk, (v, -1)) for Tk in ev.T_sum], axis=1)
    carry = method in ("FS", "pFS")
    if carry:  # joint over (σ², D) with the σ²-D coupling of the expected information
        s = g.shape[1]
        Info = xp.empty((v, 1 + s, 1 + s), dtype=g.dtype, device=la.device_of(g))
        Info[:, 0, 0] = N / sigma2**2
        Info[:, 0, 1:] = Info[:, 1:, 0] = tvec / sigma2[:, None]
        Info[:, 1:, 1:] = F
        grad = xp.concat([(N / sigma2 - ev.Q / sigma2**2)[:, None], g], axis=1)
    else:  # σ² is profiled: its information is the Schur complement
        Info = F - tvec[:, :, None] * tvec[:, None, :] / (xp.reshape(N, (-1, 1, 1)) if per_voxel_n else N)
        grad = g
    off = 1 if carry else 0
    if cholesky:
        Lam = [la.safe_cholesky(Dk + (1e-10 * (xp.linalg.trace(Dk) / q) + 1e-14)[:, None, None]
                                * xp.eye(q, dtype=Dk.dtype, device=la.device_of(Dk)))[0] for Dk, q in zip(D, qk)]
        J = _cholesky_jacobian(Lam, qk, carry)  # (v, dim vec, dim θ)
    else:
        Lam = None
        vech_coords = method in ("FS", "SFS")
        P = _block_duplication(qk) if vech_coords else np.eye(sum(q * q for q in qk))
        if carry:
            P = _prepend_identity(P)
        J = xp.broadcast_to(la.from_host(xp, P, la.device_of(ev.llh)), (v,) + P.shape)
    curvature = _theta_curvature(ev.grad, qk, off) if cholesky else None

    def model(J, rows=None):
        """The scoring model (A, b) of the deviance in the coordinates J maps from (of `rows`, or all)."""
        pick = (lambda a: a) if rows is None else (lambda a: la.select_rows(a, rows))
        A = xp.matrix_transpose(J) @ pick(Info) @ J
        b = -la.einsum(xp, "vi,vij->vj", pick(grad), J)
        if cholesky:
            # Newton's curvature of D(θ) along the deviance gradient: without it the information
            # 4θ²F vanishes as a variance goes to 0 and steps toward the boundary crawl
            A = A + _psd_part(pick(curvature))
            if method == "pSFS" and ev.observed is not None:
                A = _observed_where_positive(A, ev if rows is None else subset_eval(ev, rows), J, pick(curvature),
                                             pick(sigma2), pick(N) if per_voxel_n else N)
        return A, b

    A, b = model(J)
    on_face = np.zeros(v, bool)
    if cholesky:
        # the ridged Λ above lets steps leave a singular D, but its θ sit ~1e-5 off the boundary and
        # would predict a gain that no step can realise: where the ridge moves a pivot of D_k's own factor
        # by more than 0.1% (a singular or nearly singular D_k), the stopping rule's gain uses that factor
        exact = [lower_cholesky(Dk) for Dk in D]
        on_face = la.to_host(xp.any(xp.stack([
            xp.any(xp.abs(xp.linalg.diagonal(L) - xp.linalg.diagonal(Lr)) > 1e-3 * xp.linalg.diagonal(Lr), axis=1)
            for L, Lr in zip(exact, Lam)]), axis=0))
    scale = xp.linalg.trace(A) / A.shape[-1]
    eye = xp.eye(A.shape[-1], dtype=A.dtype, device=la.device_of(A))

    def unpack(x):
        parts, start = [], off
        for q in qk:
            m = q * (q + 1) // 2 if (cholesky or method in ("FS", "SFS")) else q * q
            xk = x[:, start:start + m]
            if cholesky:
                parts.append(la.unvech_lower(xk, q))
            elif m == q * q:
                parts.append(la.sym(xp.reshape(xk, (-1, q, q))))
            else:
                parts.append(la.unvech(xk, q))
            start += m
        return parts, (x[:, 0] if carry else None)

    x = _solve_ridge(A, b)
    full_step = unpack(x)
    # predicted llh gain of one more step (the quadratic model of the deviance, halved): what is left
    xg, bg = la.copied(x), la.copied(b)
    if np.any(on_face):
        rows = np.flatnonzero(on_face)
        A_f, b_f = model(_cholesky_jacobian([la.select_rows(L, rows) for L in exact], qk, carry), rows)
        la.put_rows(bg, rows, b_f)
        la.put_rows(xg, rows, _solve_ridge(A_f, b_f))
    gain = xp.where(xp.all(xp.isfinite(xg), axis=1),
                    0.25 * la.einsum(xp, "vi,vi->v", la.nan_to_num(bg), la.nan_to_num(xg)), xp.inf)

    def trial(rows, attempt):
        """Attempt 0 is the scoring step; later attempts halve it (D) or damp it (Λ, Levenberg)."""
        pick = la.select_rows
        if cholesky and attempt > 0:
            mu = (1e-4 * 10.0 ** (attempt - 1)) * pick(scale, rows)
            parts, step_s2 = unpack(_solve_ridge(pick(A, rows) + mu[:, None, None] * eye, pick(b, rows)))
            lam = xp.ones(rows.size, dtype=A.dtype, device=la.device_of(A))
        else:
            parts, step_s2 = full_step
            parts = [pick(P, rows) for P in parts]
            step_s2 = None if step_s2 is None else pick(step_s2, rows)
            lam = xp.full(rows.size, 0.5 ** attempt, dtype=A.dtype, device=la.device_of(A))
        if cholesky:
            Ds = []
            for Lk, dLk in zip(Lam, parts):
                Lt = pick(Lk, rows) + lam[:, None, None] * dLk
                Ds.append(Lt @ xp.matrix_transpose(Lt))
        else:
            Ds = [la.project_psd(pick(Dk, rows) + lam[:, None, None] * sD) for Dk, sD in zip(D, parts)]
        s2 = None
        if carry:
            s2 = xp.maximum(pick(sigma2, rows) + lam * step_s2, 1e-3 * pick(sigma2, rows))
        return Ds, s2

    return trial, gain


def _observed_where_positive(A, ev: Evaluation, J, curvature, sigma2, N) -> np.ndarray:
    """pSFS: the observed information (σ² profiled) instead of the expected one where it is PD.

    Near the optimum that is (nearly) Newton's method: quadratic instead of linear
    convergence, so fewer evaluations; elsewhere the expected information keeps steps safe.
    """
    xp = la.namespace(A)
    v = A.shape[0]
    uu = xp.concat([xp.reshape(U, (v, -1)) for U in ev.uu_sum], axis=1)
    # profile σ² out: H_DD - H_Dσ H_σσ⁻¹ H_σD with H_σσ = N/σ⁴ and H_σD = uu/σ⁴ at σ̂²
    Obs = ev.observed - uu[:, :, None] * uu[:, None, :] / (N * sigma2**2)[:, None, None]
    A_obs = xp.matrix_transpose(J) @ Obs @ J + curvature  # pSFS profiles σ²: no σ² row to offset
    _, pd = la.safe_cholesky(la.sym(A_obs))
    return xp.where(pd[:, None, None], la.sym(A_obs), A)


def _theta_curvature(G_list, qk, off: int) -> np.ndarray:
    """Σ_m (∂dev/∂D_m) ∂²D_m/∂θ∂θ' for D_k = Λ_kΛ_k', block diagonal over factors (v, dim, dim)."""
    xp = la.namespace(*G_list)
    v = G_list[0].shape[0]
    dim = off + sum(q * (q + 1) // 2 for q in qk)
    out = xp.zeros((v, dim, dim), dtype=G_list[0].dtype, device=la.device_of(G_list[0]))
    start = off
    for G, q in zip(G_list, qk):
        ri, ci = la.vech_index(q)
        for t, (i, j) in enumerate(zip(ri, ci)):
            for t2, (k, l) in enumerate(zip(ri, ci)):
                if j == l:  # ∂²(ΛΛ')/∂θ_ij∂θ_kl = e_i e_k' + e_k e_i' when both sit in column j
                    out[:, start + t, start + t2] = 2.0 * G[:, i, k]
        start += ri.size
    return out


def _psd_part(A: np.ndarray) -> np.ndarray:
    """The positive semi-definite part of symmetric matrices (keeps scoring steps ascent steps)."""
    xp = la.namespace(A)
    w, U = xp.linalg.eigh(la.sym(A))
    return (U * xp.maximum(w, 0.0)[:, None, :]) @ xp.matrix_transpose(U)


def _face_step(D):
    """Trial points with the smallest eigenvalue of each D_k set to 0 (rows where one is positive)."""
    xp = la.namespace(*D)
    v = D[0].shape[0]
    cand, moved = [], np.zeros(v, bool)
    for Dk in D:
        w, U = xp.linalg.eigh(la.sym(Dk))
        on_face = w[:, 0] > 0
        w = la.copied(w)
        w[:, 0] = 0.0
        cand.append(xp.where(on_face[:, None, None], (U * xp.maximum(w, 0.0)[:, None, :]) @ xp.matrix_transpose(U),
                             Dk))
        moved |= la.to_host(on_face)
    rows = np.flatnonzero(moved)
    return rows, [la.select_rows(c, rows) for c in cand]


def _escape_step(ev: Evaluation, D, qk):
    """Trial points leaving a singular D_k along u, where u'G_k u < 0 on the null space of D_k.

    D_k singular is optimal only if G_k (the deviance gradient) is PSD on D_k's null space;
    otherwise D_k + t uu' with t = -u'G u / (vec(uu')' F vec(uu')) from the scoring model
    improves by ¼ (u'G u)² / c in llh, c = vec(uu')' F vec(uu').  Returns (rows that have such a
    direction, their trial D list, that predicted gain).
    """
    xp = la.namespace(ev.llh, *D)
    v = ev.llh.shape[0]
    cand = [la.copied(Dk) for Dk in D]
    moved = np.zeros(v, bool)
    predicted = xp.zeros(v, dtype=ev.llh.dtype, device=la.device_of(ev.llh))
    start = 0
    for f, (Dk, q) in enumerate(zip(D, qk)):
        w, U = xp.linalg.eigh(la.sym(Dk))
        null = w <= 1e-6 * xp.maximum(w[:, -1:], 1.0)  # numerically singular: variance < 1e-6 σ²
        G = ev.grad[f]
        Gn = xp.where(null[:, :, None] & null[:, None, :], xp.matrix_transpose(U) @ G @ U, 0.0)
        far = xp.full(null.shape, 1e300, dtype=Gn.dtype, device=la.device_of(Gn))
        Gn = Gn + xp.where(null, 0.0, far)[:, :, None] * xp.eye(q, dtype=Gn.dtype, device=la.device_of(Gn))  # only null-space directions
        gw, gv = xp.linalg.eigh(Gn)
        u = la.einsum(xp, "vab,vb->va", U, gv[:, :, 0])
        uu = u[:, :, None] * u[:, None, :]
        Fk = ev.info[:, start:start + q * q, start:start + q * q]
        curv = la.einsum(xp, "vi,vij,vj->v", xp.reshape(uu, (v, -1)), Fk, xp.reshape(uu, (v, -1)))
        ok = (gw[:, 0] < 0) & (curv > 0)
        t = xp.where(ok, -gw[:, 0] / xp.where(curv > 0, curv, 1.0), 0.0)
        cand[f] = Dk + t[:, None, None] * uu
        moved |= la.to_host(ok)
        with np.errstate(over="ignore"):  # a vanishing curvature: an unbounded gain, tried as such
            predicted += xp.where(ok, 0.25 * gw[:, 0] ** 2 / xp.where(curv > 0, curv, 1.0), 0.0)
        start += q * q
    rows = np.flatnonzero(moved)
    return rows, [la.select_rows(c, rows) for c in cand], la.to_host(predicted)[rows]


def _cholesky_jacobian(Lam, qk, carry: bool) -> np.ndarray:
    """d vec(D_k) / d θ_k for D_k = Λ_k Λ_k', θ_k the lower triangle of Λ_k; block diagonal."""
    xp = la.namespace(*Lam)
    v = Lam[0].shape[0]
    rows = sum(q * q for q in qk) + (1 if carry else 0)
    cols = sum(q * (q + 1) // 2 for q in qk) + (1 if carry else 0)
    J = xp.zeros((v, rows, cols), dtype=Lam[0].dtype, device=la.device_of(Lam[0]))
    r0 = c0 = 0
    if carry:
        J[:, 0, 0] = 1.0
        r0 = c0 = 1
    for L, q in zip(Lam, qk):
        ri, ci = la.vech_index(q)
        for t, (i, j) in enumerate(zip(ri, ci)):
            dD = xp.zeros((v, q, q), dtype=L.dtype, device=la.device_of(L))
            dD[:, i, :] += L[:, :, j]  # E_ij Λ'
            dD[:, :, i] += L[:, :, j]  # Λ E_ji
            J[:, r0:r0 + q * q, c0 + t] = xp.reshape(dD, (v, q * q))
        r0 += q * q
        c0 += ri.size
    return J


def _prepend_identity(P: np.ndarray) -> np.ndarray:
    out = np.zeros((P.shape[0] + 1, P.shape[1] + 1))
    out[0, 0] = 1.0
    out[1:, 1:] = P
    return out


def _block_duplication(qk) -> np.ndarray:
    blocks = [la.duplication(q) for q in qk]
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
    i = j = 0
    for b in blocks:
        out[i:i + b.shape[0], j:j + b.shape[1]] = b
        i += b.shape[0]
        j += b.shape[1]
    return out


def _solve_ridge(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve SPD systems; a tiny ridge keeps unidentifiable directions (e.g. slopes of singletons) finite."""
    xp = la.namespace(A)
    s = A.shape[-1]
    scale = xp.linalg.trace(A) / s
    A = A + (1e-10 * xp.maximum(scale, 1e-300))[:, None, None] * xp.eye(s, dtype=A.dtype, device=la.device_of(A))
    return la.safe_solve(A, b)[0]  # a singular voxel gets a NaN step, which no trial accepts

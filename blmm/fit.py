"""Fisher scoring for every voxel at once: FS, pFS, SFS and pSFS.

All four methods maximise the same (RE)ML log-likelihood over D (β and σ² are profiled
out, except that FS/pFS carry σ² as a scored parameter), take a monotone step (halved
until the log-likelihood does not decrease, then projected so D stays PSD) and stop a
voxel when its log-likelihood changes by less than `tol`.  They differ only in the
scoring direction (docs/model.md).

After convergence the fit packages what inference needs: Cov(β̂) = σ²(X'V⁻¹X)⁻¹, its
derivatives in φ = (σ², vech D_1, …, vech D_r), and the observed Hessian of the
deviance in φ (central differences of the analytic gradient), as lmerTest does.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from blmm import linalg as la
from blmm.design import RandomFactor
from blmm.objective import DenseObjective, Evaluation, LevelObjective, SchurObjective
from blmm.objective_nested import NestedObjective, NestedSchurObjective, check_memory, nested_tree
from blmm.stats import SufficientStats, sufficient_stats

METHODS = ("pSFS", "SFS", "pFS", "FS")

# status codes of FitResult.status
FITTED = 0
DROPPED_RANK = 1  # X restricted to the observed rows is rank deficient
DROPPED_FEW = 2  # not more observations than fixed effects
FAILED = 3  # numerical failure (e.g. a constant response)
STATUS_NAMES = {FITTED: "fitted", DROPPED_RANK: "rank-deficient X", DROPPED_FEW: "too few observations",
                FAILED: "numerical failure"}


@dataclass
class FitResult:
    """Per-voxel estimates and everything inference needs."""

    beta: np.ndarray  # (v, p)
    sigma2: np.ndarray  # (v,)
    D: list  # per factor (v, q_k, q_k), relative to σ²
    llh: np.ndarray  # (v,) float64, lme4's logLik
    converged: np.ndarray  # (v,) bool
    n_iter: np.ndarray  # (v,) int
    n_obs: np.ndarray  # (v,) int, images present
    status: np.ndarray  # (v,) int, FITTED or a reason for dropping
    cov_beta: np.ndarray  # (v, p, p)
    cov_beta_grad: np.ndarray  # (v, k, p, p), derivative in φ (docs/model.md)
    hessian: np.ndarray  # (v, k, k), deviance Hessian in φ (identity rows for dropped θ)
    free: np.ndarray  # (v, k) bool: φ entries of factors not on the boundary
    resms: np.ndarray  # (v,) e'e/(n - p) at the GLS β̂
    factor_names: list = field(default_factory=list)
    q: list = field(default_factory=list)
    reml: bool = True
    method: str = "pSFS"

    @property
    def n_voxels(self) -> int:
        return int(self.beta.shape[0])

    @property
    def p(self) -> int:
        return int(self.beta.shape[1])

    @property
    def fitted(self) -> np.ndarray:
        return self.status == FITTED

    @property
    def boundary(self) -> np.ndarray:
        """Voxels where some D_k is singular."""
        return self.fitted & ~np.all(self.free, axis=1)

    def vech_D(self) -> np.ndarray:
        """[vech(D_1), …, vech(D_r)] per voxel (upstream's blmm_vox_D order)."""
        return np.concatenate([la.vech(D) for D in self.D], axis=1)


def fit_lmm(
    Y: np.ndarray,
    X: np.ndarray,
    factors: list[RandomFactor],
    reml: bool = True,
    method: str = "pSFS",
    tol: float = 1e-6,
    max_iter: int = 10000,
    **options,
) -> FitResult:
    """Fit Y = Xβ + Zb + ε at every voxel (column of Y; NaN = missing)."""
    return fit_stats(sufficient_stats(Y, X, factors), reml=reml, method=method, tol=tol,
                     max_iter=max_iter, **options)


def fit_stats(
    stats: SufficientStats,
    reml: bool = True,
    method: str = "pSFS",
    tol: float = 1e-6,
    max_iter: int = 10000,
    structure: str = "auto",
    max_block_bytes: int = 512 * 2**20,
    threads: int | None = None,
) -> FitResult:
    """Fit every voxel from its sufficient statistics.

    structure: "levels" (one factor, grouped levels), "schur" (several factors: the one with
    most levels eliminated level by level, the rest dense), "dense" (any factors: a dense
    q x q system per voxel), "nested" (factors nested in one tree, e.g. subjects in families:
    eliminated by the outer level's blocks, docs/model.md) or "auto" (levels for one factor,
    nested for one nesting tree, else schur — with a nesting tree eliminated as a whole —
    unless the remaining factors have more than 2,000 columns).  A structure whose dense part
    does not fit one voxel in max_block_bytes is refused (ValueError) before any fitting.
    max_block_bytes bounds the working memory of all voxel blocks in flight; `threads`
    (default: the CPU count) fit blocks concurrently.
    """
    method = _check_method(method)
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    layout = stats.layout
    n_factors = len(layout.q)
    tree = nested_tree(layout) if structure in ("auto", "nested", "schur") else None
    if structure == "auto" and tree is not None and len(tree) == n_factors:
        structure = "nested"  # every factor nests in one tree: eliminate by its outer level
    if structure == "auto":
        small_columns = layout.n_columns - max(l * q for l, q in zip(layout.n_levels, layout.q))
        if tree is not None:  # the nesting tree is eliminated; the other factors stay dense
            small_columns = layout.n_columns - sum(layout.n_levels[f] * layout.q[f] for f in tree)
        structure = "levels" if n_factors == 1 else ("schur" if small_columns <= 2000 else "dense")
    if structure not in ("levels", "schur", "dense", "nested"):
        raise ValueError(f"unknown structure {structure!r}; expected auto, levels, schur, dense or nested")
    if structure == "nested" and (tree is None or len(tree) != n_factors):
        raise ValueError("the 'nested' structure needs every random factor nested in one tree "
                         "(e.g. subjects within families)")
    if structure == "levels" and n_factors != 1:
        raise ValueError("the 'levels' structure needs exactly one random factor")
    if structure == "schur" and n_factors < 2:
        raise ValueError("the 'schur' structure needs two or more random factors")
    v, p = stats.n_voxels, stats.p
    qk = list(layout.q)
    k = 1 + sum(q * (q + 1) // 2 for q in qk)
    check_memory(structure, layout, p, max_block_bytes, tree)  # refuse before any work, with numbers
    res = _empty_result(v, p, qk, k, list(layout.names), reml, method)
    res.n_obs[:] = stats.voxel_n_obs()
    threads = (os.cpu_count() or 1) if threads is None else max(1, int(threads))
    jobs = []
    for u in range(stats.patterns.shape[0]):  # loop over missingness patterns, not voxels
        vox = np.flatnonzero(stats.pattern_of_voxel == u)
        if vox.size == 0:
            continue
        n = int(stats.n_obs[u])
        XtX = stats.XtX[u]
        if n <= p:
            res.status[vox] = DROPPED_FEW
            continue
        if _rank(XtX) < p:
            res.status[vox] = DROPPED_RANK
            continue
        if structure == "levels":
            obj = LevelObjective(XtX, stats.ZtX[u], stats.ZtZ[u], n, qk[0], reml)
            per_voxel = 8 * (12 * obj.C * qk[0] ** 2 + obj.Cb * len(obj.pairs) * (p + 1) + (k + 6) * p * p)
        elif structure == "schur" and tree is not None and len(tree) < n_factors:  # nesting tree + dense rest
            obj = NestedSchurObjective(XtX, stats.ZtX[u], stats.ZtZ[u], n, layout, reml, tree)
            per_voxel = obj.per_voxel_bytes() + 8 * (k + 6) * p * p
        elif structure == "schur":
            obj = SchurObjective(XtX, stats.ZtX[u], stats.ZtZ[u], n, layout, reml)
            lv, pu = obj.level, p + obj.qR
            per_voxel = 8 * (12 * lv.C * lv.q ** 2 + lv.Cb * len(lv.pairs) * (pu + 1) + 12 * pu * pu
                             + 8 * obj.qR ** 2 + (k + 6) * p * p)
        elif structure == "nested":
            obj = NestedObjective(XtX, stats.ZtX[u], stats.ZtZ[u], n, layout, reml, tree)
            per_voxel = obj.per_voxel_bytes() + 8 * (k + 6) * p * p
        else:
            obj = DenseObjective(XtX, stats.ZtX[u], stats.ZtZ[u], n, layout, reml)
            per_voxel = 8 * (10 * obj.qtot ** 2 + (k + 6) * p * p)
        # voxel blocks bound the memory; threads share the blocks (numpy releases the GIL)
        block = max(1, int(max_block_bytes // max(per_voxel, 1) // max(threads, 1)))
        if threads > 1:
            block = min(block, max(64, -(-vox.size // (2 * threads))))  # enough blocks to share
        jobs.extend((obj, n, XtX, vox[start:start + block]) for start in range(0, vox.size, block))

    def run(job) -> None:
        obj, n, XtX, idx = job
        data = obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx])
        out = _fit_block(obj, data, qk, method, tol, int(max_iter), reml, n, p)
        _store(res, idx, out)  # blocks write disjoint rows
        eTe = (stats.YtY[idx] - 2 * np.einsum("vp,vp->v", out["beta"], stats.XtY[idx])
               + np.einsum("vp,pq,vq->v", out["beta"], XtX, out["beta"]))
        res.resms[idx] = eTe / (n - p)

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(run, jobs))
    else:
        for job in jobs:
            run(job)
    _blank_unfitted(res)
    return res


def _check_method(method: str) -> str:
    for m in METHODS:
        if method.lower() == m.lower():
            return m
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _rank(A: np.ndarray) -> int:
    w = np.linalg.eigvalsh(A)
    return int(np.sum(w > max(w.max(), 0.0) * A.shape[0] * 1e-12))


def _empty_result(v, p, qk, k, names, reml, method) -> FitResult:
    return FitResult(
        beta=np.full((v, p), np.nan), sigma2=np.full(v, np.nan),
        D=[np.full((v, q, q), np.nan) for q in qk], llh=np.full(v, np.nan),
        converged=np.zeros(v, bool), n_iter=np.zeros(v, np.int64), n_obs=np.zeros(v, np.int64),
        status=np.full(v, FITTED, np.int64), cov_beta=np.full((v, p, p), np.nan),
        cov_beta_grad=np.full((v, k, p, p), np.nan), hessian=np.full((v, k, k), np.nan),
        free=np.zeros((v, k), bool), resms=np.full(v, np.nan), factor_names=names, q=qk,
        reml=reml, method=method,
    )


def _store(res: FitResult, idx, out) -> None:
    res.beta[idx] = out["beta"]
    res.sigma2[idx] = out["sigma2"]
    for f, D in enumerate(out["D"]):
        res.D[f][idx] = D
    res.llh[idx] = out["llh"]
    res.converged[idx] = out["converged"]
    res.n_iter[idx] = out["n_iter"]
    res.cov_beta[idx] = out["cov_beta"]
    res.cov_beta_grad[idx] = out["cov_beta_grad"]
    res.hessian[idx] = out["hessian"]
    res.free[idx] = out["free"]
    res.status[idx] = np.where(out["ok"], FITTED, FAILED)


def _blank_unfitted(res: FitResult) -> None:
    bad = res.status != FITTED
    for arr in (res.beta, res.sigma2, res.llh, res.cov_beta, res.cov_beta_grad, res.hessian, res.resms, *res.D):
        arr[bad] = np.nan
    res.converged[bad] = False


def _take(data, idx, full_size):
    return data if idx.size == full_size else data.take(idx)


def _fit_block(obj, data, qk, method, tol, max_iter, reml, n, p) -> dict:
    """Scoring iterations for one voxel block, then the packaging for inference."""
    v = data.XtY.shape[0]
    D = [np.zeros((v, q, q)) for q in qk]
    ev = obj.evaluate(D, data, grad=True)
    ok = ev.ok.copy()
    llh = ev.llh.copy()
    sigma2 = ev.sigma2.copy()
    converged = np.zeros(v, bool)
    n_iter = np.zeros(v, np.int64)
    active = np.flatnonzero(ok)
    ev_act = _subset_eval(ev, active)
    N = n - p if reml else n
    for it in range(1, max_iter + 1):
        if active.size == 0:
            break
        D_act = [Dk[active] for Dk in D]
        # the first step (from D = 0) is taken in D itself; later ones in Cholesky coordinates
        make_trial = _direction(method, ev_act, D_act, sigma2[active], N, qk, cholesky=it > 1)
        old = llh[active]
        new_llh = old.copy()
        new_D = [Dk.copy() for Dk in D_act]
        new_s2 = sigma2[active].copy()
        new_ev = ev_act
        accepted = np.zeros(active.size, bool)
        pending = np.arange(active.size)
        adata = _take(data, active, v)
        for attempt in range(40):  # shorter (or damped) steps until the log-likelihood does not decrease
            trial, s2_trial = make_trial(pending, attempt)
            ev_t = obj.evaluate(trial, _take(adata, pending, active.size), sigma2=s2_trial, grad=True)
            moved = np.zeros(pending.size, bool)
            for Dt, Dk in zip(trial, D_act):
                moved |= np.any(np.abs(Dt - Dk[pending]) > 0, axis=(1, 2))
            # a step that lands back on the same point (e.g. projected to D = 0) is no step
            good = ev_t.ok & ((ev_t.llh > old[pending]) | ((ev_t.llh == old[pending]) & moved))
            new_ev = _accept(pending, good, ev_t, trial, new_llh, new_D, new_s2, new_ev)
            accepted[pending[good]] = True
            pending = pending[~good]
            if pending.size == 0:
                break
        # before giving up or converging, check the KKT condition on singular D_k: leave the
        # boundary along a direction that improves, if there is one
        change = np.abs(new_llh - old)
        check = np.union1d(pending, np.flatnonzero(change < tol))
        if check.size:
            base = [Dk[check] for Dk in new_D]
            ev_c = _subset_eval(new_ev, check)
            rows, cand = _escape_step(ev_c, base, qk)
            for _ in range(30):
                if rows.size == 0:
                    break
                sub = check[rows]
                ev_t = obj.evaluate(cand, _take(adata, sub, active.size),
                                    sigma2=new_s2[sub] if method in ("FS", "pFS") else None, grad=True)
                good = ev_t.ok & (ev_t.llh > new_llh[sub] + 1e-12 * np.abs(new_llh[sub]))
                new_ev = _accept(sub, good, ev_t, cand, new_llh, new_D, new_s2, new_ev)
                rows = rows[~good]
                start_pts = [b[rows] for b in base]
                cand = [b + 0.5 * (c[~good] - b) for b, c in zip(start_pts, cand)]  # halve the move
        for f in range(len(qk)):
            D[f][active] = new_D[f]
        sigma2[active] = new_s2
        change = np.abs(new_llh - old)
        llh[active] = new_llh
        n_iter[active] = it
        done = (change < tol) & (it > 1)  # the moment step from D = 0 alone never settles a voxel
        converged[active[done]] = True
        keep = ~done
        active = active[keep]
        ev_act = _subset_eval(new_ev, np.flatnonzero(keep))
    # final evaluation at the optimum: profiled σ², GLS β̂, lme4's log-likelihood
    return _package(obj, data, D, converged, n_iter, ok, qk, reml, n, p)


def _accept(rows, good, ev_t: Evaluation, trial, new_llh, new_D, new_s2, new_ev: Evaluation) -> Evaluation:
    """Take the trial points that were good: update the running state in place, return the merged evaluation."""
    gi = rows[good]
    new_llh[gi] = ev_t.llh[good]
    for f in range(len(new_D)):
        new_D[f][gi] = trial[f][good]
    new_s2[gi] = ev_t.sigma2[good]
    return _merge_eval(new_ev, ev_t, gi, good)


def _direction(method, ev: Evaluation, D, sigma2, N, qk, cholesky: bool):
    """Scoring step; returns trial(rows, lam) -> (D list, σ² or None) along it.

    The system is set up in vec(D) coordinates (plus σ² for FS/pFS).  With `cholesky`,
    it is pulled back to D_k = Λ_k Λ_k' (lower-triangular Λ_k, as lme4's θ), so every
    step is an ascent direction and D stays PSD even on the boundary of the cone.
    """
    v = ev.llh.shape[0]
    g = np.concatenate([G.reshape(v, -1) for G in ev.grad], axis=1)  # vec, row-major
    F = ev.info
    tvec = np.concatenate([Tk.reshape(v, -1) for Tk in ev.T_sum], axis=1)
    carry = method in ("FS", "pFS")
    if carry:  # joint over (σ², D) with the σ²-D coupling of the expected information
        s = g.shape[1]
        Info = np.empty((v, 1 + s, 1 + s))
        Info[:, 0, 0] = N / sigma2**2
        Info[:, 0, 1:] = Info[:, 1:, 0] = tvec / sigma2[:, None]
        Info[:, 1:, 1:] = F
        grad = np.concatenate([(N / sigma2 - ev.Q / sigma2**2)[:, None], g], axis=1)
    else:  # σ² is profiled: its information is the Schur complement
        Info = F - tvec[:, :, None] * tvec[:, None, :] / N
        grad = g
    off = 1 if carry else 0
    if cholesky:
        Lam = [np.linalg.cholesky(Dk + (1e-10 * (np.trace(Dk, axis1=1, axis2=2) / q) + 1e-14)[:, None, None]
                                  * np.eye(q)) for Dk, q in zip(D, qk)]
        J = _cholesky_jacobian(Lam, qk, carry)  # (v, dim vec, dim θ)
    else:
        Lam = None
        vech_coords = method in ("FS", "SFS")
        P = _block_duplication(qk) if vech_coords else np.eye(sum(q * q for q in qk))
        if carry:
            P = _prepend_identity(P)
        J = np.broadcast_to(P, (v,) + P.shape)
    A = np.swapaxes(J, 1, 2) @ Info @ J
    b = -np.einsum("vi,vij->vj", grad, J)
    if cholesky:
        # Newton's curvature of D(θ) along the deviance gradient: without it the information
        # 4θ²F vanishes as a variance goes to 0 and steps toward the boundary crawl
        A = A + _psd_part(_theta_curvature(ev.grad, qk, off))
    scale = np.trace(A, axis1=1, axis2=2) / A.shape[-1]
    eye = np.eye(A.shape[-1])

    def unpack(x):
        parts, start = [], off
        for q in qk:
            m = q * (q + 1) // 2 if (cholesky or method in ("FS", "SFS")) else q * q
            xk = x[:, start:start + m]
            if cholesky:
                r, c = la.vech_index(q)
                dL = np.zeros((x.shape[0], q, q))
                dL[:, r, c] = xk
                parts.append(dL)
            elif m == q * q:
                parts.append(la.sym(xk.reshape(-1, q, q)))
            else:
                parts.append(la.unvech(xk, q))
            start += m
        return parts, (x[:, 0] if carry else None)

    full_step = unpack(_solve_ridge(A, b))

    def trial(rows, attempt):
        """Attempt 0 is the scoring step; later attempts halve it (D) or damp it (Λ, Levenberg)."""
        if cholesky and attempt > 0:
            mu = (1e-4 * 10.0 ** (attempt - 1)) * scale[rows]
            parts, step_s2 = unpack(_solve_ridge(A[rows] + mu[:, None, None] * eye, b[rows]))
            lam = np.ones(rows.size)
        else:
            parts, step_s2 = full_step
            parts = [P[rows] for P in parts]
            step_s2 = None if step_s2 is None else step_s2[rows]
            lam = np.full(rows.size, 0.5 ** attempt)
        if cholesky:
            Ds = []
            for Lk, dLk in zip(Lam, parts):
                Lt = Lk[rows] + lam[:, None, None] * dLk
                Ds.append(Lt @ np.swapaxes(Lt, 1, 2))
        else:
            Ds = [la.project_psd(Dk[rows] + lam[:, None, None] * sD) for Dk, sD in zip(D, parts)]
        s2 = None
        if carry:
            s2 = np.maximum(sigma2[rows] + lam * step_s2, 1e-3 * sigma2[rows])
        return Ds, s2

    return trial


def _theta_curvature(G_list, qk, off: int) -> np.ndarray:
    """Σ_m (∂dev/∂D_m) ∂²D_m/∂θ∂θ' for D_k = Λ_kΛ_k', block diagonal over factors (v, dim, dim)."""
    v = G_list[0].shape[0]
    dim = off + sum(q * (q + 1) // 2 for q in qk)
    out = np.zeros((v, dim, dim))
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
    w, U = np.linalg.eigh(la.sym(A))
    return (U * np.maximum(w, 0.0)[:, None, :]) @ np.swapaxes(U, 1, 2)


def _escape_step(ev: Evaluation, D, qk):
    """Trial points leaving a singular D_k along u, where u'G_k u < 0 on the null space of D_k.

    D_k singular is optimal only if G_k (the deviance gradient) is PSD on D_k's null space;
    otherwise D_k + t uu' with t = -u'G u / (vec(uu')' F vec(uu')) from the scoring model
    improves.  Returns (rows that have such a direction, their trial D list).
    """
    v = ev.llh.shape[0]
    cand = [Dk.copy() for Dk in D]
    moved = np.zeros(v, bool)
    start = 0
    for f, (Dk, q) in enumerate(zip(D, qk)):
        w, U = np.linalg.eigh(la.sym(Dk))
        null = w <= 1e-6 * np.maximum(w[:, -1:], 1.0)  # numerically singular: variance < 1e-6 σ²
        G = ev.grad[f]
        Gn = np.where(null[:, :, None] & null[:, None, :], np.swapaxes(U, 1, 2) @ G @ U, 0.0)
        Gn = Gn + np.where(null, 0.0, 1e300)[:, :, None] * np.eye(q)  # only null-space directions
        gw, gv = np.linalg.eigh(Gn)
        u = np.einsum("vab,vb->va", U, gv[:, :, 0])
        uu = u[:, :, None] * u[:, None, :]
        Fk = ev.info[:, start:start + q * q, start:start + q * q]
        curv = np.einsum("vi,vij,vj->v", uu.reshape(v, -1), Fk, uu.reshape(v, -1))
        ok = (gw[:, 0] < 0) & (curv > 0)
        t = np.where(ok, -gw[:, 0] / np.where(curv > 0, curv, 1.0), 0.0)
        cand[f] = Dk + t[:, None, None] * uu
        moved |= ok
        start += q * q
    rows = np.flatnonzero(moved)
    return rows, [c[rows] for c in cand]



def _cholesky_jacobian(Lam, qk, carry: bool) -> np.ndarray:
    """d vec(D_k) / d θ_k for D_k = Λ_k Λ_k', θ_k the lower triangle of Λ_k; block diagonal."""
    v = Lam[0].shape[0]
    rows = sum(q * q for q in qk) + (1 if carry else 0)
    cols = sum(q * (q + 1) // 2 for q in qk) + (1 if carry else 0)
    J = np.zeros((v, rows, cols))
    r0 = c0 = 0
    if carry:
        J[:, 0, 0] = 1.0
        r0 = c0 = 1
    for L, q in zip(Lam, qk):
        ri, ci = la.vech_index(q)
        for t, (i, j) in enumerate(zip(ri, ci)):
            dD = np.zeros((v, q, q))
            dD[:, i, :] += L[:, :, j]  # E_ij Λ'
            dD[:, :, i] += L[:, :, j]  # Λ E_ji
            J[:, r0:r0 + q * q, c0 + t] = dD.reshape(v, q * q)
        r0 += q * q
        c0 += ri.size
    return J


def _prepend_identity(P: np.ndarray) -> np.ndarray:
    out = np.zeros((P.shape[0] + 1, P.shape[1] + 1))
    out[0, 0] = 1.0
    out[1:, 1:] = P
    return out



def _duplication(q: int) -> np.ndarray:
    """Dup with vec(A) = Dup vech(A), vec in row-major (a*q + b) order."""
    r, c = la.vech_index(q)
    Dup = np.zeros((q * q, r.size))
    Dup[r * q + c, np.arange(r.size)] = 1.0
    Dup[c * q + r, np.arange(r.size)] = 1.0
    return Dup


def _block_duplication(qk) -> np.ndarray:
    blocks = [_duplication(q) for q in qk]
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
    i = j = 0
    for b in blocks:
        out[i:i + b.shape[0], j:j + b.shape[1]] = b
        i += b.shape[0]
        j += b.shape[1]
    return out


def _solve_ridge(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve SPD systems; a tiny ridge keeps unidentifiable directions (e.g. slopes of singletons) finite."""
    s = A.shape[-1]
    scale = np.trace(A, axis1=1, axis2=2) / s
    A = A + (1e-10 * np.maximum(scale, 1e-300))[:, None, None] * np.eye(s)
    return np.linalg.solve(A, b[..., None])[..., 0]


def _subset_eval(ev: Evaluation, idx) -> Evaluation:
    return Evaluation(
        llh=ev.llh[idx], beta=ev.beta[idx], sigma2=ev.sigma2[idx], C=ev.C[idx], Q=ev.Q[idx], ok=ev.ok[idx],
        grad=[g[idx] for g in ev.grad], info=None if ev.info is None else ev.info[idx],
        T_sum=[t[idx] for t in ev.T_sum], uu_sum=[u[idx] for u in ev.uu_sum],
    )


def _merge_eval(base: Evaluation, new: Evaluation, where, good) -> Evaluation:
    """Copy of base with the rows `where` replaced by new's rows `good`."""
    out = _subset_eval(base, slice(None))
    for name in ("llh", "beta", "sigma2", "C", "Q", "ok"):
        arr = getattr(out, name).copy()
        arr[where] = getattr(new, name)[good]
        setattr(out, name, arr)
    for name in ("grad", "T_sum", "uu_sum"):
        lst = []
        for a, b in zip(getattr(out, name), getattr(new, name)):
            a = a.copy()
            a[where] = b[good]
            lst.append(a)
        setattr(out, name, lst)
    info = out.info.copy()
    info[where] = new.info[good]
    out.info = info
    return out


def _package(obj, data, D, converged, n_iter, ok, qk, reml, n, p) -> dict:
    v = data.XtY.shape[0]
    D = _snap_to_boundary(obj, data, D)
    ev = obj.evaluate(D, data, grad=True)
    ok = ok & ev.ok
    s2 = ev.sigma2
    N = n - p if reml else n
    vech_pos = [la.vech_index(q) for q in qk]
    k = 1 + sum(r.size for r, _ in vech_pos)
    H = np.zeros((v, k, k))
    dC = np.zeros((v, k, p, p))
    H[:, 0, 0] = -N / s2**2 + 2.0 * ev.Q / s2**3
    dC[:, 0] = ev.C
    free = np.ones((v, k), bool)
    col = 1
    targets = []
    for f, q in enumerate(qk):
        r, c = vech_pos[f]
        w = np.linalg.eigvalsh(la.sym(D[f]))
        on_boundary = w[:, 0] <= RANK_TOL * np.maximum(w[:, -1], 1e-300)
        for i in range(r.size):
            targets.append((f, r[i], c[i], col))
            free[:, col] = ~on_boundary
            uu = ev.uu_sum[f]
            H[:, 0, col] = H[:, col, 0] = uu[:, r[i], c[i]] * (2.0 if r[i] != c[i] else 1.0) / s2**2
            col += 1

    def vech_grad(e):
        return np.concatenate(
            [e.grad[f][:, r, c] * np.where(r != c, 2.0, 1.0) for f, (r, c) in enumerate(vech_pos)], axis=1)

    for f, a, b, col in targets:  # central differences of the analytic gradient, σ² held fixed
        scale = np.sqrt(np.abs(D[f][:, a, a] * D[f][:, b, b]))
        h = 1e-5 * np.maximum(scale, 1e-3)
        E = np.zeros((qk[f], qk[f]))
        E[a, b] = E[b, a] = 1.0
        plus = [Dk.copy() for Dk in D]
        minus = [Dk.copy() for Dk in D]
        plus[f] = plus[f] + h[:, None, None] * E
        minus[f] = minus[f] - h[:, None, None] * E
        ep = obj.evaluate(plus, data, sigma2=s2, grad=True)
        em = obj.evaluate(minus, data, sigma2=s2, grad=True)
        H[:, col, 1:] = (vech_grad(ep) - vech_grad(em)) / (2.0 * h[:, None])
        dC[:, col] = s2[:, None, None] * (ep.C - em.C) / (2.0 * h[:, None, None])
    H[:, 1:, 1:] = la.sym(H[:, 1:, 1:])
    H_phi, dC_phi, _ = _boundary_coordinates(H, dC, ev.grad, D, qk, free)
    D, ev = _newton_polish(obj, data, D, ev, H, free, vech_grad, vech_pos, qk)
    return dict(
        beta=ev.beta, sigma2=ev.sigma2, D=D, llh=ev.llh, converged=converged, n_iter=n_iter, ok=ok & ev.ok,
        cov_beta=ev.sigma2[:, None, None] * ev.C, cov_beta_grad=dC_phi, hessian=H_phi, free=free,
    )


RANK_TOL = 1e-12  # eigenvalues of D_k at or below this (times the largest) count as zero


def _snap_to_boundary(obj, data, D):
    """Set negligible eigenvalues of each D_k to exactly 0 where that costs no likelihood.

    Cholesky iterations only approach a singular optimum asymptotically; lme4 lands on it
    exactly, and inference needs to know which voxels are singular.
    """
    ev = obj.evaluate(D, data, grad=False)
    out = [Dk.copy() for Dk in D]
    for f, Dk in enumerate(D):
        w, U = np.linalg.eigh(la.sym(Dk))
        small = (w < 1e-5) | (w < 1e-6 * w[:, -1:])  # variance below 1e-5 σ² or 1e-6 of the largest
        small &= w > RANK_TOL * np.maximum(w[:, -1:], 1e-300)
        rows = np.flatnonzero(np.any(small, axis=1))
        if rows.size == 0:
            continue
        ws = np.where(small[rows], 0.0, np.maximum(w[rows], 0.0))
        trial = [Dj[rows].copy() for Dj in out]
        trial[f] = (U[rows] * ws[:, None, :]) @ np.swapaxes(U[rows], 1, 2)
        ev_t = obj.evaluate(trial, _take(data, rows, Dk.shape[0]), grad=False)
        good = ev_t.ok & (ev_t.llh >= ev.llh[rows] - 1e-10)
        out[f][rows[good]] = trial[f][good]
    return out


def _lower_cholesky(D: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of PSD (v, q, q) matrices, zero columns where a pivot vanishes."""
    v, q, _ = D.shape
    L = np.zeros_like(D)
    scale = np.maximum(np.max(np.abs(np.diagonal(D, axis1=1, axis2=2)), axis=1), 1e-300)
    for j in range(q):  # q is tiny; vectorised over voxels
        piv = D[:, j, j] - np.sum(L[:, j, :j] ** 2, axis=1)
        pos = piv > RANK_TOL * scale
        L[:, j, j] = np.where(pos, np.sqrt(np.where(pos, piv, 1.0)), 0.0)
        for i in range(j + 1, q):
            val = D[:, i, j] - np.sum(L[:, i, :j] * L[:, j, :j], axis=1)
            L[:, i, j] = np.where(pos, val / np.where(pos, L[:, j, j], 1.0), 0.0)
    return L


def _theta_coordinates(D: np.ndarray, G: np.ndarray):
    """lme4's θ (D = ΛΛ', Λ lower) as coordinates of a singular factor.

    Returns J = d vech(D)/dθ (v, q_u, q_u), the curvature term of the deviance Hessian
    Σ_m (∂dev/∂D_m) ∂²D_m/∂θ∂θ' (v, q_u, q_u), and which θ are live (their column of Λ is
    non-zero; the others have zero first derivatives and drop out, as in lmerTest).
    """
    v, q, _ = D.shape
    L = _lower_cholesky(D)
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


def _boundary_coordinates(H, dC, G_list, D, qk, free):
    """Re-express H and dCov in lme4's θ for singular factors (interior ones keep vech D).

    At an interior optimum the Satterthwaite df does not depend on the parametrisation;
    on the boundary it does, and lmerTest's is θ.
    """
    v, k, _ = H.shape
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
    if not np.any(singular_any):
        return H, dC, live
    Ht = np.swapaxes(T, 1, 2) @ H @ T + curv
    dCt = np.einsum("vij,vipq->vjpq", T, dC)
    dead = ~live
    Ht = np.where(dead[:, :, None] | dead[:, None, :], 0.0, Ht) + dead[:, :, None] * np.eye(k)
    dCt[dead] = 0.0
    return Ht, dCt, live


def _newton_polish(obj, data, D, ev, H, free, vech_grad, vech_pos, qk):
    """One Newton step on the profiled deviance with the observed Hessian already at hand.

    Scoring converges linearly; this squares the remaining error of interior parameters so
    that they, not just the log-likelihood, match an exact optimiser.  Singular factors are
    held; the step is kept only where it does not lower the log-likelihood and D stays PSD.
    """
    fd = free[:, 1:]
    use = np.any(fd, axis=1) & ev.ok
    if not np.any(use):
        return D, ev
    Hs, fd = H[use], fd[use]
    Hp = Hs[:, 1:, 1:] - Hs[:, 1:, :1] * Hs[:, :1, 1:] / Hs[:, :1, :1]  # σ² profiled out
    both = fd[:, :, None] & fd[:, None, :]
    Hp = np.where(both, Hp, 0.0) + np.where(fd, 0.0, 1.0)[:, :, None] * np.eye(Hp.shape[-1])
    g = np.where(fd, vech_grad(_subset_eval(ev, np.flatnonzero(use))), 0.0)
    try:
        step = -np.linalg.solve(Hp, g[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return D, ev
    rows = np.flatnonzero(use)
    trial, start = [], 0
    for f, (r, c) in enumerate(vech_pos):
        dv = np.zeros((rows.size, qk[f], qk[f]))
        dv[:, r, c] = step[:, start:start + r.size]
        dv[:, c, r] = step[:, start:start + r.size]
        trial.append(D[f][rows] + dv)
        start += r.size
    psd = np.ones(rows.size, bool)
    for Dt in trial:
        psd &= np.min(np.linalg.eigvalsh(Dt), axis=1) >= 0
    with np.errstate(invalid="ignore", divide="ignore"):  # non-PSD trials are rejected below
        ev_t = obj.evaluate(trial, _take(data, rows, D[0].shape[0]), grad=False)
    good = ev_t.ok & psd & np.isfinite(step).all(axis=1) & (ev_t.llh >= ev.llh[rows])
    if not np.any(good):
        return D, ev
    D = [Dk.copy() for Dk in D]
    for f in range(len(qk)):
        D[f][rows[good]] = trial[f][good]
    return D, obj.evaluate(D, data, grad=False)

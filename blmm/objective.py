"""The profiled (RE)ML objective of every voxel, evaluated from sufficient statistics.

For a given relative covariance D (per voxel), β̂ and σ̂² are profiled out in closed
form and the log-likelihood, its gradient in D and a Fisher information for D are
returned for all voxels at once.  Two structures implement it:

* `LevelObjective` — one random factor.  Z'Z is block diagonal with blocks G_j, and
  levels with identical G_j form a class that shares every voxel-dependent weight.
  Sums over levels become one dense matrix product over classes; large classes use
  pre-aggregated data sums, so a random intercept costs O(v p^3) per evaluation
  whatever the number of subjects.
* `DenseObjective` — any number of crossed or nested factors, with a dense q x q
  system per voxel (q = total Z columns).

Notation (docs/model.md): V = I + Z D Z', M = D(I + Z'Z D)^-1, R_j = (I + G_j D)^-1,
X_j = Z_j'X, y_j = Z_j'Y, S_j = Z_j'V^-1 X = R_j X_j, u_j = Z_j'V^-1 r, T_j = R_j G_j,
C = (X'V^-1 X)^-1.  The deviance is -2ℓ; its derivative in D_k is tr(G_k dD_k) with
G_k = Σ T_j - [REML] Σ S_j C S_j' - Σ u_j u_j' / σ².
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from blmm import linalg as la

LOG2PI = float(np.log(2.0 * np.pi))


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


def _gls(XtVX: np.ndarray, XtVY: np.ndarray):
    """β̂, C = (X'V^-1X)^-1, log|X'V^-1X| and a PD flag, by one Cholesky per voxel."""
    v, p, _ = XtVX.shape
    ok = np.all(np.isfinite(XtVX.reshape(v, -1)), axis=1)
    L = np.full_like(XtVX, np.nan)
    try:
        L[ok] = np.linalg.cholesky(XtVX[ok])
    except np.linalg.LinAlgError:
        for i in np.flatnonzero(ok):  # rare: find the voxels that are not PD
            try:
                L[i] = np.linalg.cholesky(XtVX[i])
            except np.linalg.LinAlgError:
                ok[i] = False
    eye = np.broadcast_to(np.eye(p), XtVX.shape)
    Linv = np.full_like(XtVX, np.nan)
    Linv[ok] = np.linalg.solve(L[ok], eye[ok])  # triangular: cheap and exact enough
    C = np.swapaxes(Linv, 1, 2) @ Linv
    beta = np.einsum("vij,vj->vi", C, XtVY)
    logdet = 2.0 * np.sum(np.log(np.abs(np.diagonal(L, axis1=1, axis2=2))), axis=1)
    return beta, C, logdet, ok


def _likelihood(Q, logdetV, logdetXVX, n, p, reml, sigma2=None):
    """Profiled (or at given σ²) log-likelihood with lme4's constants."""
    N = n - p if reml else n
    if sigma2 is None:
        sigma2 = Q / N
        llh = -0.5 * (N * (LOG2PI + np.log(sigma2)) + logdetV + N)
    else:
        llh = -0.5 * (N * (LOG2PI + np.log(sigma2)) + logdetV + Q / sigma2)
    if reml:
        llh = llh - 0.5 * logdetXVX
    return llh, sigma2


def _profiled(XtVX, XtVY, YtVY, logdetV, n, p, reml, sigma2) -> Evaluation:
    """β̂ (GLS), C, Q and the (RE)ML log-likelihood from the V⁻¹ products."""
    v = XtVX.shape[0]
    beta, C, logdetXVX, ok = _gls(XtVX, XtVY)
    Q = YtVY - np.einsum("vp,vp->v", beta, XtVY)
    llh, s2 = _likelihood(Q, logdetV, logdetXVX, n, p, reml, sigma2)
    ok &= np.isfinite(llh) & (Q > 0)
    return Evaluation(llh=llh, beta=beta, sigma2=np.broadcast_to(s2, (v,)).copy(), C=C, Q=Q, ok=ok)


class LevelObjective:
    """One random factor with q effects per level.

    Levels with identical Z_j'Z_j form a class sharing every voxel-dependent weight.
    Classes with many members ("big") use aggregated data sums; the others are kept
    level by level ("units" = big classes + remaining levels).  Per-unit q x q
    quantities are stored entry by entry as contiguous (v, units) arrays, because
    numpy is slow on stacks of tiny matrices.
    """

    def __init__(self, XtX, ZtX, ZtZ, n, q, reml, big_class_min=None):
        p = XtX.shape[0]
        L_all = ZtX.shape[0] // q
        G_all = _diag_blocks(sp.csr_matrix(ZtZ), L_all, q)
        Xl_all = ZtX.reshape(L_all, q, p)
        present = np.any(G_all.reshape(L_all, -1) != 0, axis=1)  # levels with no rows drop out
        self.level_index = np.flatnonzero(present)
        G, Xl = G_all[present], Xl_all[present]
        Lp = G.shape[0]
        keys = np.ascontiguousarray(G.reshape(Lp, q * q))
        _, cls, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        cls = cls.reshape(-1)
        threshold = q * p if big_class_min is None else big_class_min
        big_classes = np.flatnonzero(counts >= threshold)
        in_big = np.isin(cls, big_classes)
        self.small_levels = np.flatnonzero(~in_big)
        self.big_members = [np.flatnonzero(cls == c) for c in big_classes]
        self.Cb, self.Ls = big_classes.size, self.small_levels.size
        self.C = self.Cb + self.Ls
        self.n, self.p, self.q, self.reml = int(n), p, q, bool(reml)
        self.XtX = XtX
        self.XtX_up = la.pack_sym(XtX)
        # per unit: G, member count, and K^{ab} = Σ_members X_j[a]' X_j[b] as symmetric pairs
        Gu = np.concatenate([np.stack([G[mem[0]] for mem in self.big_members]).reshape(-1, q, q),
                             G[self.small_levels]]) if self.Cb else G[self.small_levels]
        self.mu = np.concatenate([counts[big_classes], np.ones(self.Ls)]).astype(np.float64)
        self.g = [[np.ascontiguousarray(Gu[:, a, b]) for b in range(q)] for a in range(q)]
        self.pairs = list(zip(*np.triu_indices(q)))
        self.pair_mult = np.array([1.0 if a == b else 2.0 for a, b in self.pairs])
        r, s = la.upper_pairs(p)
        self.Kpair_big = []
        Kf = []
        Xsm = Xl[self.small_levels]
        for a, b in self.pairs:
            # a big class's sum is one small GEMM; only the remaining levels need their own terms
            Kbig = np.zeros((self.Cb, p, p))
            for i, mem in enumerate(self.big_members):
                Kbig[i] = Xl[mem, a].T @ Xl[mem, b]
            Kl = np.einsum("jr,js->jrs", Xsm[:, a], Xsm[:, b])
            if a != b:
                Kbig = Kbig + np.swapaxes(Kbig, 1, 2)
                Kl = Kl + np.swapaxes(Kl, 1, 2)
            self.Kpair_big.append(Kbig)
            Kf.append(np.ascontiguousarray(np.concatenate([Kbig[:, r, s], Kl[:, r, s]])))  # (C, p(p+1)/2)
        self.Kf = Kf
        self.Xs = [np.ascontiguousarray(Xl[self.small_levels, a]) for a in range(q)]  # (Ls, p)
        self.Xl = Xl

    def data(self, XtY, ZtY, YtY) -> "LevelData":
        """Per-voxel data sums arranged for this objective (ZtY is (v, L*q))."""
        v = XtY.shape[0]
        q, p = self.q, self.p
        yl = ZtY.reshape(v, -1, q)[:, self.level_index]  # (v, Lp, q)
        ys = [np.ascontiguousarray(yl[:, self.small_levels, a]) for a in range(q)]
        npair = len(self.pairs)
        KXY = np.zeros((v, self.Cb, npair, p))
        KYY = np.zeros((v, self.Cb, npair))
        for i, mem in enumerate(self.big_members):  # few big classes: one GEMM each
            Xm, ym = self.Xl[mem], yl[:, mem]
            for k, (a, b) in enumerate(self.pairs):
                KXY[:, i, k] = ym[:, :, b] @ Xm[:, a, :]
                KYY[:, i, k] = np.einsum("vm,vm->v", ym[:, :, a], ym[:, :, b])
                if a != b:
                    KXY[:, i, k] += ym[:, :, a] @ Xm[:, b, :]
        return LevelData(XtY=np.ascontiguousarray(XtY), YtY=np.asarray(YtY, dtype=np.float64), ys=ys, KXY=KXY, KYY=KYY)

    def products(self, D: np.ndarray, data: "LevelData"):
        """X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| at D (v, q, q), plus the per-unit weights."""
        v = D.shape[0]
        p, q, Cb = self.p, self.q, self.Cb
        d = [[D[:, a, b][:, None] for b in range(q)] for a in range(q)]
        A = [[sum(self.g[a][e] * d[e][b] for e in range(q)) + (1.0 if a == b else 0.0)
              for b in range(q)] for a in range(q)]  # I + G_c D
        R = _inv_entries(A)
        W = {}
        for a, b in self.pairs:  # D R is symmetric; average both products for accuracy
            w = sum(d[a][e] * R[e][b] for e in range(q))
            if a != b:
                w = 0.5 * (w + sum(d[b][e] * R[e][a] for e in range(q)))
            W[a, b] = w
        logdetV = _logdet_entries(A) @ self.mu
        XtVX_up = np.broadcast_to(self.XtX_up, (v, self.XtX_up.size)).copy()
        for k, ab in enumerate(self.pairs):
            XtVX_up -= W[ab] @ self.Kf[k]
        XtVX = la.unpack_sym(XtVX_up, p)
        XtVY = data.XtY.copy()
        YtVY = data.YtY.copy()
        if Cb:
            Wb = np.stack([W[ab][:, :Cb] for ab in self.pairs], axis=-1)  # (v, Cb, npair)
            XtVY -= np.einsum("vck,vckp->vp", Wb, data.KXY)
            # KYY holds Σ y_a y_b once per pair; y'Wy needs both (a, b) and (b, a) off the diagonal
            YtVY -= np.einsum("vck,vck,k->v", Wb, data.KYY, self.pair_mult)
        if self.Ls:
            def Ws(a, b):
                return W[min(a, b), max(a, b)][:, Cb:]
            for a in range(q):
                wy = sum(Ws(a, b) * data.ys[b] for b in range(q))
                XtVY -= wy @ self.Xs[a]
                YtVY -= np.einsum("vj,vj->v", wy, data.ys[a])
        return XtVX, XtVY, YtVY, logdetV, R

    def gradient_parts(self, R, data: "LevelData", gamma: np.ndarray, Omega: np.ndarray | None,
                       with_info: bool = True):
        """Σ_j T_j, Σ_j u_j u_j' with u_j = R_j(y_j - X_j γ), Σ_j R_j X_j Ω X_j' R_j', and the information.

        With γ = β̂ and Ω = C (REML) these give the deviance gradient; a caller that augments
        X with other factors' columns passes its own γ and Ω (SchurObjective).
        """
        v = gamma.shape[0]
        q, Cb = self.q, self.Cb
        T = {}
        for a, b in self.pairs:  # T_c = R_c G_c (symmetric)
            t = sum(R[a][e] * self.g[e][b] for e in range(q))
            if a != b:
                t = 0.5 * (t + sum(R[b][e] * self.g[e][a] for e in range(q)))
            T[a, b] = t

        def Tf(a, b):
            return T[min(a, b), max(a, b)]

        T_sum = _entries_to_matrix({ab: T[ab] @ self.mu for ab in self.pairs}, q, v)
        uu = np.zeros((v, q, q))
        if Cb:
            Rb = np.stack([np.stack([R[a][b][:, :Cb] for b in range(q)], -1) for a in range(q)], -2)
            bKb = np.stack([np.einsum("vr,crs,vs->vc", gamma, K, gamma) for K in self.Kpair_big], -1)
            bKy = np.einsum("vp,vckp->vck", gamma, data.KXY)
            diag = np.array([a == b for a, b in self.pairs])
            Spair = data.KYY - np.where(diag, 2.0, 1.0) * bKy + np.where(diag, 1.0, 0.5) * bKb
            S = _pairs_to_matrix(Spair, self.pairs, q)
            uu += np.einsum("vcab,vcbd,vced->vae", Rb, S, Rb, optimize=True)
        if self.Ls:
            r = [data.ys[b] - gamma @ self.Xs[b].T for b in range(q)]
            u = [sum(R[a][b][:, Cb:] * r[b] for b in range(q)) for a in range(q)]
            for a, b in self.pairs:
                uu[:, a, b] += np.einsum("vj,vj->v", u[a], u[b])
                if a != b:
                    uu[:, b, a] = uu[:, a, b]
        corr = np.zeros((v, q, q))
        if Omega is not None:
            cvec = la.pack_sym(Omega, double_offdiag=True)
            H = {}
            for k, (a, b) in enumerate(self.pairs):  # H_c[a,b] = <K_c^{ab}, Ω>
                H[a, b] = (cvec @ self.Kf[k].T) * (1.0 if a == b else 0.5)

            def Hf(a, b):
                return H[min(a, b), max(a, b)]
            RH = [[sum(R[a][e] * Hf(e, f) for e in range(q)) for f in range(q)] for a in range(q)]
            for a, b in self.pairs:  # Σ_c R_c H_c R_c'
                val = sum(np.einsum("vc,vc->v", RH[a][f], R[b][f]) for f in range(q))
                corr[:, a, b] = val
                corr[:, b, a] = val
        if not with_info:  # NestedObjective reduces the information itself
            return T_sum, uu, corr, None
        info = np.empty((v, q, q, q, q))
        for a in range(q):  # F[(a,b),(c,d)] = Σ_c m_c T[b,c] T[a,d]
            for b in range(q):
                for c in range(q):
                    for e in range(q):
                        info[:, a, b, c, e] = (Tf(b, c) * Tf(a, e)) @ self.mu
        return T_sum, uu, corr, info.reshape(v, q * q, q * q)

    def evaluate(self, D_list, data: "LevelData", sigma2=None, grad=False) -> Evaluation:
        XtVX, XtVY, YtVY, logdetV, R = self.products(D_list[0], data)
        ev = _profiled(XtVX, XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        beta, C = ev.beta, ev.C
        if not grad:
            return ev
        T_sum, uu, corr, info = self.gradient_parts(R, data, beta, C if self.reml else None)
        ev.grad = [la.sym(T_sum - corr - uu / ev.sigma2[:, None, None])]
        ev.info = info
        ev.T_sum = [T_sum]
        ev.uu_sum = [uu]
        return ev


def _inv_entries(A):
    """Inverse of q x q matrices given entry-wise (lists of arrays)."""
    q = len(A)
    if q == 1:
        return [[1.0 / A[0][0]]]
    if q == 2:
        det = A[0][0] * A[1][1] - A[0][1] * A[1][0]
        return [[A[1][1] / det, -A[0][1] / det], [-A[1][0] / det, A[0][0] / det]]
    fast = _gauss_jordan_entries(A)
    if fast is not None:
        return fast[0]
    M = np.stack([np.stack(row, -1) for row in A], -2)
    Mi = np.linalg.inv(M)
    return [[Mi[..., a, b] for b in range(q)] for a in range(q)]


def _logdet_entries(A):
    q = len(A)
    if q == 1:
        return np.log(A[0][0])
    if q == 2:
        return np.log(A[0][0] * A[1][1] - A[0][1] * A[1][0])
    fast = _gauss_jordan_entries(A)
    if fast is not None:
        return fast[1]
    M = np.stack([np.stack(row, -1) for row in A], -2)
    sign, logdet = np.linalg.slogdet(M)
    return np.where(sign > 0, logdet, np.nan)


_GJ_LAST = threading.local()  # products() asks for the inverse and the log det of the same A


def _gauss_jordan_entries(A):
    """(inverse entries, log det) of small q x q matrices given entry-wise, by in-place
    Gauss-Jordan elimination vectorised over the entry arrays (batched LAPACK on tiny
    matrices is ~50x slower); None if a pivot is small, and the caller falls back to LAPACK."""
    last = getattr(_GJ_LAST, "value", None)
    if last is not None and last[0] is A:
        return last[1]
    q = len(A)
    shape = np.broadcast_shapes(*[np.shape(a) for row in A for a in row])
    M = [[np.broadcast_to(np.asarray(A[i][j], dtype=np.float64), shape) for j in range(q)] for i in range(q)]
    logdet = np.zeros(shape)
    sign = np.ones(shape)
    out = None
    for k in range(q):
        piv = M[k][k]
        scale = np.maximum(np.max(np.abs(np.stack(M[k])), axis=0), 1e-300)
        if np.any(np.abs(piv) < 1e-8 * scale):
            break
        logdet = logdet + np.log(np.abs(piv))
        sign = sign * np.sign(piv)
        inv_piv = 1.0 / piv
        rowk = [m * inv_piv for m in M[k]]
        rowk[k] = inv_piv
        for i in range(q):
            if i != k:
                f = M[i][k]
                M[i] = [(-f * inv_piv) if j == k else M[i][j] - f * rowk[j] for j in range(q)]
        M[k] = rowk
    else:
        out = (M, np.where(sign > 0, logdet, np.nan))
    _GJ_LAST.value = (A, out)
    return out


def _entries_to_matrix(entries, q, v):
    out = np.empty((v, q, q))
    for (a, b), val in entries.items():
        out[:, a, b] = val
        out[:, b, a] = val
    return out


def _pairs_to_matrix(Spair, pairs, q):
    out = np.zeros(Spair.shape[:-1] + (q, q))
    for k, (a, b) in enumerate(pairs):
        out[..., a, b] = Spair[..., k]
        out[..., b, a] = Spair[..., k]
    return out


@dataclass
class LevelData:
    XtY: np.ndarray
    YtY: np.ndarray
    ys: list  # per effect a: (v, small levels)
    KXY: np.ndarray
    KYY: np.ndarray

    def take(self, idx) -> "LevelData":
        return LevelData(self.XtY[idx], self.YtY[idx], [y[idx] for y in self.ys], self.KXY[idx], self.KYY[idx])


def _level_block_sum(A: np.ndarray, offset: int, n_levels: int, q: int) -> np.ndarray:
    """Σ over a factor's levels of the diagonal q x q blocks of (v, Q, Q) matrices."""
    v = A.shape[0]
    blk = A[:, offset:offset + n_levels * q, offset:offset + n_levels * q].reshape(v, n_levels, q, n_levels, q)
    return np.einsum("vjajb->vab", blk)


def _factor_pair_information(T: np.ndarray, offsets, n_levels, qs) -> np.ndarray:
    """Expected information blocks between factors from T = Z'V⁻¹Z (v, Q, Q), vec order.

    F[(k,a,b),(k',c,d)] = Σ_{i in k, j in k'} T[(i,b),(j,c)] T[(i,a),(j,d)].
    """
    v = T.shape[0]
    sizes = [q * q for q in qs]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    info = np.zeros((v, starts[-1], starts[-1]))
    for k, (o1, l1, q1) in enumerate(zip(offsets, n_levels, qs)):
        for k2, (o2, l2, q2) in enumerate(zip(offsets, n_levels, qs)):
            T4 = T[:, o1:o1 + l1 * q1, o2:o2 + l2 * q2].reshape(v, l1, q1, l2, q2)
            blk = np.einsum("vibjc,viajd->vabcd", T4, T4).reshape(v, q1 * q1, q2 * q2)
            info[:, starts[k]:starts[k + 1], starts[k2]:starts[k2 + 1]] = blk
    return info


def _diag_blocks(ZtZ: sp.csr_matrix, L: int, q: int) -> np.ndarray:
    """The L diagonal q x q blocks of a block-diagonal sparse matrix."""
    coo = ZtZ.tocoo()
    keep = (coo.row // q) == (coo.col // q)
    G = np.zeros((L, q, q))
    np.add.at(G, (coo.row[keep] // q, coo.row[keep] % q, coo.col[keep] % q), coo.data[keep])
    return G


@dataclass
class DenseData:
    XtY: np.ndarray
    ZtY: np.ndarray
    YtY: np.ndarray

    def take(self, idx) -> "DenseData":
        return DenseData(self.XtY[idx], self.ZtY[idx], self.YtY[idx])


class DenseObjective:
    """Any number of factors: a dense q x q system per voxel (q = all Z columns)."""

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml):
        self.XtX = XtX
        self.ZtX = ZtX
        self.ZtZ = np.asarray(sp.csr_matrix(ZtZ).todense())
        self.n, self.p, self.reml = int(n), XtX.shape[0], bool(reml)
        self.offsets = layout.offsets
        self.n_levels = layout.n_levels
        self.qk = layout.q
        self.qtot = layout.n_columns

    def data(self, XtY, ZtY, YtY) -> DenseData:
        return DenseData(np.ascontiguousarray(XtY), np.ascontiguousarray(ZtY), np.asarray(YtY))

    def _blockdiag(self, blocks):
        """Block-diagonal (v, q, q) from per-factor (v, q_k, q_k), repeated over levels."""
        v = blocks[0].shape[0]
        out = np.zeros((v, self.qtot, self.qtot))
        for k, B in enumerate(blocks):
            o, l, qk = self.offsets[k], self.n_levels[k], self.qk[k]
            view = out[:, o:o + l * qk, o:o + l * qk].reshape(v, l, qk, l, qk)
            idx = np.arange(l)
            view[:, idx, :, idx, :] = B[None]  # advanced indexing puts levels first
        return out

    def _factor_sum(self, A, k):
        return _level_block_sum(A, self.offsets[k], self.n_levels[k], self.qk[k])

    def evaluate(self, D_list, data: DenseData, sigma2=None, grad=False) -> Evaluation:
        Lam = self._blockdiag([la.psd_root(D) for D in D_list])  # Λ Λ' = D
        LtZtZ = np.swapaxes(Lam, 1, 2) @ self.ZtZ  # Λ'Z'Z
        Mt = np.eye(self.qtot) + LtZtZ @ Lam
        try:
            Lm = np.linalg.cholesky(Mt)
        except np.linalg.LinAlgError:
            Lm = np.linalg.cholesky(Mt + 1e-12 * np.eye(self.qtot))
        logdetV = 2.0 * np.sum(np.log(np.diagonal(Lm, axis1=1, axis2=2)), axis=1)
        Bx = np.linalg.solve(Lm, np.swapaxes(Lam, 1, 2) @ self.ZtX)  # L^-1 Λ'Z'X
        by = np.linalg.solve(Lm, np.einsum("vba,vb->va", Lam, data.ZtY)[..., None])[..., 0]
        XtVX = self.XtX[None] - np.swapaxes(Bx, 1, 2) @ Bx
        XtVY = data.XtY - np.einsum("vqp,vq->vp", Bx, by)
        YtVY = data.YtY - np.einsum("vq,vq->v", by, by)
        ev = _profiled(la.sym(XtVX), XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        beta, C = ev.beta, ev.C
        if not grad:
            return ev
        Bz = np.linalg.solve(Lm, LtZtZ)  # L^-1 Λ'Z'Z
        T = la.sym(self.ZtZ[None] - np.swapaxes(Bz, 1, 2) @ Bz)  # Z'V^-1Z
        S = self.ZtX[None] - np.swapaxes(Bz, 1, 2) @ Bx  # Z'V^-1X
        r_z = data.ZtY - np.einsum("qp,vp->vq", self.ZtX, beta)
        r_b = by - np.einsum("vqp,vp->vq", Bx, beta)
        u = r_z - np.einsum("vaq,va->vq", Bz, r_b)  # Z'V^-1 r
        s2v = ev.sigma2
        Gfull = T - u[:, :, None] * u[:, None, :] / s2v[:, None, None]
        if self.reml:
            Gfull = Gfull - S @ C @ np.swapaxes(S, 1, 2)
        ev.grad = [la.sym(self._factor_sum(Gfull, k)) for k in range(len(D_list))]
        ev.T_sum = [self._factor_sum(T, k) for k in range(len(D_list))]
        uu = u[:, :, None] * u[:, None, :]
        ev.uu_sum = [self._factor_sum(uu, k) for k in range(len(D_list))]
        ev.info = _factor_pair_information(T, self.offsets[:-1], self.n_levels, self.qk)
        return ev


@dataclass
class SchurData:
    level: LevelData  # the big factor's data, with X augmented by the small factors' Z columns
    ZRtY: np.ndarray  # (v, q_R)
    XtY: np.ndarray  # (v, p), for resms and the voxel count

    def take(self, idx) -> "SchurData":
        return SchurData(self.level.take(idx), self.ZRtY[idx], self.XtY[idx])


class SchurObjective:
    """Several factors, one of them with many levels (e.g. subjects) and the rest small (e.g. sites).

    The big factor k1 is eliminated level by level: with V₁ = I + Z₁D₁Z₁', every product
    U'V₁⁻¹U of the augmented design U = [X, Z_R] comes from the level/class machinery of
    `LevelObjective` (the small factors' columns Z_R ride along with X).  A second Woodbury
    step over the q_R small-factor columns gives V⁻¹, so the dense part is q_R x q_R per
    voxel instead of q x q.  The big factor's gradient is LevelObjective's with β replaced
    by γ = [β; b̃] and C by Ω = E_R S E_R' + B C B' (docs/model.md).
    """

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, big: int | None = None):
        ZtZ = sp.csr_matrix(ZtZ)
        self.n, self.p, self.reml = int(n), XtX.shape[0], bool(reml)
        self.qk = layout.q
        nlev = layout.n_levels
        self.big = int(np.argmax(nlev)) if big is None else big
        off = layout.offsets
        big_cols = np.arange(off[self.big], off[self.big + 1])
        small_cols = np.concatenate([np.arange(off[k], off[k + 1]) for k in range(len(self.qk)) if k != self.big])
        self.small = [k for k in range(len(self.qk)) if k != self.big]
        self.big_cols, self.small_cols = big_cols, small_cols
        self.qR = small_cols.size
        p, qR = self.p, self.qR
        ZRtX = ZtX[small_cols]
        ZRtZR = np.asarray(ZtZ[small_cols][:, small_cols].todense())
        UtU = np.block([[XtX, ZRtX.T], [ZRtX, ZRtZR]])
        Z1tU = np.hstack([ZtX[big_cols], np.asarray(ZtZ[big_cols][:, small_cols].todense())])
        self.level = LevelObjective(UtU, Z1tU, ZtZ[big_cols][:, big_cols], n, self.qk[self.big], reml)
        # offsets of the small factors inside the q_R block (level-major per factor, as Z)
        self.small_offsets = np.concatenate([[0], np.cumsum([nlev[k] * self.qk[k] for k in self.small])])
        self.small_levels = [nlev[k] for k in self.small]
        self.small_q = [self.qk[k] for k in self.small]
        self.eye_p = np.eye(p)
        del qR

    def data(self, XtY, ZtY, YtY) -> SchurData:
        UtY = np.hstack([XtY, ZtY[:, self.small_cols]])
        return SchurData(self.level.data(UtY, ZtY[:, self.big_cols], YtY),
                         np.ascontiguousarray(ZtY[:, self.small_cols]), np.ascontiguousarray(XtY))

    def _small_blockdiag(self, D_list):
        v = D_list[0].shape[0]
        out = np.zeros((v, self.qR, self.qR))
        for i, k in enumerate(self.small):
            o, lk, qk = self.small_offsets[i], self.small_levels[i], self.small_q[i]
            root = la.psd_root(D_list[k])
            for j in range(lk):  # few levels (small factors): a handful of block copies
                out[:, o + j * qk:o + (j + 1) * qk, o + j * qk:o + (j + 1) * qk] = root
        return out

    def _small_factor_sum(self, A, i):
        return _level_block_sum(A, self.small_offsets[i], self.small_levels[i], self.small_q[i])

    def evaluate(self, D_list, data: SchurData, sigma2=None, grad=False) -> Evaluation:
        v = D_list[0].shape[0]
        p, qR = self.p, self.qR
        UVU, UVY, YVY1, logdetV1, R = self.level.products(D_list[self.big], data.level)
        A_XX, A_XR, A_RR = UVU[:, :p, :p], UVU[:, :p, p:], la.sym(UVU[:, p:, p:])
        a_XY, a_RY = UVY[:, :p], UVY[:, p:]
        Lam = self._small_blockdiag(D_list)  # Λ Λ' = D_R
        Mt = np.eye(qR) + np.swapaxes(Lam, 1, 2) @ A_RR @ Lam
        Lm = np.linalg.cholesky(la.sym(Mt))
        logdetV = logdetV1 + 2.0 * np.sum(np.log(np.diagonal(Lm, axis1=1, axis2=2)), axis=1)
        LiLt = np.linalg.solve(Lm, np.swapaxes(Lam, 1, 2))  # L⁻¹Λ'
        Bx = LiLt @ np.swapaxes(A_XR, 1, 2)
        by = np.einsum("vab,vb->va", LiLt, a_RY)
        XtVX = la.sym(A_XX - np.swapaxes(Bx, 1, 2) @ Bx)
        XtVY = a_XY - np.einsum("vqp,vq->vp", Bx, by)
        YtVY = YVY1 - np.einsum("vq,vq->v", by, by)
        ev = _profiled(XtVX, XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        beta, C = ev.beta, ev.C
        if not grad:
            return ev
        S = np.swapaxes(LiLt, 1, 2) @ LiLt  # Λ M⁻¹ Λ'
        rR = a_RY - np.einsum("vpq,vp->vq", A_XR, beta)  # Z_R'V₁⁻¹ r
        b_tilde = np.einsum("vab,vb->va", S, rR)
        gamma = np.concatenate([beta, b_tilde], axis=1)
        SA = S @ np.swapaxes(A_XR, 1, 2)  # S Z_R'V₁⁻¹X
        Omega = np.zeros((v, p + qR, p + qR))
        Omega[:, p:, p:] = S
        if self.reml:
            B = np.concatenate([np.broadcast_to(self.eye_p, (v, p, p)), -SA], axis=1)
            Omega += B @ C @ np.swapaxes(B, 1, 2)
        T1, uu1, corr1, info1 = self.level.gradient_parts(R, data.level, gamma, la.sym(Omega))
        s2v = ev.sigma2
        G1 = la.sym(T1 - corr1 - uu1 / s2v[:, None, None])
        IAS = np.eye(qR) - A_RR @ S  # Z_R'V⁻¹ = (I - A S) Z_R'V₁⁻¹
        TR = la.sym(IAS @ A_RR)  # Z_R'V⁻¹Z_R
        uR = np.einsum("vab,vb->va", IAS, rR)
        PR = TR.copy()
        if self.reml:
            ZVX = IAS @ np.swapaxes(A_XR, 1, 2)
            PR = PR - ZVX @ C @ np.swapaxes(ZVX, 1, 2)
        GR = PR - uR[:, :, None] * uR[:, None, :] / s2v[:, None, None]
        grads, T_sums, uus = [None] * len(self.qk), [None] * len(self.qk), [None] * len(self.qk)
        grads[self.big], T_sums[self.big], uus[self.big] = G1, T1, uu1
        uuR = uR[:, :, None] * uR[:, None, :]
        for i, k in enumerate(self.small):
            grads[k] = la.sym(self._small_factor_sum(GR, i))
            T_sums[k] = self._small_factor_sum(TR, i)
            uus[k] = self._small_factor_sum(uuR, i)
        ev.grad, ev.T_sum, ev.uu_sum = grads, T_sums, uus
        # expected information: the big factor's from V₁, the small factors' from V (no cross terms)
        sizes = [q * q for q in self.qk]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        info = np.zeros((v, starts[-1], starts[-1]))
        b0 = starts[self.big]
        info[:, b0:b0 + sizes[self.big], b0:b0 + sizes[self.big]] = info1
        small_info = _factor_pair_information(TR, self.small_offsets[:-1], self.small_levels, self.small_q)
        small_starts = np.concatenate([[0], np.cumsum([q * q for q in self.small_q])]).astype(int)
        for i, k in enumerate(self.small):
            for i2, k2 in enumerate(self.small):
                info[:, starts[k]:starts[k + 1], starts[k2]:starts[k2 + 1]] = \
                    small_info[:, small_starts[i]:small_starts[i + 1], small_starts[i2]:small_starts[i2 + 1]]
        ev.info = info
        return ev

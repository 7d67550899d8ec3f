"""One random factor: levels grouped into classes of identical Z_j'Z_j (docs/model.md).

Z'Z is block diagonal with blocks G_j, and levels with identical G_j form a class that
shares every voxel-dependent weight.  Sums over levels become one dense matrix product
over classes; large classes use pre-aggregated data sums, so a random intercept costs
O(v p^3) per evaluation whatever the number of subjects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core import linalg as la
from blmm.core.level_classes import LevelClasses, class_aggregates, symmetric_cross
from blmm.core.objective.base import Evaluation, array_bytes, diag_blocks, no_units, profiled
from blmm.core.objective.levels_q2 import LevelsQ2Kernel

class LevelObjective:
    """One random factor with q effects per level.

    Levels with identical Z_j'Z_j form a class sharing every voxel-dependent weight.
    Classes with many members ("big") use aggregated data sums; the others are kept
    level by level ("units" = big classes + remaining levels).  Per-unit q x q
    quantities are stored entry by entry as contiguous (v, units) arrays, because
    numpy is slow on stacks of tiny matrices.
    """

    def __init__(self, XtX, ZtX, ZtZ, n, q, reml, big_class_min=None, classes: LevelClasses | None = None):
        p = XtX.shape[0]
        L_all = ZtX.shape[0] // q
        G_all = diag_blocks(sp.csr_matrix(ZtZ), L_all, q)
        # given classes: any partition into equal G_j is exact (a pattern's: `LevelClasses.without_levels`)
        self.classes = LevelClasses.from_blocks(G_all, p, big_class_min) if classes is None else classes
        self.level_index = self.classes.level_index  # levels with no rows drop out
        G, Xl = G_all[self.level_index], ZtX.reshape(L_all, q, p)[self.level_index]
        self.small_levels = self.classes.small_levels
        self.big_members = list(self.classes.big_members)
        self.Cb, self.Ls = self.classes.n_big, self.small_levels.size
        self.C = self.Cb + self.Ls
        self.n, self.p, self.q, self.reml = int(n), p, q, bool(reml)
        self.XtX = XtX
        self.XtX_up = la.pack_sym(XtX)
        # per unit: G, member count, and K^{ab} = Σ_members X_j[a]' X_j[b] as symmetric pairs
        Gu = np.concatenate([np.stack([G[mem[0]] for mem in self.big_members]).reshape(-1, q, q),
                             G[self.small_levels]]) if self.Cb else G[self.small_levels]
        self.mu = np.concatenate([self.classes.big_counts, np.ones(self.Ls)]).astype(np.float64)
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
        # K'(p(p+1)/2, units): OpenBLAS runs K' @ W' about 3x faster than W @ K for these shapes
        self.KfT = [np.ascontiguousarray(K.T) for K in Kf]
        # ordered K_c[e,f] = Σ_members X_j[e]' X_j[f] of big classes (the analytic Hessian needs them unsymmetrised)
        self.Ko = np.zeros((self.Cb, q, q, p, p))
        for i, mem in enumerate(self.big_members):
            for e in range(q):
                for f in range(q):
                    self.Ko[i, e, f] = Xl[mem, e].T @ Xl[mem, f]
        self.Xs = [np.ascontiguousarray(Xl[self.small_levels, a]) for a in range(q)]  # (Ls, p)
        self.Xl = Xl
        # q = 2 with every level its own unit (irregular slopes): closed forms, fused passes (numpy arrays)
        self.q2 = (LevelsQ2Kernel(self.g[0][0], self.g[0][1], self.g[1][1], self.KfT, self.Xs, self.XtX_up, p)
                   if q == 2 and self.Cb == 0 else None)

    missing_rows = False
    has_deviance_hessian = True

    def per_voxel_bytes(self) -> int:
        """Working memory per voxel of one evaluation with its gradient (for block sizing)."""
        return 8 * (16 * self.C * self.q ** 2 + self.Cb * len(self.pairs) * (self.p + 1))

    def held_bytes(self) -> int:
        return array_bytes(self.XtX, self.XtX_up, self.level_index, self.small_levels, self.big_members, self.mu,
                           self.g, self.pair_mult, self.Kpair_big, self.Kf, self.KfT, self.Ko, self.Xs, self.Xl,
                           [] if self.q2 is None else self.q2.held_arrays())

    def data(self, XtY, ZtY, YtY, units=None) -> "LevelData":
        """Per-voxel data sums arranged for this objective (ZtY is (v, L*q))."""
        no_units(self, units)
        v = XtY.shape[0]
        yl = ZtY.reshape(v, -1, self.q)[:, self.level_index]  # (v, Lp, q)
        KXYo, KYY = class_aggregates(self.classes, self.Xl, yl)
        return self.data_from_sums(XtY, YtY, KXYo, KYY, yl[:, self.small_levels])

    def data_from_sums(self, XtY, YtY, KXYo, KYY, y_small) -> "LevelData":
        """LevelData from the class aggregates (`class_aggregates`) and the small levels' y_j (v, Ls, q)."""
        ys = [np.ascontiguousarray(y_small[:, :, a]) for a in range(self.q)]
        return LevelData(XtY=np.ascontiguousarray(XtY), YtY=np.asarray(YtY, dtype=np.float64), ys=ys,
                         KXY=symmetric_cross(KXYo), KYY=KYY, KXYo=KXYo)

    def products(self, D: np.ndarray, data: "LevelData"):
        """X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| at D (v, q, q), plus the per-unit weights."""
        xp = la.namespace(D, data.XtY)
        v = D.shape[0]
        p, q, Cb = self.p, self.q, self.Cb
        d = [[D[:, a, b][:, None] for b in range(q)] for a in range(q)]
        A = [[sum(self.g[a][e] * d[e][b] for e in range(q)) + (1.0 if a == b else 0.0)
              for b in range(q)] for a in range(q)]  # I + G_c D
        R, logdetA = _inverse_and_logdet_entries(A)
        W = {}
        for a, b in self.pairs:  # D R is symmetric; average both products for accuracy
            w = sum(d[a][e] * R[e][b] for e in range(q))
            if a != b:
                w = 0.5 * (w + sum(d[b][e] * R[e][a] for e in range(q)))
            W[a, b] = w
        logdetV = logdetA @ self.mu
        XtVX_upT = xp.repeat(self.XtX_up[:, None], v, axis=1)
        for k, ab in enumerate(self.pairs):
            XtVX_upT -= self.KfT[k] @ W[ab].T
        XtVX = la.unpack_sym(XtVX_upT.T, p)
        XtVY = xp.asarray(data.XtY, copy=True)
        YtVY = xp.asarray(data.YtY, copy=True)
        if Cb:
            Wb = xp.stack([W[ab][:, :Cb] for ab in self.pairs], axis=-1)  # (v, Cb, npair)
            XtVY -= la.einsum(xp, "vck,vckp->vp", Wb, data.KXY)
            # KYY holds Σ y_a y_b once per pair; y'Wy needs both (a, b) and (b, a) off the diagonal
            YtVY -= la.einsum(xp, "vck,vck,k->v", Wb, data.KYY, self.pair_mult)
        if self.Ls:
            def Ws(a, b):
                return W[min(a, b), max(a, b)][:, Cb:]
            for a in range(q):
                wy = sum(Ws(a, b) * data.ys[b] for b in range(q))
                XtVY -= wy @ self.Xs[a]
                YtVY -= la.einsum(xp, "vj,vj->v", wy, data.ys[a])
        return XtVX, XtVY, YtVY, logdetV, R

    def unit_T(self, R) -> dict:
        """T_c = R_c G_c per unit (symmetric), as entries {(a, b): (v, units)} for a <= b."""
        q = self.q
        T = {}
        for a, b in self.pairs:
            t = sum(R[a][e] * self.g[e][b] for e in range(q))
            if a != b:
                t = 0.5 * (t + sum(R[b][e] * self.g[e][a] for e in range(q)))
            T[a, b] = t
        return T

    def unit_uu(self, R, data: "LevelData", gamma: np.ndarray):
        """Σ_{j in class} u_j u_j' per big class (v, Cb, q, q) and u_j per small level [(v, Ls)] * q."""
        xp = la.namespace(gamma)
        q, Cb = self.q, self.Cb
        U_big, u_small = None, None
        if Cb:
            Rb = xp.stack([xp.stack([R[a][b][:, :Cb] for b in range(q)], axis=-1) for a in range(q)], axis=-2)
            bKb = xp.stack([class_quadratic_forms(xp, gamma, K) for K in self.Kpair_big], axis=-1)
            bKy = la.einsum(xp, "vp,vckp->vck", gamma, data.KXY)
            diag = np.array([a == b for a, b in self.pairs])
            Spair = (data.KYY - la.from_host(xp, np.where(diag, 2.0, 1.0), la.device_of(bKy)) * bKy
                     + la.from_host(xp, np.where(diag, 1.0, 0.5), la.device_of(bKb)) * bKb)
            S = _pairs_to_matrix(Spair, self.pairs, q)
            U_big = la.einsum(xp, "vcab,vcbd,vced->vcae", Rb, S, Rb, optimize=True)
        if self.Ls:
            r = [data.ys[b] - gamma @ self.Xs[b].T for b in range(q)]
            u_small = [sum(R[a][b][:, Cb:] * r[b] for b in range(q)) for a in range(q)]
        return U_big, u_small

    def unit_P(self, R, Omega: np.ndarray) -> list:
        """P_c = Σ_{j in c} R_c X_j Ω X_j' R_c' per unit, as entries [a][b] (v, units)."""
        q = self.q
        cvec = la.pack_sym(Omega, double_offdiag=True)
        H = {}
        for k, (a, b) in enumerate(self.pairs):  # H_c[a,b] = <K_c^{ab}, Ω>
            H[a, b] = (cvec @ self.Kf[k].T) * (1.0 if a == b else 0.5)

        def Hf(a, b):
            return H[min(a, b), max(a, b)]
        RH = [[sum(R[a][e] * Hf(e, f) for e in range(q)) for f in range(q)] for a in range(q)]
        return [[sum(RH[a][f] * R[b][f] for f in range(q)) for b in range(q)] for a in range(q)]

    def gradient_parts(self, R, data: "LevelData", gamma: np.ndarray, Omega: np.ndarray | None, P=None,
                       uu_parts=None, with_info: bool = True):
        """Σ_j T_j, Σ_j u_j u_j' with u_j = R_j(y_j - X_j γ), Σ_j R_j X_j Ω X_j' R_j', and the information.

        With γ = β̂ and Ω = C (REML) these give the deviance gradient; a caller that augments
        X with other factors' columns passes its own γ and Ω (SchurObjective).
        """
        xp = la.namespace(gamma)
        v = gamma.shape[0]
        q = self.q
        T = self.unit_T(R)

        def Tf(a, b):
            return T[min(a, b), max(a, b)]

        T_sum = _entries_to_matrix({ab: T[ab] @ self.mu for ab in self.pairs}, q, v)
        uu = xp.zeros((v, q, q), dtype=gamma.dtype, device=la.device_of(gamma))
        U_big, u_small = self.unit_uu(R, data, gamma) if uu_parts is None else uu_parts
        if U_big is not None:
            uu += xp.sum(U_big, axis=1)
        if u_small is not None:
            for a, b in self.pairs:
                uu[:, a, b] += la.einsum(xp, "vj,vj->v", u_small[a], u_small[b])
                if a != b:
                    uu[:, b, a] = uu[:, a, b]
        corr = xp.zeros((v, q, q), dtype=gamma.dtype, device=la.device_of(gamma))
        if Omega is not None:
            P = self.unit_P(R, Omega)
        if P is not None:
            for a, b in self.pairs:  # Σ_c R_c H_c R_c'
                val = xp.sum(P[a][b], axis=1)
                corr[:, a, b] = val
                corr[:, b, a] = val
        if not with_info:  # NestedObjective reduces the information itself
            return T_sum, uu, corr, None
        info = xp.empty((v, q, q, q, q), dtype=gamma.dtype, device=la.device_of(gamma))
        for a in range(q):  # F[(a,b),(c,d)] = Σ_c m_c T[b,c] T[a,d]
            for b in range(q):
                for c in range(q):
                    for e in range(q):
                        info[:, a, b, c, e] = (Tf(b, c) * Tf(a, e)) @ self.mu
        return T_sum, uu, corr, xp.reshape(info, (v, q * q, q * q))

    def _observed_information(self, R, P, data: "LevelData", ev: Evaluation, sigma2: np.ndarray,
                              uu_parts=None) -> np.ndarray:
        """The deviance Hessian in vec D at fixed σ² without its REML term -tr(C B_F C B_E).

        Costs no product over levels beyond what the gradient computed; the term left out is
        O(p / levels) of the rest, so scoring with it is nearly Newton (docs/model.md).
        """
        xp = la.namespace(ev.beta)
        v = R[0][0].shape[0]
        q = self.q
        uu_parts = self.unit_uu(R, data, ev.beta) if uu_parts is None else uu_parts
        A = xp.reshape(self.cross_sums(R, data, ev.beta, uu_parts[1]), (v, q * q, self.p))
        Hvec = self.observed_unit_terms(R, P, data, ev, sigma2, uu_parts)
        Hvec -= 2.0 * la.einsum(xp, "vip,vpr,vjr->vij", A, ev.C, A) / sigma2[:, None, None]
        return la.sym(Hvec)

    def observed_unit_terms(self, R, P, data: "LevelData", ev: Evaluation, sigma2: np.ndarray,
                            uu_parts) -> np.ndarray:
        """The observed information's sums over units, Σ T⊗(2uu'/σ² + 2P) - Σ T⊗T, in vec D (v, q², q²)."""
        xp = la.namespace(ev.beta)
        v = R[0][0].shape[0]
        q, Cb = self.q, self.Cb
        T = self.unit_T(R)

        def Tf(a, b):
            return T[min(a, b), max(a, b)]
        info = ev.info if ev.info is not None else self.gradient_parts(R, data, ev.beta, None)[3]
        # W_unit = 2 U/σ² + 2 P (REML): the u and P terms share T_j's index pattern
        U_big, u_small = uu_parts
        M = xp.zeros((v, q, q, q, q), dtype=ev.beta.dtype, device=la.device_of(ev.beta))
        for d in range(q):
            for a in range(q):
                w = xp.zeros((v, self.C), dtype=ev.beta.dtype, device=la.device_of(ev.beta))
                if U_big is not None:
                    w[:, :Cb] += U_big[:, :, d, a]
                if u_small is not None:
                    w[:, Cb:] += u_small[d] * u_small[a]
                w = w * (2.0 / sigma2[:, None])
                if P is not None:
                    w = w + 2.0 * P[d][a]
                for b in range(q):
                    for c in range(q):  # M[(a,b),(c,d)] = Σ_units T[b,c] W[d,a]
                        M[:, a, b, c, d] = la.einsum(xp, "vc,vc->v", Tf(b, c), w)
        return xp.reshape(M, (v, q * q, q * q)) - info

    def cross_sums(self, R, data: "LevelData", beta: np.ndarray, u_small) -> np.ndarray:
        """A_xy = Σ_j S_j[x]' u_j[y] (v, q, q, p): the β-coupling of the observed information."""
        xp = la.namespace(beta)
        v = beta.shape[0]
        q, p, Cb = self.q, self.p, self.Cb
        A = xp.zeros((v, q, q, p), dtype=beta.dtype, device=la.device_of(beta))
        if Cb:
            Rb = xp.stack([xp.stack([R[a][b][:, :Cb] for b in range(q)], axis=-1) for a in range(q)], axis=-2)
            Xr = data.KXYo - la.einsum(xp, "cefpr,vr->vcefp", self.Ko, beta)  # Σ_j X_j[e]' r_j[f]
            A += la.einsum(xp, "vcxe,vcyf,vcefp->vxyp", Rb, Rb, Xr, optimize=True)
        if u_small is not None:
            for x in range(q):
                for e in range(q):
                    Re = R[x][e][:, Cb:]
                    for y in range(q):
                        A[:, x, y, :] += (Re * u_small[y]) @ self.Xs[e]
        return A

    def deviance_hessian(self, D_list, data: "LevelData", sigma2: np.ndarray, ev: Evaluation | None = None):
        """Observed Hessian of the deviance in vech D at fixed σ² (β profiled), analytically.

        Returns (H (v, k, k), dC (v, k, p, p) = d(X'V⁻¹X)⁻¹/d vech D, the evaluation).
        With directions E, F (symmetric) and S_j = R_j X_j, u_j = R_j(y_j - X_j β̂),
        P_j = S_j C S_j', B_E = Σ S_j'E S_j, a_E = Σ S_j'E u_j (docs/model.md):
        H(E,F) = -Σ tr(T_j F T_j E) + Σ tr(E T_j F (2u_ju_j'/σ² + 2[REML] P_j))
                 - 2 a_E'C a_F / σ² - [REML] tr(C B_F C B_E).
        """
        D = D_list[0]
        q = self.q
        if ev is not None and ev.cache is not None:  # the evaluation at D already holds R_c and P_c
            R = _unflatten_entries(ev.cache["R"], q)
            P = None
            if self.reml and ev.observed is None:  # P_j only enters through the observed information
                P = _unflatten_entries(ev.cache["P"], q) if "P" in ev.cache else self.unit_P(R, ev.C)
        else:
            XtVX, XtVY, YtVY, logdetV, R = self.products(D, data)
            ev = profiled(XtVX, XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
            P = self.unit_P(R, ev.C) if self.reml else None
        Hvec = ev.observed if ev.observed is not None else self._observed_information(R, P, data, ev, sigma2)
        H, dC = hessian_from_parts(Hvec, self.direction_sums(R), ev.C, q, self.reml)
        return H, dC, ev

    def direction_sums(self, R) -> np.ndarray:
        """B_t = Σ_j S_j' E_t S_j (v, q(q+1)/2, p, p) per vech direction E_t: one GEMM over units per (t, pair)."""
        xp = la.namespace(R[0][0])
        if self.q2 is not None and xp is np:
            return self.q2.direction_sums(R)
        v = R[0][0].shape[0]
        q, p = self.q, self.p
        r_idx, c_idx = la.vech_index(q)
        Bs = xp.empty((v, r_idx.size, p, p), dtype=R[0][0].dtype, device=la.device_of(R[0][0]))
        for t, (a, b) in enumerate(zip(r_idx, c_idx)):
            scale = 0.5 if a == b else 1.0
            BupT = xp.zeros((p * (p + 1) // 2, v), dtype=R[0][0].dtype, device=la.device_of(R[0][0]))
            for m, (e, f) in enumerate(self.pairs):
                coef = scale * (R[a][e] * R[b][f] + R[b][e] * R[a][f])
                BupT += self.KfT[m] @ coef.T
            Bs[:, t, :, :] = la.unpack_sym(BupT.T, p)
        return Bs

    def evaluate(self, D_list, data: "LevelData", sigma2=None, grad=False) -> Evaluation:
        if self.q2 is not None and la.namespace(D_list[0], data.XtY) is np:
            return self._evaluate_q2(D_list[0], data, sigma2, grad)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite voxels are flagged by profiled()
            XtVX, XtVY, YtVY, logdetV, R = self.products(D_list[0], data)
        ev = profiled(XtVX, XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        beta, C = ev.beta, ev.C
        if not grad:
            return ev
        P = self.unit_P(R, C) if self.reml else None
        uu_parts = self.unit_uu(R, data, beta)
        T_sum, uu, corr, info = self.gradient_parts(R, data, beta, None, P=P, uu_parts=uu_parts)
        ev.grad = [la.sym(T_sum - corr - uu / ev.sigma2[:, None, None])]
        ev.info = info
        ev.T_sum = [T_sum]
        ev.uu_sum = [uu]
        ev.cache = {"R": [x for row in R for x in row]}
        if P is not None:
            ev.cache["P"] = [x for row in P for x in row]
        ev.observed = self._observed_information(R, P, data, ev, ev.sigma2, uu_parts)
        return ev

    def _evaluate_q2(self, D, data: "LevelData", sigma2, grad: bool) -> Evaluation:
        """evaluate() by LevelsQ2Kernel's closed forms: the same quantities, to rounding."""
        kernel = self.q2
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # non-finite voxels are flagged by profiled()
            XtVX, XtVY, YtVY, logdetV = kernel.products(D, data.XtY, data.YtY, data.ys)
        ev = profiled(XtVX, XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        if not grad:
            return ev
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            T_sum, uu, corr, info, unit_terms, A, R = kernel.gradient(D, data.ys, ev.beta,
                                                                      ev.C if self.reml else None, ev.sigma2)
        s2 = ev.sigma2[:, None, None]
        ev.grad = [la.sym(T_sum - corr - uu / s2)]
        ev.info = info
        ev.T_sum = [T_sum]
        ev.uu_sum = [uu]
        ev.cache = {"R": R}  # with ev.observed the Hessian needs no P_j
        ev.observed = la.sym(unit_terms - 2.0 * np.einsum("vip,vpr,vjr->vij", A, ev.C, A) / s2)
        return ev


def hessian_from_parts(Hvec: np.ndarray, Bs: np.ndarray, C: np.ndarray, q: int, reml: bool):
    """The deviance Hessian in vech D and dC = d(X'V⁻¹X)⁻¹/d vech D from the observed information
    in vec D (without its REML term) and the direction sums B_t: dC_t = C B_t C, and REML adds
    -tr(C B_s C B_t) = -<dC_s, B_t>."""
    xp = la.namespace(Hvec, Bs, C)
    Dup = la.from_host(xp, la.duplication(q), la.device_of(Hvec))
    H = Dup.T @ Hvec @ Dup
    dC = C[:, None, ...] @ Bs @ C[:, None, ...]
    if reml:
        H -= la.einsum(xp, "vspq,vtpq->vts", dC, Bs)
    return la.sym(H), dC


def _unflatten_entries(flat: list, q: int) -> list:
    """q x q entries [a][b] from their row-major list."""
    return [flat[a * q:(a + 1) * q] for a in range(q)]


def _inverse_and_logdet_entries(A):
    """Inverse and log det of q x q matrices given entry-wise (lists of (v, units) arrays)."""
    xp = la.namespace(*[a for row in A for a in row])
    q = len(A)
    if q == 1:
        return [[1.0 / A[0][0]]], xp.log(A[0][0])
    if q == 2:
        det = A[0][0] * A[1][1] - A[0][1] * A[1][0]
        return [[A[1][1] / det, -A[0][1] / det], [-A[1][0] / det, A[0][0] / det]], xp.log(det)
    fast = _gauss_jordan_entries(A)
    if fast is not None:
        return fast
    M = xp.stack([xp.stack(xp.broadcast_arrays(*row), axis=-1) for row in A], axis=-2)
    sign, logdet = xp.linalg.slogdet(M)
    Mi = xp.linalg.inv(M)
    return [[Mi[..., a, b] for b in range(q)] for a in range(q)], xp.where(sign > 0, logdet, xp.nan)


def _gauss_jordan_entries(A):
    """(inverse entries, log det) by Gauss-Jordan elimination vectorised over the entry arrays.

    Batched LAPACK on tiny matrices is ~50x slower (nested family blocks have q up to 16);
    None if a pivot is small, and the caller falls back to LAPACK.
    """
    xp = la.namespace(*[a for row in A for a in row])
    q = len(A)
    flat = xp.broadcast_arrays(*[xp.asarray(a, dtype=xp.float64) for row in A for a in row])
    shape = flat[0].shape
    M = [flat[i * q:(i + 1) * q] for i in range(q)]
    logdet = xp.zeros(shape, dtype=xp.float64, device=la.device_of(flat[0]))
    sign = xp.ones(shape, dtype=xp.float64, device=la.device_of(flat[0]))
    for k in range(q):
        piv = M[k][k]
        scale = xp.maximum(xp.max(xp.abs(xp.stack(M[k])), axis=0), 1e-300)
        if xp.any(xp.abs(piv) < 1e-8 * scale):
            return None
        logdet = logdet + xp.log(xp.abs(piv))
        sign = sign * xp.sign(piv)
        inv_piv = 1.0 / piv
        rowk = [m * inv_piv for m in M[k]]
        rowk[k] = inv_piv
        for i in range(q):
            if i != k:
                f = M[i][k]
                M[i] = [(-f * inv_piv) if j == k else M[i][j] - f * rowk[j] for j in range(q)]
        M[k] = rowk
    return M, xp.where(sign > 0, logdet, xp.nan)


def _entries_to_matrix(entries, q, v):
    first = next(iter(entries.values()))
    xp = la.namespace(first)
    out = xp.empty((v, q, q), dtype=first.dtype, device=la.device_of(first))
    for (a, b), val in entries.items():
        out[:, a, b] = val
        out[:, b, a] = val
    return out


def class_quadratic_forms(xp, gamma, K):
    """γ_v' K_c γ_v (v, C) for K (C, r, r): one GEMM, γ (K_1 | ... | K_C), then row products; einsum's
    contraction loop ran ~20x slower at a tree's U (r = 44, C ~ 30)."""
    v, (C, r, s) = gamma.shape[0], K.shape
    G = gamma @ xp.reshape(xp.permute_dims(K, (1, 0, 2)), (r, C * s))
    return xp.sum(xp.reshape(G, (v, C, s)) * gamma[:, None, :], axis=-1)


def _pairs_to_matrix(Spair, pairs, q):
    xp = la.namespace(Spair)
    out = xp.zeros(Spair.shape[:-1] + (q, q), dtype=Spair.dtype, device=la.device_of(Spair))
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
    KXYo: np.ndarray

    def take(self, idx) -> "LevelData":
        return LevelData(la.select_rows(self.XtY, idx), la.select_rows(self.YtY, idx),
                         [la.select_rows(y, idx) for y in self.ys], la.select_rows(self.KXY, idx),
                         la.select_rows(self.KYY, idx), la.select_rows(self.KXYo, idx))

"""Several factors, one with many levels eliminated level by level, the rest dense (docs/model.md)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core import linalg as la
from blmm.core.objective.base import (
    Evaluation, array_bytes, factor_pair_information, level_block_sum, no_units, profiled,
)
from blmm.core.level_classes import LevelClasses
from blmm.core.objective.levels import LevelData, LevelObjective

@dataclass
class SchurData:
    level: LevelData  # the big factor's data, with X augmented by the small factors' Z columns
    ZRtY: np.ndarray  # (v, q_R)
    XtY: np.ndarray  # (v, p), for resms and the voxel count

    def take(self, idx) -> "SchurData":
        return SchurData(self.level.take(idx), la.select_rows(self.ZRtY, idx), la.select_rows(self.XtY, idx))


class SchurObjective:
    """Several factors, one of them with many levels (e.g. subjects) and the rest small (e.g. sites).

    The big factor k1 is eliminated level by level: with V₁ = I + Z₁D₁Z₁', every product
    U'V₁⁻¹U of the augmented design U = [X, Z_R] comes from the level/class machinery of
    `LevelObjective` (the small factors' columns Z_R ride along with X).  A second Woodbury
    step over the q_R small-factor columns gives V⁻¹, so the dense part is q_R x q_R per
    voxel instead of q x q.  The big factor's gradient is LevelObjective's with β replaced
    by γ = [β; b̃] and C by Ω = E_R S E_R' + B C B' (docs/model.md).
    """

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, big: int | None = None, classes: LevelClasses | None = None,
                 level: LevelObjective | None = None):
        """``level``: the eliminated factor's `LevelObjective` on U of these same sums, where one is
        built already (another objective of this design shares it)."""
        ZtZ = sp.csr_matrix(ZtZ)
        self.n, self.p, self.reml = int(n), XtX.shape[0], bool(reml)
        self.qk = layout.q
        nlev = layout.n_levels
        self.big, big_cols, small_cols = eliminated_columns(layout, big)
        self.small = [k for k in range(len(self.qk)) if k != self.big]
        self.big_cols, self.small_cols = big_cols, small_cols
        self.qR = small_cols.size
        p, qR = self.p, self.qR
        if level is None:
            ZRtX = ZtX[small_cols]
            ZRtZR = np.asarray(ZtZ[small_cols][:, small_cols].todense())
            UtU = np.block([[XtX, ZRtX.T], [ZRtX, ZRtZR]])
            Z1tU = np.hstack([ZtX[big_cols], np.asarray(ZtZ[big_cols][:, small_cols].todense())])
            level = LevelObjective(UtU, Z1tU, ZtZ[big_cols][:, big_cols], n, self.qk[self.big], reml, classes=classes)
        self.level = level
        # offsets of the small factors inside the q_R block (level-major per factor, as Z)
        # slice bounds: host integers in any namespace
        self.small_offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum([nlev[k] * self.qk[k]
                                                                                    for k in self.small])]))
        self.small_levels = [nlev[k] for k in self.small]
        self.small_q = [self.qk[k] for k in self.small]
        self.eye_p = np.eye(p)
        del qR

    missing_rows = False
    has_deviance_hessian = False

    def per_voxel_bytes(self) -> int:
        """Working memory per voxel of one evaluation with its gradient (for block sizing)."""
        lv, pu, qq = self.level, self.p + self.qR, self.level.q * self.qR
        coupling = 2 * lv.Ls * qq + (lv.Cb + 4) * qq * qq + lv.q ** 4  # _coupled_information's W, Φ and its products
        return 8 * (12 * lv.C * lv.q ** 2 + lv.Cb * len(lv.pairs) * (pu + 1) + 12 * pu * pu + 8 * self.qR ** 2 + coupling)

    def held_bytes(self) -> int:
        return self.level.held_bytes() + array_bytes(self.big_cols, self.small_cols, self.small_offsets, self.eye_p)

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units=None) -> SchurData:
        no_units(self, units)
        UtY = np.hstack([XtY, ZtY[:, self.small_cols]])
        return SchurData(self.level.data(UtY, ZtY[:, self.big_cols], YtY),
                         np.ascontiguousarray(ZtY[:, self.small_cols]), np.ascontiguousarray(XtY))

    def data_from_sums(self, sums) -> SchurData:
        """SchurData from the big factor's class-aggregated sums of the augmented design U = [X, Z_R]
        (`LevelSums` in this objective's classes, its XtY holding U'Y: `schur_design`)."""
        UtY = sums.XtY
        return SchurData(self.level.data_from_sums(UtY, sums.YtY, sums.KXYo, sums.KYY, sums.y_small),
                         np.ascontiguousarray(UtY[:, self.p:]), np.ascontiguousarray(UtY[:, :self.p]))

    def _small_blockdiag(self, D_list):
        xp = la.namespace(*D_list)
        v = D_list[0].shape[0]
        out = xp.zeros((v, self.qR, self.qR), dtype=D_list[0].dtype, device=la.device_of(D_list[0]))
        for i, k in enumerate(self.small):
            o, lk, qk = self.small_offsets[i], self.small_levels[i], self.small_q[i]
            root = la.psd_root(D_list[k])
            for j in range(lk):  # few levels (small factors): a handful of block copies
                out[:, o + j * qk:o + (j + 1) * qk, o + j * qk:o + (j + 1) * qk] = root
        return out

    def _small_factor_sum(self, A, i):
        return level_block_sum(A, self.small_offsets[i], self.small_levels[i], self.small_q[i])

    def _eliminated_products(self, D_list, data: SchurData):
        """U'V₁⁻¹U, U'V₁⁻¹Y, Y'V₁⁻¹Y, log|V₁| and the per-unit weights of the eliminated part."""
        return self.level.products(D_list[self.big], data.level)

    def rows(self, data: SchurData):
        """The observed rows: the objective's n, or per voxel where its data say (missing rows)."""
        return self.n

    def _eliminated_gradient(self, R, data: SchurData, gamma, Omega):
        """The eliminated factor's Σ T, Σ uu', Σ P and expected information, all of V₁, at (γ, Ω)."""
        return self.level.gradient_parts(R, data.level, gamma, Omega)

    def _eliminated_parts(self, R, data: SchurData, gamma, Omega, s2, info, starts):
        """Per eliminated factor k: (gradient, Σ T, Σ uu'); writes its information blocks into info."""
        T1, uu1, corr1, info1 = self._eliminated_gradient(R, data, gamma, Omega)
        b0, size = starts[self.big], starts[self.big + 1] - starts[self.big]
        info[:, b0:b0 + size, b0:b0 + size] = info1
        return {self.big: (la.sym(T1 - corr1 - uu1 / s2), T1, uu1)}

    def _coupled_information(self, R, data: SchurData, S, IAS, info, starts):
        """Turn the eliminated factor's information from V₁'s into V's and add its blocks with the small
        factors, so that the scoring information is the dense structure's (docs/model.md, "Schur").

        With W_j = Z_j'V₁⁻¹Z_R = R_j Z_j'Z_R and S = Λ M⁻¹ Λ', Z_j'V⁻¹Z_j' = T_j δ_jj' - W_j S W_j'' and
        Z_j'V⁻¹Z_R = W_j E, E = I - S A_RR; every level sum goes through Φ_ab = Σ_j W_j[a]' W_j[b] (q_R x q_R).
        Returns Σ_j W_j S W_j' (v, q, q): Σ_j Z_j'V₁⁻¹Z_j less it is Σ_j Z_j'V⁻¹Z_j.
        """
        xp = la.namespace(S)
        v, q = S.shape[0], self.level.q
        Phi, TM, WSW = self._level_coupling(R, data, S)
        # the eliminated block: Σ_jj' (T_j δ - W_j S W_j'')⊗(same), in LevelObjective's F[(a,b),(c,e)] order
        SPS = la.einsum(xp, "vrs,vcest,vtu->vceru", S, Phi, S, optimize=True)
        big = la.einsum(xp, "vbaru,vceru->vabce", Phi, SPS, optimize=True) - TM
        b0, b1 = starts[self.big], starts[self.big + 1]
        info[:, b0:b1, b0:b1] += xp.reshape(big, (v, q * q, q * q))
        # the eliminated factor with each small one: Σ_j Σ_l (W_j E)[b, (l, c)] (W_j E)[a, (l, d)]
        E = xp.matrix_transpose(IAS)
        EPE = la.einsum(xp, "vrc,vbars,vsd->vabcd", E, Phi, E, optimize=True)
        for i, k in enumerate(self.small):
            o, lk, qk = self.small_offsets[i], self.small_levels[i], self.small_q[i]
            blk = xp.reshape(EPE[:, :, :, o:o + lk * qk, o:o + lk * qk], (v, q, q, lk, qk, lk, qk))
            cross = xp.reshape(la.einsum(xp, "vabjcjd->vabcd", blk), (v, q * q, qk * qk))
            info[:, b0:b1, starts[k]:starts[k + 1]] = cross
            info[:, starts[k]:starts[k + 1], b0:b1] = xp.matrix_transpose(cross)
        return WSW

    def _level_coupling(self, R, data: SchurData, S):
        """Sums over the eliminated factor's levels: Φ[a, b, r, s] = Σ_j W_j[a, r] W_j[b, s],
        TM[a, b, c, e] = Σ_j T_j[b, c] M_j[a, e] + M_j[b, c] T_j[a, e] and Σ_j M_j, with M_j = W_j S W_j'."""
        lv = self.level
        xp = la.namespace(S)
        dev = la.device_of(S)
        v, q, p, qR, Cb = S.shape[0], lv.q, self.p, self.qR, lv.Cb
        Phi = xp.zeros((v, q, q, qR, qR), dtype=S.dtype, device=dev)
        if Cb:  # a big class's Σ_members Z_j'Z_R ⊗ Z_j'Z_R is the constant Ko (its members share R_c)
            Rb = xp.stack([xp.stack([R[a][f][:, :Cb] for f in range(q)], axis=-1) for a in range(q)], axis=-2)
            N = lv.Ko[:, :, :, p:, p:]  # the objective's constants live where its arrays do (linalg.move)
            RN = la.einsum(xp, "vcaf,cfgrs->vcagrs", Rb, N)
            Phi += la.einsum(xp, "vcagrs,vcbg->vabrs", RN, Rb)
        if lv.Ls:
            Xs = xp.stack([lv.Xs[f][:, p:] for f in range(q)], axis=1)  # (Ls, q, q_R): Z_l'Z_R
            Rs = xp.stack([xp.stack([R[a][f][:, Cb:] for f in range(q)], axis=-1) for a in range(q)], axis=-2)
            W = la.einsum(xp, "vlaf,lfr->vlar", Rs, Xs)  # (v, Ls, q, q_R)
            Wf = xp.reshape(W, (v, lv.Ls, q * qR))
            WW = xp.reshape(xp.matrix_transpose(Wf) @ Wf, (v, q, qR, q, qR))  # one batched GEMM over the levels
            Phi += xp.permute_dims(WW, (0, 1, 3, 2, 4))
        Omega_S = xp.zeros((v, p + qR, p + qR), dtype=S.dtype, device=dev)
        Omega_S[:, p:, p:] = S
        M = lv.unit_P(R, Omega_S)  # per unit Σ_{j in c} W_j S W_j'
        T = lv.unit_T(R)

        def Tf(a, b):
            return T[min(a, b), max(a, b)]
        TM = xp.zeros((v, q, q, q, q), dtype=S.dtype, device=dev)
        for a in range(q):
            for b in range(q):
                for c in range(q):
                    for e in range(q):
                        TM[:, a, b, c, e] = xp.sum(Tf(b, c) * M[a][e] + M[b][c] * Tf(a, e), axis=1)
        WSW = xp.stack([xp.stack([xp.sum(M[a][b], axis=1) for b in range(q)], axis=-1) for a in range(q)], axis=-2)
        return Phi, TM, WSW

    def evaluate(self, D_list, data: SchurData, sigma2=None, grad=False) -> Evaluation:
        xp = la.namespace(data.XtY, data.ZRtY)
        mT = xp.matrix_transpose
        v = D_list[0].shape[0]
        p, qR = self.p, self.qR
        UVU, UVY, YVY1, logdetV1, R = self._eliminated_products(D_list, data)
        A_XX, A_XR, A_RR = UVU[:, :p, :p], UVU[:, :p, p:], la.sym(UVU[:, p:, p:])
        a_XY, a_RY = UVY[:, :p], UVY[:, p:]
        Lam = self._small_blockdiag(D_list)  # Λ Λ' = D_R
        eye_R = xp.eye(qR, dtype=Lam.dtype, device=la.device_of(Lam))
        Mt = eye_R + mT(Lam) @ A_RR @ Lam
        Lm, chol_ok = la.safe_cholesky(la.sym(Mt))
        Lm[~chol_ok] = eye_R  # a non-finite voxel is flagged below, its block goes on
        logdetV = logdetV1 + 2.0 * xp.sum(xp.log(xp.linalg.diagonal(Lm)), axis=1)
        LiLt = xp.linalg.solve(Lm, mT(Lam))  # L⁻¹Λ'
        Bx = LiLt @ mT(A_XR)
        by = la.einsum(xp, "vab,vb->va", LiLt, a_RY)
        XtVX = la.sym(A_XX - mT(Bx) @ Bx)
        XtVY = a_XY - la.einsum(xp, "vqp,vq->vp", Bx, by)
        YtVY = YVY1 - la.einsum(xp, "vq,vq->v", by, by)
        ev = profiled(XtVX, XtVY, YtVY, logdetV, self.rows(data), self.p, self.reml, sigma2)
        ev.ok &= chol_ok
        beta, C = ev.beta, ev.C
        if not grad:
            return ev
        S = mT(LiLt) @ LiLt  # Λ M⁻¹ Λ'
        rR = a_RY - la.einsum(xp, "vpq,vp->vq", A_XR, beta)  # Z_R'V₁⁻¹ r
        b_tilde = la.einsum(xp, "vab,vb->va", S, rR)
        gamma = xp.concat([beta, b_tilde], axis=1)
        SA = S @ mT(A_XR)  # S Z_R'V₁⁻¹X
        Omega = xp.zeros((v, p + qR, p + qR), dtype=S.dtype, device=la.device_of(S))
        Omega[:, p:, p:] = S
        if self.reml:
            B = xp.concat([xp.broadcast_to(self.eye_p, (v, p, p)), -SA], axis=1)
            Omega += B @ C @ mT(B)
        s2 = ev.sigma2[:, None, None]
        # expected information from V: the eliminated factors' from V₁ here, then made V's (_coupled_information)
        starts = [int(x) for x in np.concatenate([[0], np.cumsum([q * q for q in self.qk])])]  # host slice bounds
        info = xp.zeros((v, starts[-1], starts[-1]), dtype=S.dtype, device=la.device_of(S))
        eliminated = self._eliminated_parts(R, data, gamma, la.sym(Omega), s2, info, starts)
        IAS = eye_R - A_RR @ S  # Z_R'V⁻¹ = (I - A S) Z_R'V₁⁻¹
        coupling = self._coupled_information(R, data, S, IAS, info, starts)
        TR = la.sym(IAS @ A_RR)  # Z_R'V⁻¹Z_R
        uR = la.einsum(xp, "vab,vb->va", IAS, rR)
        PR = TR
        if self.reml:
            ZVX = IAS @ mT(A_XR)
            PR = PR - ZVX @ C @ mT(ZVX)
        GR = PR - uR[:, :, None] * uR[:, None, :] / s2
        nf = len(self.qk)
        grads, T_sums, uus = [None] * nf, [None] * nf, [None] * nf
        for k, (G, T, uu) in eliminated.items():
            grads[k], T_sums[k], uus[k] = G, T, uu
        if coupling is not None:  # Σ_j Z_j'V⁻¹Z_j = Σ_j (T_j - W_j S W_j'): V's, as the information
            T_sums[self.big] = la.sym(T_sums[self.big] - coupling)
        uuR = uR[:, :, None] * uR[:, None, :]
        for i, k in enumerate(self.small):
            grads[k] = la.sym(self._small_factor_sum(GR, i))
            T_sums[k] = self._small_factor_sum(TR, i)
            uus[k] = self._small_factor_sum(uuR, i)
        ev.grad, ev.T_sum, ev.uu_sum = grads, T_sums, uus
        small_info = factor_pair_information(TR, self.small_offsets[:-1], self.small_levels, self.small_q)
        ss = [int(x) for x in np.concatenate([[0], np.cumsum([q * q for q in self.small_q])])]
        for i, k in enumerate(self.small):
            for i2, k2 in enumerate(self.small):
                info[:, starts[k]:starts[k + 1], starts[k2]:starts[k2 + 1]] = small_info[:, ss[i]:ss[i + 1], ss[i2]:ss[i2 + 1]]
        ev.info = info
        return ev


def factor_columns(layout, factors) -> np.ndarray:
    """Z's columns of these factors (indices), in factor order."""
    off = layout.offsets
    cols = [np.arange(off[k], off[k + 1]) for k in factors]
    return np.concatenate(cols) if cols else np.zeros(0, np.int64)


def eliminated_columns(layout, big: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(big, its columns of Z, the other factors' columns Z_R in factor order): the factor Schur
    eliminates level by level (by default the one with most levels) and the columns left dense."""
    big = int(np.argmax(layout.n_levels)) if big is None else int(big)
    return big, factor_columns(layout, [big]), factor_columns(layout, [k for k in range(len(layout.q)) if k != big])


def augmented_design(X: np.ndarray, Z, dense_cols: np.ndarray) -> np.ndarray:
    """U = [X, Z_R] (n, p + q_R): X with the columns of Z that an elimination keeps dense."""
    return np.hstack([X, sp.csc_matrix(Z)[:, dense_cols].toarray()])


def schur_design(X: np.ndarray, Z, layout, big: int | None = None) -> np.ndarray:
    """The augmented design U = [X, Z_R] whose sums Schur's eliminated factor takes."""
    return augmented_design(X, Z, eliminated_columns(layout, big)[2])

"""Several factors, one with many levels eliminated level by level, the rest dense (docs/model.md)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core import linalg as la
from blmm.core.objective.base import (
    Evaluation, array_bytes, factor_pair_information, level_block_sum, no_units, profiled,
)
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
        lv, pu = self.level, self.p + self.qR
        return 8 * (12 * lv.C * lv.q ** 2 + lv.Cb * len(lv.pairs) * (pu + 1) + 12 * pu * pu + 8 * self.qR ** 2)

    def held_bytes(self) -> int:
        return self.level.held_bytes() + array_bytes(self.big_cols, self.small_cols, self.small_offsets, self.eye_p)

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units=None) -> SchurData:
        no_units(self, units)
        UtY = np.hstack([XtY, ZtY[:, self.small_cols]])
        return SchurData(self.level.data(UtY, ZtY[:, self.big_cols], YtY),
                         np.ascontiguousarray(ZtY[:, self.small_cols]), np.ascontiguousarray(XtY))

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

    def _eliminated_parts(self, R, data: SchurData, gamma, Omega, s2, info, starts):
        """Per eliminated factor k: (gradient, Σ T, Σ uu'); writes its information blocks into info."""
        T1, uu1, corr1, info1 = self.level.gradient_parts(R, data.level, gamma, Omega)
        b0, size = starts[self.big], starts[self.big + 1] - starts[self.big]
        info[:, b0:b0 + size, b0:b0 + size] = info1
        return {self.big: (la.sym(T1 - corr1 - uu1 / s2), T1, uu1)}

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
        ev = profiled(XtVX, XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
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
        # expected information: the eliminated factors' from V₁, the small factors' from V (no cross terms)
        starts = [int(x) for x in np.concatenate([[0], np.cumsum([q * q for q in self.qk])])]  # host slice bounds
        info = xp.zeros((v, starts[-1], starts[-1]), dtype=S.dtype, device=la.device_of(S))
        eliminated = self._eliminated_parts(R, data, gamma, la.sym(Omega), s2, info, starts)
        IAS = eye_R - A_RR @ S  # Z_R'V⁻¹ = (I - A S) Z_R'V₁⁻¹
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

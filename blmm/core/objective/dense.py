"""Any number of crossed or nested factors: a dense q x q system per voxel (q = all Z columns)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core import linalg as la
from blmm.core.objective.base import (
    Evaluation, array_bytes, factor_pair_information, level_block_sum, no_units, profiled,
)

@dataclass
class DenseData:
    XtY: np.ndarray
    ZtY: np.ndarray
    YtY: np.ndarray

    def take(self, idx) -> "DenseData":
        return DenseData(la.select_rows(self.XtY, idx), la.select_rows(self.ZtY, idx), la.select_rows(self.YtY, idx))


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

    missing_rows = False
    has_deviance_hessian = True  # analytic, from the full Z'V⁻¹Z it forms (core/hessian.py)

    def per_voxel_bytes(self) -> int:
        """Working memory per voxel of one evaluation with its gradient (for block sizing)."""
        return 8 * 10 * self.qtot ** 2

    def held_bytes(self) -> int:
        return array_bytes(self.XtX, self.ZtX, self.ZtZ, self.offsets)

    def data(self, XtY, ZtY, YtY, units=None) -> DenseData:
        no_units(self, units)
        return DenseData(np.ascontiguousarray(XtY), np.ascontiguousarray(ZtY), np.asarray(YtY))

    def _blockdiag(self, blocks):
        """Block-diagonal (v, q, q) from per-factor (v, q_k, q_k), repeated over levels."""
        xp = la.namespace(*blocks)
        v = blocks[0].shape[0]
        out = xp.zeros((v, self.qtot, self.qtot), dtype=blocks[0].dtype, device=la.device_of(blocks[0]))
        for k, B in enumerate(blocks):
            o, l, qk = self.offsets[k], self.n_levels[k], self.qk[k]
            same_level = xp.eye(l, dtype=xp.bool, device=la.device_of(B))[None, :, None, :, None]  # a selection, not a product: exact
            out[:, o:o + l * qk, o:o + l * qk] = xp.reshape(xp.where(same_level, B[:, None, :, None, :], 0.0),
                                                            (v, l * qk, l * qk))
        return out

    def _factor_sum(self, A, k):
        return level_block_sum(A, self.offsets[k], self.n_levels[k], self.qk[k])

    def evaluate(self, D_list, data: DenseData, sigma2=None, grad=False) -> Evaluation:
        xp = la.namespace(data.XtY, data.ZtY, data.YtY)
        Lam = self._blockdiag([la.psd_root(D) for D in D_list])  # Λ Λ' = D
        LtZtZ = xp.matrix_transpose(Lam) @ self.ZtZ  # Λ'Z'Z
        Mt = xp.eye(self.qtot, dtype=Lam.dtype, device=la.device_of(Lam)) + LtZtZ @ Lam
        Lm, chol_ok = la.safe_cholesky(Mt)
        # a non-finite voxel is flagged below, its block goes on
        Lm[~chol_ok] = xp.eye(self.qtot, dtype=Lm.dtype, device=la.device_of(Lm))
        logdetV = 2.0 * xp.sum(xp.log(xp.linalg.diagonal(Lm)), axis=1)
        Bx = xp.linalg.solve(Lm, xp.matrix_transpose(Lam) @ self.ZtX)  # L^-1 Λ'Z'X
        by = xp.linalg.solve(Lm, la.einsum(xp, "vba,vb->va", Lam, data.ZtY)[..., None])[..., 0]
        XtVX = self.XtX[None, ...] - xp.matrix_transpose(Bx) @ Bx
        XtVY = data.XtY - la.einsum(xp, "vqp,vq->vp", Bx, by)
        YtVY = data.YtY - la.einsum(xp, "vq,vq->v", by, by)
        ev = profiled(la.sym(XtVX), XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        ev.ok &= chol_ok
        beta, C = ev.beta, ev.C
        if not grad:
            return ev
        Bz = xp.linalg.solve(Lm, LtZtZ)  # L^-1 Λ'Z'Z
        T = la.sym(self.ZtZ[None, ...] - xp.matrix_transpose(Bz) @ Bz)  # Z'V^-1Z
        S = self.ZtX[None, ...] - xp.matrix_transpose(Bz) @ Bx  # Z'V^-1X
        r_z = data.ZtY - la.einsum(xp, "qp,vp->vq", self.ZtX, beta)
        r_b = by - la.einsum(xp, "vqp,vp->vq", Bx, beta)
        u = r_z - la.einsum(xp, "vaq,va->vq", Bz, r_b)  # Z'V^-1 r
        s2v = ev.sigma2
        Gfull = T - u[:, :, None] * u[:, None, :] / s2v[:, None, None]
        if self.reml:
            Gfull = Gfull - S @ C @ xp.matrix_transpose(S)
        ev.grad = [la.sym(self._factor_sum(Gfull, k)) for k in range(len(D_list))]
        ev.T_sum = [self._factor_sum(T, k) for k in range(len(D_list))]
        uu = u[:, :, None] * u[:, None, :]
        ev.uu_sum = [self._factor_sum(uu, k) for k in range(len(D_list))]
        ev.info = factor_pair_information(T, self.offsets[:-1], self.n_levels, self.qk)
        ev.cache = {"T": [T], "S": [S], "u": [u]}  # the analytic Hessian's inputs (deviance_hessian)
        return ev

    def vech_directions(self) -> list:
        """Per vech D_k direction E_t = Σ_levels e_a e_b' + e_b e_a' (or e_a e_a'): its (rows, cols) in Z."""
        out = []
        for k, q in enumerate(self.qk):
            base = int(self.offsets[k]) + q * np.arange(self.n_levels[k])  # host indices, in any namespace
            for a, b in zip(*la.vech_index(q)):
                ia, ib = base + a, base + b
                out.append((ia, ia) if a == b else (np.concatenate([ia, ib]), np.concatenate([ib, ia])))
        return out

    def deviance_hessian(self, D_list, data: DenseData, sigma2: np.ndarray, ev: Evaluation | None = None):
        """Observed Hessian of the deviance in (vech D_1, …) at fixed σ² (β profiled), analytically.

        Returns (H (v, k, k), dC (v, k, p, p) = d(X'V⁻¹X)⁻¹/d vech D, the evaluation). With the full
        T = Z'V⁻¹Z, S = Z'V⁻¹X, u = Z'V⁻¹r, P = S C S', B_E = S'ES and directions E, F (docs/model.md):
        H(E,F) = -tr(TFTE) + 2u'E(T - P)Fu/σ² + [REML] (2 tr(EPFT) - tr(C B_F C B_E)), dC/dE = C B_E C.
        """
        if ev is None or ev.cache is None or "T" not in ev.cache:
            ev = self.evaluate(D_list, data, sigma2=sigma2, grad=True)
        T, S, u = ev.cache["T"][0], ev.cache["S"][0], ev.cache["u"][0]
        C = ev.C
        xp = la.namespace(T, S, u)
        dirs = self.vech_directions()
        v = T.shape[0]
        Eu = xp.zeros((len(dirs), v, self.qtot), dtype=u.dtype, device=la.device_of(u))  # C order: the sums below round by layout
        for t, (rows, cols) in enumerate(dirs):  # E u: row m of E holds one 1 (column source[m]) if m is in rows
            source = np.zeros(self.qtot, dtype=np.int64)
            source[rows] = cols
            hit = np.zeros(self.qtot, dtype=bool)
            hit[rows] = True
            Eu[t, ...] = xp.where(la.from_host(xp, hit, la.device_of(u)), la.take_along(u, source, axis=1), 0.0)
        SCSEu = la.einsum(xp, "vqp,vpr,tvr->tvq", S, C, la.einsum(xp, "vqp,tvq->tvp", S, Eu))
        MEu = la.einsum(xp, "vab,tvb->tva", T, Eu) - SCSEu  # (T - P) E u
        B = xp.stack([la.einsum(xp, "vmi,vmj->vij", la.take_along(S, rows, axis=1), la.take_along(S, cols, axis=1))
                      for rows, cols in dirs], axis=1)
        dC = C[:, None, ...] @ B @ C[:, None, ...]
        H = 2.0 * la.einsum(xp, "sva,tva->vst", Eu, MEu) / sigma2[:, None, None]
        SC = S @ C
        for s, (rs, cs) in enumerate(dirs):
            for t, (rt, ct) in enumerate(dirs[:s + 1]):
                T_st = la.take_block(T, cs, rt)  # T[c_m, r_n]
                T_ts = la.take_block(T, ct, rs)  # T[c_n, r_m]
                val = -la.einsum(xp, "vmn,vnm->v", T_st, T_ts)
                if self.reml:
                    P_st = la.einsum(xp, "vmp,vnp->vmn", la.take_along(SC, cs, axis=1), la.take_along(S, rt, axis=1))
                    val = val + 2.0 * la.einsum(xp, "vmn,vnm->v", P_st, T_ts) - la.einsum(
                        xp, "vpq,vpq->v", dC[:, s, ...], B[:, t, ...])
                H[:, s, t] += val
                if t != s:
                    H[:, t, s] += val
        return la.sym(H), dC, ev

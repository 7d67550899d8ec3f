"""LevelObjective's per-level work for q = 2 with every level its own unit, fused (numpy only).

With 2 x 2 blocks everything per level has a closed form in the level's constants g = G_j
(g00, g01, g11, γ = det G_j) and the voxel's D (d00, d01, d11, Δ = det D):
det(I + G D) = 1 + g00 d00 + 2 g01 d01 + g11 d11 + γΔ, D R = (D + Δ adj G) / det,
T = R G = (G + γ adj D) / det and R = adj(I + G D) / det (docs/model.md).  So the
per-level arrays are small GEMMs of level constants, and the sums over levels of T, T⊗T and
T⊗(2uu'/σ² + 2P) are GEMMs of 1/det, 1/det² and (2uu'/σ² + 2P)/det against level constants:
no T_j array is formed.  The remaining elementwise work runs on chunks of voxels whose
(chunk, levels) arrays stay in cache, writing into preallocated buffers (`out=`).

`LevelObjective` uses this for numpy arrays; its entry-by-entry array code is the reference
(tests/core/test_levels_q2.py) and serves every other namespace, q and class layout.
"""
from __future__ import annotations

import numpy as np

from blmm.core import linalg as la

# (chunk, levels) float64 temporaries of ~1 MB stay in cache: at 2,745 levels (47 voxels) an evaluation with
# gradient took 2.0x its level products' time against 2.7x on a whole block of 185 voxels (23-95 voxels alike)
CHUNK_BYTES = 2 ** 20
PAIRS = ((0, 0), (0, 1), (1, 1))  # T, W, P and uu' entries kept, in upper_pairs order
VECH = ((0, 0), (1, 0), (1, 1))  # vech order of D's entries (linalg.vech_index)


def _pair(a: int, b: int) -> int:
    """Index into PAIRS of entry (a, b) of a symmetric 2 x 2 matrix."""
    return a + b


def _w_coefficients(d00, d01, d11, delta) -> np.ndarray:
    """W = D R = (D + Δ adj G)/det: numerators of entries 00, 01, 11 on the rows of L_lin (3, vc, 4)."""
    coef = np.zeros((3, d00.size, 4))
    coef[0, :, 0], coef[0, :, 3] = d00, delta
    coef[1, :, 0], coef[1, :, 2] = d01, -delta
    coef[2, :, 0], coef[2, :, 1] = d11, delta
    return coef


def _r_coefficients(d00, d01, d11) -> np.ndarray:
    """R = adj(I + G D)/det: numerators of entries 00, 01, 10, 11 on the rows of L_lin (4, vc, 4)."""
    coef = np.zeros((4, d00.size, 4))
    coef[0, :, 0], coef[0, :, 2], coef[0, :, 3] = 1.0, d01, d11
    coef[1, :, 1], coef[1, :, 2] = -d01, -d11
    coef[2, :, 2], coef[2, :, 3] = -d00, -d01
    coef[3, :, 0], coef[3, :, 1], coef[3, :, 2] = 1.0, d00, d01
    return coef


def _r_column_coefficients(d00, d01, d11) -> np.ndarray:
    """adj(I + G D)[x, e] on column e's level constants L_e of LX: (x, e, vc, 3)."""
    coef = np.zeros((2, 2, d00.size, 3))
    coef[0, 0, :, 0], coef[0, 0, :, 1], coef[0, 0, :, 2] = 1.0, d01, d11  # 1 + g01 d01 + g11 d11
    coef[1, 0, :, 1], coef[1, 0, :, 2] = -d00, -d01  # -(g01 d00 + g11 d01)
    coef[0, 1, :, 1], coef[0, 1, :, 2] = -d01, -d11  # -(g00 d01 + g01 d11) on (1, g00, g01)
    coef[1, 1, :, 0], coef[1, 1, :, 1], coef[1, 1, :, 2] = 1.0, d00, d01  # 1 + g00 d00 + g01 d01
    return coef


class LevelsQ2Kernel:
    """The closed forms and fused passes of one LevelObjective with q = 2 and no aggregated classes."""

    def __init__(self, g00, g01, g11, KfT, Xs, XtX_up, p: int):
        C = g00.size
        gam = g00 * g11 - g01 * g01
        one = np.ones(C)
        self.C, self.p = C, p
        self.L_det = np.stack([one, g00, 2.0 * g01, g11, gam])  # (5, C) against (1, d00, d01, d11, Δ)
        self.L_lin = np.stack([one, g00, g01, g11])  # (4, C): rows of W's and R's numerators
        self.L_T = np.ascontiguousarray(np.stack([g00, g01, g11, gam], axis=1))  # (C, 4): T_x = (g_x + γ s_x)/det
        g = (g00, g01, g11)
        cols = [g[x] * g[y] for x in range(3) for y in range(x, 3)] + [gam * g[x] for x in range(3)] + [gam * gam]
        self.L_TT = np.ascontiguousarray(np.stack(cols, axis=1))  # (C, 10)
        self.KfT_all = np.ascontiguousarray(np.concatenate(KfT, axis=1))  # (p(p+1)/2, 3C)
        self.XsT_all = np.ascontiguousarray(np.concatenate([Xs[0].T, Xs[1].T], axis=1))  # (p, 2C)
        self.Xs_stack = np.ascontiguousarray(np.concatenate(Xs, axis=0))  # (2C, p)
        # L_ek(j) X_j[e] (C, 2 * 3 * p), L_0 = (1, g01, g11) and L_1 = (1, g00, g01), the level constants of
        # column e of adj(I + G D): Σ_j R_j[x, e] X_j[e] z_j is then one GEMM of z/det, whatever x and z
        L_col = np.stack([np.stack([one, g01, g11], axis=1), np.stack([one, g00, g01], axis=1)], axis=1)  # (C, 2, 3)
        self.LX = np.ascontiguousarray((L_col[..., None] * np.stack(Xs, axis=1)[:, :, None]).reshape(C, -1))
        self.XtX_up = XtX_up
        self.chunk = max(8, CHUNK_BYTES // (8 * C))

    def held_arrays(self) -> list:
        return [self.L_det, self.L_lin, self.L_T, self.L_TT, self.KfT_all, self.XsT_all, self.Xs_stack, self.LX]

    def chunks(self, v: int):
        return [slice(s, min(s + self.chunk, v)) for s in range(0, v, self.chunk)]

    def products(self, D: np.ndarray, XtY: np.ndarray, YtY: np.ndarray, ys: list):
        """X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| at D (v, 2, 2): LevelObjective.products without R."""
        v, p, C = D.shape[0], self.p, self.C
        XtVY = np.array(XtY, dtype=np.float64, copy=True)
        YtVY = np.array(YtY, dtype=np.float64, copy=True)
        logdetV = np.empty(v)
        W_all = np.empty((v, 3, C))
        WY_all = np.empty((v, 2, C))
        for sl in self.chunks(v):
            d00, d01, d11 = D[sl, 0, 0], D[sl, 0, 1], D[sl, 1, 1]
            delta = d00 * d11 - d01 * d01
            vc = d00.size
            det = np.stack([np.ones(vc), d00, d01, d11, delta], axis=1) @ self.L_det  # (vc, C)
            inv = np.divide(1.0, det)
            logdetV[sl] = _sum_of_logs(det)
            coef_w = _w_coefficients(d00, d01, d11, delta)
            W = W_all[sl]
            for k in range(3):
                np.matmul(coef_w[k], self.L_lin, out=W[:, k])
            W *= inv[:, None, :]
            y0, y1 = ys[0][sl], ys[1][sl]
            WY = WY_all[sl]  # (W y)_a
            tmp = np.empty((vc, C))
            np.multiply(W[:, 0], y0, out=WY[:, 0])
            WY[:, 0] += np.multiply(W[:, 1], y1, out=tmp)
            np.multiply(W[:, 1], y0, out=WY[:, 1])
            WY[:, 1] += np.multiply(W[:, 2], y1, out=tmp)
            YtVY[sl] -= np.einsum("vj,vj->v", WY[:, 0], y0) + np.einsum("vj,vj->v", WY[:, 1], y1)
        # one product over the whole block: the constant K' (18 MB at ABCD) is streamed once, not per chunk; voxels
        # as the GEMM's rows (W K, not (K' W')') is as fast on whole blocks and ~1.6x faster on a few voxels
        XtVX_up = self.XtX_up - W_all.reshape(v, 3 * C) @ self.KfT_all.T
        XtVY -= WY_all.reshape(v, 2 * C) @ self.Xs_stack
        return la.unpack_sym(XtVX_up, p), XtVY, YtVY, logdetV

    def gradient(self, D: np.ndarray, ys: list, beta: np.ndarray, C_gls: np.ndarray | None, sigma2: np.ndarray):
        """T_sum, uu_sum, corr (Σ P_j, or zeros without C_gls), the expected information (v, 4, 4), the
        observed information's unit sums Σ T⊗(2uu'/σ² + 2P) - Σ T⊗T (v, 4, 4), A_xy = Σ_j S_j[x]'u_j[y]
        (v, 4, p), and R's entries (v, C) for the Hessian's direction sums."""
        v, p, C = D.shape[0], self.p, self.C
        reml = C_gls is not None
        R_all = np.empty((4, v, C))
        S_T = np.empty((v, 4))  # Σ_j [g00, g01, g11, γ]_j / det_j
        S_TT = np.empty((v, 10))
        S_TW = np.empty((v, 3, 4))  # per (d, a) pair: Σ_j [g, γ]_j (2uu'/σ² + 2P)_da / det_j
        uu = np.empty((v, 3))
        corr = np.zeros((v, 3))
        A = np.empty((v, 4, p))
        cvec = la.pack_sym(C_gls, double_offdiag=True) if reml else None
        H_all = cvec @ self.KfT_all if reml else None  # (v, 3C): <K_j^{ab}, Ω>, one product over the block
        for sl in self.chunks(v):
            d00, d01, d11 = D[sl, 0, 0], D[sl, 0, 1], D[sl, 1, 1]
            delta = d00 * d11 - d01 * d01
            vc = d00.size
            det = np.stack([np.ones(vc), d00, d01, d11, delta], axis=1) @ self.L_det
            inv = np.divide(1.0, det, out=det)
            S_T[sl] = inv @ self.L_T
            R = R_all[:, sl]  # adj(I + G D)/det: entries 00, 01, 10, 11
            coef = _r_coefficients(d00, d01, d11)
            for k in range(4):
                np.matmul(coef[k], self.L_lin, out=R[k])
            R *= inv[None]
            # residuals r_j = y_j - X_j β, then u_j = R_j r_j
            r = beta[sl] @ self.XsT_all  # (vc, 2C)
            r0, r1 = r[:, :C], r[:, C:]
            np.subtract(ys[0][sl], r0, out=r0)
            np.subtract(ys[1][sl], r1, out=r1)
            U = np.empty((vc, 2, C))
            tmp = np.empty((vc, C))
            np.multiply(R[0], r0, out=U[:, 0])
            U[:, 0] += np.multiply(R[1], r1, out=tmp)
            np.multiply(R[2], r0, out=U[:, 1])
            U[:, 1] += np.multiply(R[3], r1, out=tmp)
            Z = np.empty((3, vc, C))  # u_d u_a, then (uu'/σ² + P)/det
            for k, (a, b) in enumerate(PAIRS):
                np.multiply(U[:, a], U[:, b], out=Z[k])
            uu[sl] = np.einsum("kvj->vk", Z)
            # A_xy = Σ_j Σ_e R_xe u_y X_j[e] = Σ_e Σ_k c_xek Σ_j L_ek X_j[e] u_y/det
            U *= inv[:, None, :]
            G = (U.reshape(2 * vc, C) @ self.LX).reshape(vc, 2, 2, 3, p)  # [v, y, e, k]
            A[sl] = np.einsum("xevk,vyekp->vxyp", _r_column_coefficients(d00, d01, d11), G).reshape(vc, 4, p)
            Z *= (1.0 / sigma2[sl])[None, :, None]
            if reml:
                H = H_all[sl]  # pairs 00, 01, 11
                H[:, C:2 * C] *= 0.5  # H_01 = <K01 + K10, Ω>/2
                H0, H1, H2 = H[:, :C], H[:, C:2 * C], H[:, 2 * C:]
                P = np.empty((3, vc, C))
                RH = np.empty((2, vc, C))  # row a of R H, for a = 0 then 1: P_ab = Σ_f (RH)_af R_bf
                for a in range(2):
                    ra0, ra1 = R[2 * a], R[2 * a + 1]
                    np.multiply(ra0, H0, out=RH[0])
                    RH[0] += np.multiply(ra1, H1, out=tmp)
                    np.multiply(ra0, H1, out=RH[1])
                    RH[1] += np.multiply(ra1, H2, out=tmp)
                    for b in range(a, 2):
                        k = _pair(a, b)
                        np.multiply(RH[0], R[2 * b], out=P[k])
                        P[k] += np.multiply(RH[1], R[2 * b + 1], out=tmp)
                corr[sl] = np.einsum("kvj->vk", P)
                Z += P
            Z *= inv[None]
            S_TW[sl] = 2.0 * np.matmul(Z, self.L_T).transpose(1, 0, 2)
            np.multiply(inv, inv, out=inv)
            S_TT[sl] = inv @ self.L_TT
        s = np.stack([D[:, 1, 1], -D[:, 0, 1], D[:, 0, 0]], axis=1)  # T_x = (g_x + γ s_x)/det
        T_pairs = S_T[:, :3] + s * S_T[:, 3:4]
        TT = np.empty((v, 3, 3))
        col = 0
        for x in range(3):
            for y in range(x, 3):
                TT[:, x, y] = (S_TT[:, col] + s[:, y] * S_TT[:, 6 + x] + s[:, x] * S_TT[:, 6 + y]
                               + s[:, x] * s[:, y] * S_TT[:, 9])
                TT[:, y, x] = TT[:, x, y]
                col += 1
        TW = S_TW[:, :, :3] + s[:, None, :] * S_TW[:, :, 3:4]  # (v, (d,a) pair, (b,c) pair)
        info = np.empty((v, 2, 2, 2, 2))
        M = np.empty((v, 2, 2, 2, 2))
        for a in range(2):  # F[(a,b),(c,e)] = Σ T[b,c] T[a,e];  M[(a,b),(c,d)] = Σ T[b,c] W[d,a]
            for b in range(2):
                for c in range(2):
                    for e in range(2):
                        info[:, a, b, c, e] = TT[:, _pair(b, c), _pair(a, e)]
                        M[:, a, b, c, e] = TW[:, _pair(e, a), _pair(b, c)]
        info = info.reshape(v, 4, 4)
        T_sum = _pairs_matrix(T_pairs)
        uu_sum = _pairs_matrix(uu)
        corr_m = _pairs_matrix(corr)
        return T_sum, uu_sum, corr_m, info, M.reshape(v, 4, 4) - info, A, [R_all[k] for k in range(4)]

    def direction_sums(self, R: list) -> np.ndarray:
        """LevelObjective.direction_sums: B_t = Σ_j S_j' E_t S_j (v, 3, p, p) for vech directions E_t, from R's
        entries [a][b]; the coefficient arrays in voxel chunks, then one product of K' with all of them."""
        v, C, p = R[0][0].shape[0], self.C, self.p
        coef = np.empty((3, v, 3, C))  # [t, voxel, pair (e, f)]: R_ae R_bf + R_be R_af (halved for a = b)
        for sl in self.chunks(v):
            tmp = np.empty((sl.stop - sl.start, C))
            for t, (a, b) in enumerate(VECH):
                for m, (e, f) in enumerate(PAIRS):
                    out = coef[t, sl, m]
                    np.multiply(R[a][e][sl], R[b][f][sl], out=out)
                    if a == b:
                        continue
                    out += np.multiply(R[b][e][sl], R[a][f][sl], out=tmp)
        Bup = coef.reshape(3 * v, 3 * C) @ self.KfT_all.T  # (3v, p(p+1)/2)
        return la.unpack_sym(Bup.reshape(3, v, -1), p).transpose(1, 0, 2, 3)


def _sum_of_logs(det: np.ndarray) -> np.ndarray:
    """Σ_j log det_j per row (every level a unit of one member), det_j ≥ 1: logs of products of four levels
    (a log costs ~4 products), or of each level where a product of four overflows."""
    h = det.shape[1] // 2
    q = h // 2
    two = det[:, :h] * det[:, h:2 * h]
    four = two[:, :q] * two[:, q:2 * q]
    out = np.log(four).sum(axis=1) + np.log(two[:, 2 * q:]).sum(axis=1) + np.log(det[:, 2 * h:]).sum(axis=1)
    bad = ~np.isfinite(out)
    if np.any(bad):
        out[bad] = np.log(det[bad]).sum(axis=1)
    return out


def _pairs_matrix(x: np.ndarray) -> np.ndarray:
    """(v, 2, 2) symmetric matrices from their entries 00, 01, 11."""
    out = np.empty((x.shape[0], 2, 2))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = x[:, 0], x[:, 1], x[:, 1], x[:, 2]
    return out

"""One random factor with voxel-specific missing rows, without per-pattern objectives.

A voxel v whose images M_v are missing differs from the common (complete) design only at
the levels that M_v touches (docs/model.md, "Missing rows").  Untouched levels keep their
class and the class's shared weights: the common pattern is one `LevelObjective`, whose
class sums run over *every* level with the voxel's own data sums (missing entries add
zero).  Each touched level j then enters as two per-voxel units:

* a removal unit (sign -1) with the common G_j, X_j = Z_j'X and the voxel's y_j(v), which
  cancels exactly the term the class sums hold for j;
* a replacement unit (sign +1) with G_j(v) = G_j - Z_{j,M}'Z_{j,M},
  X_j(v) = X_j - Z_{j,M}'X_M and the same y_j(v) (absent when j lost every image).

Every quantity the scoring loop needs (log|V|, X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y, Σ T_j, Σ u_j u_j',
Σ S_j C S_j', the expected and observed information) is a sum over levels, so each is the
class sum minus the removal terms plus the replacement terms; X'X_v = X'X - X_M'X_M.
Units are padded (sign 0) to a per-voxel bucket of touched-level counts, so one block is
vectorised whatever the number of distinct patterns; the cost per evaluation is
O(v t (q^3 + q p^2)) on top of the complete-data cost, t the touched levels.

The number of observed rows n_v is per voxel (`MissingData.n`); the fit groups voxels by
n_v so that the scoring loop sees one n per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core import linalg as la
from blmm.core.objective.base import Evaluation, profiled
from blmm.core.objective.levels import LevelData, LevelObjective, hessian_from_parts


class MissingObjective:
    """One factor (q effects per level): the common design's classes plus per-voxel units."""

    missing_rows = True
    has_deviance_hessian = True

    def __init__(self, XtX, ZtX, ZtZ, n, q, reml, base: LevelObjective | None = None):
        """``base``: the complete design's `LevelObjective` of these sums, where one is built already."""
        self.base = LevelObjective(XtX, ZtX, ZtZ, n, q, reml) if base is None else base
        self.n, self.p, self.q, self.reml = int(n), self.base.p, int(q), bool(reml)

    @classmethod
    def of_level(cls, base: LevelObjective) -> "MissingObjective":
        """The missing-rows objective around a complete design's `LevelObjective` (sharing its arrays)."""
        return cls(None, None, None, base.n, base.q, base.reml, base=base)

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units: dict | None = None) -> "MissingData":
        """Per-voxel data sums plus the voxels' missing-row units and unit groups (none: the common
        design).  ZtY: (v, L q), or the class-arranged `LevelSums` (missing_rows.py); units:
        n (v,), dXtX and the padded units and groups (`padded_units`, `compress_units`)."""
        v = XtY.shape[0]
        p, q = self.p, self.q
        if isinstance(ZtY, np.ndarray):
            base = self.base.data(XtY, ZtY, YtY)
        else:
            base = self.base.data_from_sums(XtY, YtY, ZtY.KXYo, ZtY.KYY, ZtY.y_small)
        units = {} if units is None else units
        n, dXtX = units.get("n"), units.get("dXtX")
        sign, G, X, y = (units.get(key) for key in ("sign", "G", "X", "y"))
        group_weight, group_G, group_K = (units.get(key) for key in ("group_weight", "group_G", "group_K"))
        if sign is None:
            sign, G, X, y = np.zeros((v, 0)), np.zeros((v, 0, q, q)), np.zeros((v, 0, q, p)), np.zeros((v, 0, q))
        if group_weight is None:
            group_weight, group_G = np.zeros((v, 0)), np.zeros((v, 0, q, q))
            group_K = np.zeros((v, 0, q, q, p + 1, p + 1))
        return MissingData(
            base=base, XtY=base.XtY, n=np.full(v, float(self.n)) if n is None else np.asarray(n, float),
            dXtX=np.zeros((v, p, p)) if dXtX is None else dXtX, sign=sign, G=G, X=X, y=y,
            group_weight=group_weight, group_G=group_G, group_K=group_K)

    def per_voxel_bytes(self) -> int:
        """Working memory per voxel beside its units: the class weights and data sums (LevelSums,
        LevelData: KXY, KYY, KXYo), for block sizing."""
        base, q = self.base, self.q
        return 8 * (12 * base.C * q ** 2 + base.Cb * (len(base.pairs) * (self.p + 1) + q * q * self.p))

    def held_bytes(self) -> int:
        return self.base.held_bytes()

    def products(self, D, data: "MissingData"):
        """X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| of each voxel's own rows, with the resolvents of the
        classes (R), of the units (Ru) and of the unit groups (Rg; None where a block has none)."""
        XtVX, XtVY, YtVY, logdetV, R = self.base.products(D, data.base)
        XtVX = XtVX + data.dXtX
        Ru = Rg = None
        if data.sign.shape[1]:
            dXtVX, dXtVY, dYtVY, dlogdetV, Ru = unit_products(D, data.sign, data.G, data.X, data.y)
            XtVX, XtVY, YtVY, logdetV = XtVX + dXtVX, XtVY + dXtVY, YtVY + dYtVY, logdetV + dlogdetV
        if data.group_weight.shape[1]:
            dXtVX, dXtVY, dYtVY, dlogdetV, Rg = group_products(D, data.group_weight, data.group_G, data.group_K)
            XtVX, XtVY, YtVY, logdetV = XtVX + dXtVX, XtVY + dXtVY, YtVY + dYtVY, logdetV + dlogdetV
        return XtVX, XtVY, YtVY, logdetV, R, Ru, Rg

    def evaluate(self, D_list, data: "MissingData", sigma2=None, grad=False) -> Evaluation:
        D = D_list[0]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            XtVX, XtVY, YtVY, logdetV, R, Ru, Rg = self.products(D, data)
        ev = profiled(XtVX, XtVY, YtVY, logdetV, data.n, self.p, self.reml, sigma2)
        if not grad:
            return ev
        xp = la.namespace(ev.beta)
        base = self.base
        beta, C = ev.beta, ev.C
        v, q = D.shape[0], self.q
        P = base.unit_P(R, C) if self.reml else None
        uu_parts = base.unit_uu(R, data.base, beta)
        T_sum, uu, corr, info = base.gradient_parts(R, data.base, beta, None, P=P, uu_parts=uu_parts)
        # the observed information's unit sums over the classes; its -2 A C A'/σ² is formed below
        # from A recombined with the touched levels' units
        obs = base.observed_unit_terms(R, P, data.base, _with_info(ev, info), ev.sigma2, uu_parts)
        A = base.cross_sums(R, data.base, beta, uu_parts[1])
        terms = unit_terms(Ru, Rg, data, beta, C if self.reml else None)
        T_sum, uu, corr, info = T_sum + terms.T_sum, uu + terms.uu, corr + terms.corr, info + terms.info
        obs = obs - terms.info  # the units' information, its observed counterpart added below
        if terms.units is not None:
            units, s = terms.units, data.sign
            Wu = 2.0 * units.u[..., :, None] * units.u[..., None, :] / ev.sigma2[:, None, None, None]
            if self.reml:
                Wu = Wu + 2.0 * units.P
            # M[(a,b),(c,d)] = Σ_units T[b,c] W[d,a]
            obs = obs + xp.reshape(la.einsum(xp, "vt,vtbc,vtda->vabcd", s, units.T, Wu), (v, q * q, q * q))
            A = A + la.einsum(xp, "vt,vtxp,vty->vxyp", s, units.S, units.u)
        if terms.groups is not None:
            groups = terms.groups
            Wg = 2.0 * groups.uu / ev.sigma2[:, None, None, None]
            if self.reml:
                Wg = Wg + 2.0 * groups.P
            obs = obs + xp.reshape(la.einsum(xp, "vhbc,vhda->vabcd", groups.T, Wg), (v, q * q, q * q))
            A = A + groups.A
        A = xp.reshape(A, (v, q * q, self.p))
        obs = obs - 2.0 * la.einsum(xp, "vip,vpr,vjr->vij", A, C, A) / ev.sigma2[:, None, None]
        ev.grad = [la.sym(T_sum - corr - uu / ev.sigma2[:, None, None])]
        ev.info = info
        ev.T_sum = [T_sum]
        ev.uu_sum = [uu]
        ev.observed = la.sym(obs)
        return ev

    def deviance_hessian(self, D_list, data: "MissingData", sigma2: np.ndarray, ev: Evaluation | None = None):
        """Observed Hessian of the deviance in vech D at fixed σ² (β profiled), analytically:
        LevelObjective's formula with every sum over levels taken as classes - removal + replacement units."""
        D = D_list[0]
        if ev is None or ev.observed is None:
            ev = self.evaluate([D], data, sigma2=sigma2, grad=True)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            *_, R, Ru, Rg = self.products(D, data)
        xp = la.namespace(ev.beta)
        mT = xp.matrix_transpose
        Bs = self.base.direction_sums(R)
        if Ru is not None:  # + Σ_units sign S_t' E S_t, S_t = R_t X_t
            S = small_product(Ru, data.X)
            r_idx, c_idx = la.vech_index(self.q)
            for t, (a, b) in enumerate(zip(r_idx, c_idx)):
                B = mT(data.sign[:, :, None] * S[:, :, a, :]) @ S[:, :, b, :]  # a GEMM per voxel
                Bs[:, t, ...] += B if a == b else B + mT(B)
        if Rg is not None:  # + Σ_groups R[a,c] R[b,d] K[c,d] (X block)
            v, H_, p = Rg.shape[0], Rg.shape[1], self.p
            K = xp.reshape(data.group_K, (v, H_ * self.q * self.q, (p + 1) ** 2))
            r_idx, c_idx = la.vech_index(self.q)
            for t, (a, b) in enumerate(zip(r_idx, c_idx)):
                RR = xp.reshape(Rg[:, :, a, :, None] * Rg[:, :, b, None, :], (v, 1, -1))
                B = xp.reshape(RR @ K, (v, p + 1, p + 1))[:, :p, :p]
                Bs[:, t, ...] += B if a == b else B + mT(B)
        H, dC = hessian_from_parts(ev.observed, Bs, ev.C, self.q, self.reml)
        return H, dC, ev


def unit_products(D: np.ndarray, sign: np.ndarray, G: np.ndarray, X: np.ndarray, y: np.ndarray):
    """The units' signed terms of X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| (to add to the class sums),
    and R_t = (I + G_t D)⁻¹ per unit.  D (v, q, q); sign (v, T); G (v, T, q, q); X (v, T, q, p); y (v, T, q)."""
    xp = la.namespace(D, sign, G, X, y)
    v, T = sign.shape
    q, p = G.shape[-1], X.shape[-1]
    Ru, W, dlogdetV = _resolvents(D, sign, G)
    sX = xp.reshape(sign[:, :, None, None] * X, (v, T * q, p))
    WX = xp.reshape(small_product(W, X), (v, T * q, p))
    dXtVX = -(xp.matrix_transpose(sX) @ WX)
    Wy = xp.reshape(la.einsum(xp, "vtab,vtb->vta", W, y), (v, T * q))
    dXtVY = -la.einsum(xp, "vk,vkp->vp", Wy, sX)
    dYtVY = -la.einsum(xp, "vt,vta,vta->v", sign, y, xp.reshape(Wy, (v, T, q)))
    return dXtVX, dXtVY, dYtVY, dlogdetV, Ru


@dataclass
class UnitParts:
    """Per unit T_t = R_t G_t, u_t = R_t(y_t - X_t β), S_t = R_t X_t, P_t = S_t C S_t' (REML),
    and the signed sums Σ s T_t, Σ s u_t u_t', Σ s P_t (zero for ML)."""

    T: np.ndarray  # (v, T, q, q)
    u: np.ndarray  # (v, T, q)
    S: np.ndarray  # (v, T, q, p)
    P: np.ndarray | None  # (v, T, q, q)
    T_sum: np.ndarray  # (v, q, q)
    uu: np.ndarray
    corr: np.ndarray


def unit_gradient_parts(Ru, sign, G, X, y, beta, C=None) -> UnitParts:
    """The units' pieces of the deviance gradient (C = (X'V⁻¹X)⁻¹ for REML, None for ML)."""
    xp = la.namespace(Ru, beta)
    Tu = la.sym(small_product(Ru, G))
    v, T, q, p = X.shape
    r = y - xp.reshape(xp.reshape(X, (v, T * q, p)) @ beta[:, :, None], (v, T, q))
    u = la.einsum(xp, "vtab,vtb->vta", Ru, r)
    S = small_product(Ru, X)  # (v, T, q, p): S_t = R_t X_t
    P = None
    corr = xp.zeros(Tu.shape[:1] + Tu.shape[2:], dtype=Tu.dtype, device=la.device_of(Tu))
    if C is not None:  # one GEMM per voxel, not one tiny product per unit
        SC = xp.reshape(xp.reshape(S, (v, T * q, p)) @ C, (v, T, q, p))
        P = la.einsum(xp, "vtap,vtbp->vtab", SC, S)
        corr = la.einsum(xp, "vt,vtab->vab", sign, P)
    return UnitParts(T=Tu, u=u, S=S, P=P, T_sum=la.einsum(xp, "vt,vtab->vab", sign, Tu),
                     uu=la.einsum(xp, "vt,vta,vtb->vab", sign, u, u), corr=corr)


@dataclass
class UnitTerms:
    """What a voxel's units and unit groups add to the class sums' Σ T, Σ u u', Σ P (zero without C)
    and expected information F[(a,b),(c,e)] = Σ T[b,c] T[a,e], and their parts (None: none)."""

    T_sum: np.ndarray  # (v, q, q)
    uu: np.ndarray
    corr: np.ndarray
    info: np.ndarray  # (v, q², q²)
    units: UnitParts | None
    groups: "GroupParts | None"


def unit_terms(Ru, Rg, data: "MissingData", beta, C=None) -> UnitTerms:
    """The units' and groups' terms of the gradient and expected information at (β, C), from their
    resolvents (`MissingObjective.products`); C: (X'V⁻¹X)⁻¹ for REML (or any p x p matrix the caller's
    Σ P takes, e.g. Schur's Ω), None for ML."""
    xp = la.namespace(beta)
    v, q = beta.shape[0], data.G.shape[-1]
    zero = xp.zeros((v, q, q), dtype=beta.dtype, device=la.device_of(beta))
    out = UnitTerms(zero, zero, zero, xp.zeros((v, q * q, q * q), dtype=beta.dtype, device=la.device_of(beta)),
                    None, None)
    if Ru is not None:
        s = data.sign
        units = unit_gradient_parts(Ru, s, data.G, data.X, data.y, beta, C)
        out.units = units
        out.T_sum, out.uu, out.corr = out.T_sum + units.T_sum, out.uu + units.uu, out.corr + units.corr
        out.info = out.info + xp.reshape(la.einsum(xp, "vt,vtbc,vtae->vabce", s, units.T, units.T), (v, q * q, q * q))
    if Rg is not None:
        w = data.group_weight
        groups = group_gradient_parts(Rg, data.group_G, data.group_K, beta, C)
        out.groups = groups
        out.T_sum = out.T_sum + la.einsum(xp, "vh,vhab->vab", w, groups.T)
        out.info = out.info + xp.reshape(la.einsum(xp, "vh,vhbc,vhae->vabce", w, groups.T, groups.T),
                                         (v, q * q, q * q))
        out.uu = out.uu + xp.sum(groups.uu, axis=1)
        if groups.P is not None:
            out.corr = out.corr + xp.sum(groups.P, axis=1)
    return out


def group_products(D: np.ndarray, weight: np.ndarray, G: np.ndarray, K: np.ndarray):
    """`unit_products` for unit groups: a voxel's units with one G_h enter through their weight
    sum and Gram matrix K_h[a, b, i, j] = Σ s_t [X_t | y_t][a, i] [X_t | y_t][b, j] (p + 1 columns).
    D (v, q, q); weight (v, H); G (v, H, q, q); K (v, H, q, q, p + 1, p + 1)."""
    xp = la.namespace(D, weight, G, K)
    v, H, q = G.shape[:3]
    p = K.shape[-1] - 1
    Rg, W, dlogdetV = _resolvents(D, weight, G)
    M = -xp.reshape(xp.reshape(W, (v, 1, H * q * q)) @ xp.reshape(K, (v, H * q * q, (p + 1) ** 2)),
                    (v, p + 1, p + 1))
    return M[:, :p, :p], M[:, :p, p], M[:, p, p], dlogdetV, Rg


@dataclass
class GroupParts:
    """Per unit group T_h = R_h G_h and the group's sums Σ s u_t u_t' = R_h N_h R_h',
    Σ s P_t = R_h (Σ s X_t C X_t') R_h' (REML) and A_h[x, y, i] = Σ s S_t[x, i] u_t[y]."""

    T: np.ndarray  # (v, H, q, q)
    uu: np.ndarray  # (v, H, q, q)
    P: np.ndarray | None  # (v, H, q, q)
    A: np.ndarray  # (v, q, q, p) summed over groups


def group_gradient_parts(Rg, G, K, beta, C=None) -> GroupParts:
    """The groups' pieces of the deviance gradient (C for REML, None for ML)."""
    xp = la.namespace(Rg, beta)
    v, H, q = G.shape[:3]
    p = beta.shape[1]
    Tg = la.sym(small_product(Rg, G))
    e = xp.concat([-beta, xp.ones((v, 1), dtype=beta.dtype, device=la.device_of(beta))], axis=1)  # [X | y] e = y - X β
    Ke = xp.reshape(xp.reshape(K, (v, H * q * q * (p + 1), p + 1)) @ e[:, :, None], (v, H, q, q, p + 1))
    N = xp.reshape(xp.reshape(Ke, (v, H * q * q, p + 1)) @ e[:, :, None], (v, H, q, q))

    def sandwich(M):  # R M R' per group
        return small_product(small_product(Rg, M), xp.matrix_transpose(Rg))

    P = None
    if C is not None:
        Cpad = xp.zeros((v, p + 1, p + 1), dtype=C.dtype, device=la.device_of(C))
        Cpad[:, :p, :p] = C
        XCX = xp.reshape(xp.reshape(K, (v, H * q * q, (p + 1) ** 2)) @ xp.reshape(Cpad, (v, -1, 1)), (v, H, q, q))
        P = sandwich(XCX)
    A = la.einsum(xp, "vhxa,vhyb,vhabi->vxyi", Rg, Rg, Ke[..., :p])
    return GroupParts(T=Tg, uu=sandwich(N), P=P, A=A)


def _resolvents(D: np.ndarray, weight: np.ndarray, G: np.ndarray):
    """Per unit or group (v, T, q, q): R = (I + G D)⁻¹, W = D R (symmetrised) and Σ weight log|I + G D|."""
    xp = la.namespace(D, weight, G)
    A = xp.eye(G.shape[-1], dtype=G.dtype, device=la.device_of(G)) + small_product(G, D[:, None, ...])
    R = _inv(A)
    return R, la.sym(small_product(D[:, None, ...], R)), la.einsum(xp, "vt,vt->v", weight, _logdet(A))


def small_product(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A @ B for stacks of q x q (q a handful) times q x k matrices, as q broadcast products:
    numpy's matmul costs far more per tiny matrix than the arithmetic."""
    out = A[..., :, 0, None] * B[..., 0, None, :]
    for e in range(1, A.shape[-1]):
        out = out + A[..., :, e, None] * B[..., e, None, :]
    return out


def _with_info(ev: Evaluation, info) -> Evaluation:
    out = Evaluation(llh=ev.llh, beta=ev.beta, sigma2=ev.sigma2, C=ev.C, Q=ev.Q, ok=ev.ok)
    out.info = info
    return out


def _inv(A: np.ndarray) -> np.ndarray:
    xp = la.namespace(A)
    q = A.shape[-1]
    if q == 1:
        return 1.0 / A
    if q == 2:
        det = A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
        out = xp.empty_like(A)
        out[..., 0, 0] = A[..., 1, 1] / det
        out[..., 1, 1] = A[..., 0, 0] / det
        out[..., 0, 1] = -A[..., 0, 1] / det
        out[..., 1, 0] = -A[..., 1, 0] / det
        return out
    return xp.linalg.inv(A)


def _logdet(A: np.ndarray) -> np.ndarray:
    xp = la.namespace(A)
    q = A.shape[-1]
    if q == 1:
        return xp.log(A[..., 0, 0])
    if q == 2:
        return xp.log(A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0])
    sign, logdet = xp.linalg.slogdet(A)
    return xp.where(sign > 0, logdet, xp.nan)


@dataclass
class MissingData:
    """Data sums for the common design's classes plus each voxel's missing-row units.

    sign (v, T): -1 removal, +1 replacement, 0 padding; G (v, T, q, q), X (v, T, q, p) and
    y (v, T, q) per unit; n (v,) observed rows; dXtX (v, p, p) = -X_M'X_M.  Unit groups (a
    voxel's units of one G, `compress_units`): group_weight (v, H) Σ s_t (0 padding), group_G
    (v, H, q, q), group_K (v, H, q, q, p + 1, p + 1) Σ s_t [X_t | y_t][a, i] [X_t | y_t][b, j].
    """

    base: LevelData
    XtY: np.ndarray
    n: np.ndarray
    dXtX: np.ndarray
    sign: np.ndarray
    G: np.ndarray
    X: np.ndarray
    y: np.ndarray
    group_weight: np.ndarray
    group_G: np.ndarray
    group_K: np.ndarray

    def take(self, idx) -> "MissingData":
        rows = la.select_rows
        return MissingData(self.base.take(idx), rows(self.XtY, idx), rows(self.n, idx), rows(self.dXtX, idx),
                           rows(self.sign, idx), rows(self.G, idx), rows(self.X, idx), rows(self.y, idx),
                           rows(self.group_weight, idx), rows(self.group_G, idx), rows(self.group_K, idx))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.dXtX, self.sign, self.G, self.X, self.y, self.group_weight,
                                          self.group_G, self.group_K)))

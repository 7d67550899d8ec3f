"""Nested factors with voxel-specific missing rows, without per-pattern objectives.

The nested elimination (nested.py) treats each outer level (family) as one "level" of a
`LevelObjective` with q = its block size, so missing rows work one level up exactly as
for one factor (missing.py, docs/model.md "Missing rows"): the complete design's
`NestedObjective` is shared, its class sums run over every family with the voxel's own
data sums (missing entries add zero), and each family that a voxel's missing rows touch
enters as two per-voxel units of its block-shape group g:

* a removal unit (sign -1) with the common block G_j, X_j = Z_j'X and y_j(v), which
  cancels exactly the term the class sums hold for j;
* a replacement unit (sign +1) with G_j(v) = G_j - Z_{j,M}'Z_{j,M}, X_j(v) = X_j - Z_{j,M}'X_M
  and y_j(v) (absent when the family lost every image).

The replacement keeps the family's block shape and its map P_g: a subject that lost every
image leaves zero rows and columns in G_j(v) (its effect then adds nothing to log|V| or any
product), and a dropped family intercept stays dropped, because Z_f = Σ_s Z_s a holds row
by row and so for any subset of rows.  Every quantity is a sum over families, so each is
the class sum minus the removal terms plus the replacement terms, mapped through P_g as
the class sums are.  Units are padded per group to the block's largest count (sign 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core import linalg as la
from blmm.core.objective.base import Evaluation, profiled
from blmm.core.objective.missing import unit_gradient_parts, unit_products
from blmm.core.objective.nested import NestedData, NestedObjective, with_gradient


@dataclass
class GroupUnits:
    """One block-shape group's units: sign (v, T) (-1 removal, +1 replacement, 0 padding),
    G (v, T, b, b), X (v, T, b, p), y (v, T, b)."""

    sign: np.ndarray
    G: np.ndarray
    X: np.ndarray
    y: np.ndarray

    def take(self, idx) -> "GroupUnits":
        rows = la.select_rows
        return GroupUnits(rows(self.sign, idx), rows(self.G, idx), rows(self.X, idx), rows(self.y, idx))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.sign, self.G, self.X, self.y)))


@dataclass
class NestedMissingData:
    """Data sums for the common design's classes plus each voxel's units per group.

    n (v,) observed rows; dXtX (v, p, p) = -X_M'X_M; units: one GroupUnits per group of the
    `NestedObjective` (in its order)."""

    base: NestedData
    XtY: np.ndarray
    n: np.ndarray
    dXtX: np.ndarray
    units: list

    def take(self, idx) -> "NestedMissingData":
        rows = la.select_rows
        return NestedMissingData(self.base.take(idx), rows(self.XtY, idx), rows(self.n, idx), rows(self.dXtX, idx),
                                 [u.take(idx) for u in self.units])


class NestedMissingObjective:
    """A nesting tree (the complete design's `NestedObjective`) plus per-voxel units of touched families."""

    missing_rows = True
    has_deviance_hessian = False

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, tree: list[int] | None = None,
                 base: NestedObjective | None = None):
        """``base``: the complete design's `NestedObjective` of these sums, where one is built already."""
        self.base = NestedObjective(XtX, ZtX, ZtZ, n, layout, reml, tree) if base is None else base
        self.n, self.p, self.reml = int(self.base.n), self.base.p, bool(self.base.reml)
        self.tree = self.base.tree

    @classmethod
    def of_nested(cls, base: NestedObjective) -> "NestedMissingObjective":
        """The missing-rows objective around a complete design's `NestedObjective` (sharing its arrays)."""
        return cls(None, None, None, base.n, None, base.reml, base=base)

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units: dict | None = None) -> NestedMissingData:
        """Per-voxel data sums plus the voxels' units per group (none: the common design); units:
        n (v,), dXtX (v, p, p) and "units", one `GroupUnits` per group (`FamilyUnits.block_units`)."""
        return self.data_from_base(self.base.data(XtY, ZtY, YtY), units)

    def data_from_sums(self, sums: list, units: dict | None = None) -> NestedMissingData:
        """`data` from each group's class-aggregated sums (`LevelSums`) instead of Z'Y."""
        return self.data_from_base(self.base.data_from_sums(sums), units)

    def data_from_base(self, base: NestedData, units: dict | None = None) -> NestedMissingData:
        """The common design's data plus the voxels' units per group."""
        v, p = base.XtY.shape
        units = {} if units is None else units
        n, dXtX, groups = units.get("n"), units.get("dXtX"), units.get("units")
        if groups is None:
            groups = [GroupUnits(np.zeros((v, 0)), np.zeros((v, 0, lv.q, lv.q)), np.zeros((v, 0, lv.q, p)),
                                 np.zeros((v, 0, lv.q))) for lv in self.base.levels]
        return NestedMissingData(base=base, XtY=base.XtY, n=np.full(v, float(self.n)) if n is None else
                                 np.asarray(n, float), dXtX=np.zeros((v, p, p)) if dXtX is None else dXtX,
                                 units=groups)

    def per_voxel_bytes(self) -> int:
        """Working memory per voxel beside its units (the complete design's), for block sizing."""
        return self.base.per_voxel_bytes()

    def held_bytes(self) -> int:
        return self.base.held_bytes()

    def products(self, D_list, data: NestedMissingData):
        """X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| of each voxel's own rows, with the resolvents of the
        groups' classes (Rs) and of each group's units (Ru; None where a group has none)."""
        XtVX, XtVY, YtVY, logdetV, Rs = self.base.products(D_list, data.base)
        XtVX = XtVX + data.dXtX
        Ru = []
        for g, u in enumerate(data.units):
            if u.sign.shape[1] == 0:
                Ru.append(None)
                continue
            dXtVX, dXtVY, dYtVY, dlogdetV, R = unit_products(self.base.block_D(D_list, g), u.sign, u.G, u.X, u.y)
            XtVX, XtVY, YtVY, logdetV = XtVX + dXtVX, XtVY + dXtVY, YtVY + dYtVY, logdetV + dlogdetV
            Ru.append(R)
        return XtVX, XtVY, YtVY, logdetV, Rs, Ru

    def evaluate(self, D_list, data: NestedMissingData, sigma2=None, grad=False) -> Evaluation:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # bad voxels are flagged by profiled()
            XtVX, XtVY, YtVY, logdetV, Rs, Ru = self.products(D_list, data)
        ev = profiled(la.sym(XtVX), XtVY, YtVY, logdetV, data.n, self.p, self.reml, sigma2)
        if not grad:
            return ev
        return with_gradient(ev, *self.gradient_parts(Rs, Ru, data, ev.beta, ev.C if self.reml else None))

    def gradient_parts(self, Rs, Ru, data: NestedMissingData, beta, C=None):
        """Per tree factor Σ T, Σ uu', Σ S C S' (C: (X'V⁻¹X)⁻¹ for REML, or any p x p matrix the caller's
        sums take, e.g. Schur's Ω; None for ML) and the expected information: the classes' plus the units'."""
        xp = la.namespace(beta)
        base = self.base
        T_vec, uu_vec, corr_vec, info = base.gradient_vectors(Rs, data.base, beta, C)
        v = beta.shape[0]
        for g, (u, R) in enumerate(zip(data.units, Ru)):
            if R is None:
                continue
            parts = unit_gradient_parts(R, u.sign, u.G, u.X, u.y, beta, C)
            P = base.P[g]
            T_vec = T_vec + xp.reshape(parts.T_sum, (v, -1)) @ P
            uu_vec = uu_vec + xp.reshape(parts.uu, (v, -1)) @ P
            corr_vec = corr_vec + xp.reshape(parts.corr, (v, -1)) @ P
            info = info + unit_information(parts.T, u.sign, P)
        return base.per_factor(T_vec), base.per_factor(uu_vec), base.per_factor(corr_vec), info


def unit_information(T: np.ndarray, sign: np.ndarray, P: np.ndarray) -> np.ndarray:
    """P'F P of the units, F[(a,b),(c,d)] = Σ_t s_t T_t[b,c] T_t[a,d]: entry (x, y) is
    Σ_t s_t tr(T_t M_x T_t M_y) with M_x = P[:, x] as a b x b matrix (v, s, s)."""
    xp = la.namespace(T, sign, P)
    b = T.shape[-1]
    M = xp.reshape(P.T, (-1, b, b))
    N = la.einsum(xp, "vtab,xbc->vtxac", T, M)
    return la.einsum(xp, "vt,vtxab,vtyba->vxy", sign, N, N, optimize=True)

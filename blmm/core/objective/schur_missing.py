"""Crossed factors with voxel-specific missing rows, without per-pattern objectives.

Schur (schur.py) eliminates the factor with most levels through the one-factor objective on
the augmented design U = [X, Z_R], then the dense factors' columns by a second Woodbury step.
A voxel's missing rows change the eliminated factor's terms only at the levels they touch, and
U'U by -U_M'U_M: exactly what `MissingObjective` on U handles with removal and replacement
units (missing.py, docs/model.md "Missing rows").  So this objective is Schur with its
eliminated part taken from `MissingObjective` on U: the complete design's classes, each
voxel's units and unit groups, and its own row count.  The scoring information couples the
eliminated factor with the dense ones through sums over levels (Φ, T ⊗ M, Σ W S W'), and each
of those is likewise the class sum, minus the removal units' terms, plus the replacements'.

A nesting tree beside dense factors (`NestedSchurObjective`) is the same one level up: its tree's
part from `NestedMissingObjective` on U, the touched families as units of their block-shape groups
(`NestedSchurMissingObjective`); its scoring information has no coupling to add units to.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core import linalg as la
from blmm.core.objective.missing import MissingData, MissingObjective, small_product, unit_terms
from blmm.core.objective.nested import NestedSchurObjective
from blmm.core.objective.nested_missing import NestedMissingObjective
from blmm.core.objective.schur import SchurData, SchurObjective


@dataclass
class SchurMissingData(SchurData):
    """Schur's data with the eliminated part's as missing-row data on U (`MissingData`, `NestedMissingData`):
    its units, and each voxel's rows."""

    @property
    def n(self) -> np.ndarray:
        return self.level.n

    def take(self, idx) -> "SchurMissingData":
        return SchurMissingData(self.level.take(idx), la.select_rows(self.ZRtY, idx), la.select_rows(self.XtY, idx))


class SchurMissingObjective(SchurObjective):
    """Crossed factors (the complete design's `SchurObjective`) plus per-voxel units of the touched levels
    of the eliminated factor, on U = [X, Z_R]."""

    missing_rows = True

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, big: int | None = None):
        self.base = SchurObjective(XtX, ZtX, ZtZ, n, layout, reml, big)
        super().__init__(XtX, ZtX, ZtZ, n, layout, reml, big, level=self.base.level)
        self.eliminated = MissingObjective.of_level(self.level)  # the one-factor units on U

    def per_voxel_bytes(self) -> int:
        return self.base.per_voxel_bytes() + self.eliminated.per_voxel_bytes()

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units=None) -> SchurMissingData:
        """Per-voxel sums (Z'Y of every level) plus the voxels' units on U (`MissingObjective.data`)."""
        UtY = np.hstack([XtY, ZtY[:, self.small_cols]])
        return SchurMissingData(self.eliminated.data(UtY, ZtY[:, self.big_cols], YtY, units),
                                np.ascontiguousarray(ZtY[:, self.small_cols]), np.ascontiguousarray(XtY))

    def rows(self, data: SchurMissingData):
        return data.n

    def _eliminated_products(self, D_list, data: SchurData):
        UVU, UVY, YVY, logdetV, R, Ru, Rg = self.eliminated.products(D_list[self.big], data.level)
        return UVU, UVY, YVY, logdetV, (R, Ru, Rg)

    def _eliminated_gradient(self, R, data: SchurData, gamma, Omega):
        classes, Ru, Rg = R
        T, uu, corr, info = self.level.gradient_parts(classes, data.level.base, gamma, Omega)
        terms = unit_terms(Ru, Rg, data.level, gamma, Omega)
        return T + terms.T_sum, uu + terms.uu, corr + terms.corr, info + terms.info

    def _level_coupling(self, R, data: SchurData, S):
        classes, Ru, Rg = R
        Phi, TM, WSW = super()._level_coupling(classes, data, S)
        md: MissingData = data.level
        xp = la.namespace(S)
        p, qR = self.p, self.qR
        if Ru is not None:  # W_t = R_t Z_t'Z_R, T_t = R_t G_t, M_t = W_t S W_t', each with its sign
            s = md.sign
            W = small_product(Ru, md.X[..., p:p + qR])
            T = la.sym(small_product(Ru, md.G))
            M = la.einsum(xp, "vtar,vrs,vtbs->vtab", W, S, W, optimize=True)
            Phi = Phi + la.einsum(xp, "vt,vtar,vtbs->vabrs", s, W, W, optimize=True)
            TM = TM + la.einsum(xp, "vt,vtbc,vtae->vabce", s, T, M) + la.einsum(xp, "vt,vtbc,vtae->vabce", s, M, T)
            WSW = WSW + la.einsum(xp, "vt,vtab->vab", s, M)
        if Rg is not None:  # a group's signed units share R_h: their sums go through K's Z_R block
            K = md.group_K[..., p:p + qR, p:p + qR]  # (v, H, q, q, q_R, q_R)
            T = la.sym(small_product(Rg, md.group_G))
            KS = la.einsum(xp, "vhfgrs,vrs->vhfg", K, S)
            M = small_product(small_product(Rg, KS), xp.matrix_transpose(Rg))
            Phi = Phi + la.einsum(xp, "vhaf,vhbg,vhfgrs->vabrs", Rg, Rg, K, optimize=True)
            TM = TM + la.einsum(xp, "vhbc,vhae->vabce", T, M) + la.einsum(xp, "vhbc,vhae->vabce", M, T)
            WSW = WSW + xp.sum(M, axis=1)
        return Phi, TM, WSW


class NestedSchurMissingObjective(NestedSchurObjective):
    """A nesting tree beside dense factors (the complete design's `NestedSchurObjective`) plus per-voxel units
    of the touched families, on U = [X, Z_R]."""

    missing_rows = True

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, tree: list[int]):
        self.base = NestedSchurObjective(XtX, ZtX, ZtZ, n, layout, reml, tree)
        super().__init__(XtX, ZtX, ZtZ, n, layout, reml, tree, level=self.base.level)
        self.eliminated = NestedMissingObjective.of_nested(self.level)  # the tree's units on U

    def per_voxel_bytes(self) -> int:
        return self.base.per_voxel_bytes()

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units=None) -> SchurMissingData:
        """Per-voxel sums (Z'Y of every level) plus the voxels' units on U (`NestedMissingObjective.data`)."""
        UtY = np.hstack([XtY, ZtY[:, self.small_cols]])
        return SchurMissingData(self.eliminated.data(UtY, ZtY, YtY, units),
                                np.ascontiguousarray(ZtY[:, self.small_cols]), np.ascontiguousarray(XtY))

    def rows(self, data: SchurMissingData):
        return data.n

    def _eliminated_products(self, D_list, data: SchurData):
        UVU, UVY, YVY, logdetV, Rs, Ru = self.eliminated.products(D_list, data.level)
        return UVU, UVY, YVY, logdetV, (Rs, Ru)

    def _eliminated_gradient(self, R, data: SchurData, gamma, Omega):
        Rs, Ru = R
        return self.eliminated.gradient_parts(Rs, Ru, data.level, gamma, Omega)

"""Crossed factors, or a nesting tree beside dense factors, with voxel-specific missing rows: the
eliminated part's units on U = [X, Z_R].

Schur eliminates the factor with most levels, or a nesting tree, on the augmented design U
(objective/schur_missing.py), so a voxel's missing rows enter as that part's removal and
replacement units on U (docs/model.md, "Missing rows").  `SchurMissingRowStats` holds the
eliminated part's missing-row statistics with U in place of X (one factor's `MissingRowStats`,
or the tree's `NestedMissingRowStats`; their class sums are the ones the read stage writes,
`schur_sums.schur_group`, `nested_schur_sums.tree_schur_groups`) and presents X's own X'X, X'Y
and rows.  `SchurUnits` is this structure's `blocks.MissingRowUnits`: the eliminated part's units
on U (`LevelUnits`, `FamilyUnits`), with X'X_v and X'Y taken from U's first p columns where the
driver screens voxels and forms e'e, and Z_R'Y, X'Y from U'Y for the second Woodbury step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.missing_rows import (
    LevelSums, MissingRowCounts, MissingRowStats, missing_design, missing_row_stats,
)
from blmm.core.nested_missing_rows import NestedMissingRowStats, nested_missing_row_stats
from blmm.core.objective.nested import dense_columns, tree_schur_design
from blmm.core.objective.schur import SchurData, augmented_design, eliminated_columns
from blmm.core.objective.schur_missing import SchurMissingData, SchurMissingObjective
from blmm.core.sufficient import FactorLayout, observed_data_sums, presence_patterns, random_effects_matrix


@dataclass
class SchurMissingRowStats(MissingRowCounts):
    """Crossed factors' sums for v voxels: the complete design's, and the eliminated factor's
    missing-row statistics on U = [X, Z_R] (`on_u`: its X'Y holds U'Y)."""

    layout: FactorLayout  # every factor
    XtX: np.ndarray  # (p, p) over all rows
    ZtX: np.ndarray  # (Σ L_k q_k, p)
    ZtZ: sp.csr_matrix
    on_u: MissingRowStats | NestedMissingRowStats  # the eliminated part's, X'Y holding U'Y
    centre: ResponseCentre | None = None  # taken out of Y before the data sums (None: none)

    missing_row_structure = "schur"

    def units(self, objective: SchurMissingObjective) -> "SchurUnits":
        """The units of these voxels against objective (the complete design's `SchurMissingObjective` or
        `NestedSchurMissingObjective`)."""
        return SchurUnits(self, objective)

    @property
    def n_rows(self) -> int:
        return self.on_u.n_rows

    @property
    def pattern_ptr(self) -> np.ndarray:
        return self.on_u.pattern_ptr

    @property
    def pattern_of_voxel(self) -> np.ndarray:
        return self.on_u.pattern_of_voxel

    @property
    def XtY(self) -> np.ndarray:
        return self.on_u.XtY[:, :self.p]

    @property
    def YtY(self) -> np.ndarray:
        return self.on_u.YtY


class SchurUnits:
    """The `blocks.MissingRowUnits` of Schur's structures: the eliminated part's units on U."""

    def __init__(self, stats: SchurMissingRowStats, objective: SchurMissingObjective):
        self.stats, self.objective = stats, objective
        self.on_u = stats.on_u.units(objective.eliminated)

    @property
    def nbytes(self) -> int:
        return self.on_u.nbytes

    def unit_sizes(self) -> np.ndarray:
        return self.on_u.unit_sizes()

    def unit_bytes(self, key: tuple) -> int:
        return self.on_u.unit_bytes(key)

    def prepared_bytes(self, key: tuple) -> int:
        return self.on_u.prepared_bytes(key)

    def fit_bytes(self, shape: tuple) -> int:
        return self.on_u.fit_bytes(shape)

    def prepare(self, idx: np.ndarray, screen) -> list[tuple[np.ndarray, dict, tuple]]:
        """The units on U, screened and with X'X_v as X's (U'U_v's first p rows and columns)."""
        p, centre = self.stats.p, self.stats.centre

        def screen_x(idx, UtU_v, UtY, YtY, n, _):
            return screen(idx, UtU_v[:, :p, :p], UtY[:, :p], YtY, n, centre)

        parts = self.on_u.prepare(idx, screen_x)
        for _, units, _ in parts:
            units["XtX"] = np.ascontiguousarray(units["XtX"][:, :p, :p])  # e'e's; the objective takes dXtX on U
        return parts

    def block_data(self, idx: np.ndarray, units: dict) -> tuple[SchurMissingData, np.ndarray, np.ndarray]:
        level, UtY, YtY = self.on_u.block_data(idx, units)
        ZRtY, XtY = self._split(UtY)
        return SchurMissingData(level, ZRtY, XtY), XtY, YtY

    def complete_data(self, idx: np.ndarray) -> SchurData:
        return SchurData(self.on_u.complete_data(idx), *self._split(self.stats.on_u.XtY[idx]))

    def _split(self, UtY: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Z_R'Y, X'Y) from U'Y."""
        p = self.stats.p
        return np.ascontiguousarray(UtY[:, p:]), np.ascontiguousarray(UtY[:, :p])


def schur_missing_row_stats(X: np.ndarray, factors: list[RandomFactor], patterns: np.ndarray,
                            pattern_of_voxel: np.ndarray, sums: LevelSums | None = None,
                            UtY: np.ndarray | None = None, ZbtY: np.ndarray | None = None,
                            YtY: np.ndarray | None = None) -> SchurMissingRowStats | None:
    """Crossed factors' missing-row statistics from the eliminated factor's class sums on U (`sums`, the
    pipeline's: `schur_group`'s classes, with the touched levels' y_j), or from U'Y, its Z_b'Y and Y'Y;
    None where a level of the eliminated factor has G_j = 0 (each pattern then gets its own objective)."""
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    big, big_cols, small_cols = eliminated_columns(layout)
    Zb = sp.csr_matrix(Z)[:, big_cols]
    U = augmented_design(X, Z, small_cols)
    big_layout = FactorLayout.from_factors([factors[big]])
    if sums is None:
        on_u = missing_row_stats(U, factors[big], big_layout, patterns, pattern_of_voxel, UtY, ZbtY, YtY, Z=Zb)
    else:
        on_u = missing_design(U, factors[big], big_layout, patterns, pattern_of_voxel, sums=sums, Z=Zb)
    if on_u.classes.level_index.size != layout.n_levels[big]:  # a level with G_j = 0, as `schur_group` finds it
        return None
    return SchurMissingRowStats(layout=layout, XtX=X.T @ X, ZtX=np.asarray(Z.T @ X), ZtZ=(Z.T @ Z).tocsr(), on_u=on_u)


def schur_missing_row_stats_from_data(Y, X, factors: list[RandomFactor], centre: ResponseCentre | None = None,
                                      threads: int | None = None) -> SchurMissingRowStats | None:
    """`schur_missing_row_stats` from an (n, v) response with NaN for missing entries; with ``centre``,
    the sums of Y - c_v X w, formed block by block without a centred copy of Y (`observed_data_sums`)."""
    _, big_cols, small_cols = eliminated_columns(FactorLayout.from_factors(factors))
    patterns, pattern_of_voxel, UtY, ZbtY, YtY = sums_on_u(Y, X, factors, small_cols, big_cols, centre, threads)
    stats = schur_missing_row_stats(X, factors, patterns, pattern_of_voxel, UtY=UtY, ZbtY=ZbtY, YtY=YtY)
    if stats is not None:
        stats.centre = centre
    return stats


def sums_on_u(Y, X, factors: list[RandomFactor], dense_cols: np.ndarray, eliminated_cols: np.ndarray,
              centre: ResponseCentre | None, threads: int | None) -> tuple:
    """(patterns, pattern_of_voxel, U'Y, Z_e'Y, Y'Y) of an (n, v) response with NaNs, U = [X, Z[:, dense_cols]]
    and Z_e = Z[:, eliminated_cols], less the centre (its w padded with zeros for Z_R)."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    Z = sp.csr_matrix(random_effects_matrix(factors, FactorLayout.from_factors(factors)))
    U = augmented_design(X, Z, dense_cols)
    present, UtY, ZtY, YtY = observed_data_sums(Y, U, Z[:, eliminated_cols], None, None if centre is None else
                                                centre.padded(dense_cols.size), threads)
    return (*presence_patterns(present), UtY, ZtY, YtY)


def nested_schur_missing_row_stats(X: np.ndarray, factors: list[RandomFactor], tree: list[int], patterns: np.ndarray,
                                   pattern_of_voxel: np.ndarray, sums: list[LevelSums] | None = None,
                                   UtY: np.ndarray | None = None, ZtY: np.ndarray | None = None,
                                   YtY: np.ndarray | None = None) -> SchurMissingRowStats:
    """A nesting tree beside dense factors: missing-row statistics from the tree's groups' class sums on U
    (`sums`, the pipeline's: `tree_schur_groups`' groups, with the touched families' y_j), or from U'Y,
    Z'Y (every factor's columns) and Y'Y."""
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    U = tree_schur_design(X, Z, layout, tree)
    on_u = nested_missing_row_stats(U, factors, layout, patterns, pattern_of_voxel, XtY=UtY, ZtY=ZtY, YtY=YtY,
                                    Z=Z, sums=sums)
    return SchurMissingRowStats(layout=layout, XtX=X.T @ X, ZtX=np.asarray(Z.T @ X), ZtZ=on_u.ZtZ, on_u=on_u)


def nested_schur_missing_row_stats_from_data(Y, X, factors: list[RandomFactor], tree: list[int],
                                             centre: ResponseCentre | None = None,
                                             threads: int | None = None) -> SchurMissingRowStats:
    """`nested_schur_missing_row_stats` from an (n, v) response with NaN for missing entries (less the
    centre, as `schur_missing_row_stats_from_data`)."""
    layout = FactorLayout.from_factors(factors)
    patterns, pattern_of_voxel, UtY, ZtY, YtY = sums_on_u(Y, X, factors, dense_columns(layout, tree),
                                                          np.arange(layout.n_columns), centre, threads)
    stats = nested_schur_missing_row_stats(X, factors, tree, patterns, pattern_of_voxel, UtY=UtY, ZtY=ZtY, YtY=YtY)
    stats.centre = centre
    return stats

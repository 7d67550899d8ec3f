"""Crossed factors with voxel-specific missing rows: the eliminated factor's units on U = [X, Z_R].

Schur eliminates the factor with most levels through the one-factor objective on the augmented
design U (objective/schur_missing.py), so a voxel's missing rows enter as that factor's removal
and replacement units on U (docs/model.md, "Missing rows").  `SchurMissingRowStats` holds one
factor's `MissingRowStats` with U in place of X (its class sums are the ones the read stage
writes for crossed factors, `schur_sums.schur_group`) and presents X's own X'X, X'Y and rows.
`SchurUnits` is this structure's `blocks.MissingRowUnits`: one factor's `LevelUnits` on U, with
X'X_v and X'Y taken from U's first p columns where the driver screens voxels and forms e'e.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.missing_rows import (
    LevelSums, LevelUnits, MissingRowCounts, MissingRowStats, missing_design, missing_row_stats,
)
from blmm.core.objective.base import diag_blocks
from blmm.core.objective.schur import augmented_design, eliminated_columns
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
    on_u: MissingRowStats
    centre: ResponseCentre | None = None  # taken out of Y before the data sums (None: none)

    missing_row_structure = "schur"

    def units(self, objective: SchurMissingObjective) -> "SchurUnits":
        """The units of these voxels against objective (the complete design's `SchurMissingObjective`)."""
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
    """Crossed factors' `blocks.MissingRowUnits`: the eliminated factor's `LevelUnits` on U."""

    def __init__(self, stats: SchurMissingRowStats, objective: SchurMissingObjective):
        self.stats, self.objective = stats, objective
        self.on_u = LevelUnits(stats.on_u, objective.eliminated)

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
        """`LevelUnits.prepare` on U, screened and with X'X_v as X's (U'U_v's first p rows and columns)."""
        p, centre = self.stats.p, self.stats.centre

        def screen_x(idx, UtU_v, UtY, YtY, n, _):
            return screen(idx, UtU_v[:, :p, :p], UtY[:, :p], YtY, n, centre)

        parts = self.on_u.prepare(idx, screen_x)
        for _, units, _ in parts:
            units["XtX"] = np.ascontiguousarray(units["XtX"][:, :p, :p])  # e'e's; the objective takes dXtX on U
        return parts

    def block_data(self, idx: np.ndarray, units: dict) -> tuple[SchurMissingData, np.ndarray, np.ndarray]:
        part = self.stats.on_u.sums.take(idx)
        return self.objective.data_from_sums(part, units), part.XtY[:, :self.stats.p], part.YtY

    def complete_data(self, idx: np.ndarray):
        return self.objective.base.data_from_sums(self.stats.on_u.sums.take(idx))


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
    ZbtZb = (Zb.T @ Zb).tocsr()
    G = diag_blocks(ZbtZb, layout.n_levels[big], layout.q[big])
    if not np.all(np.any(G.reshape(G.shape[0], -1) != 0, axis=1)):
        return None
    U = augmented_design(X, Z, small_cols)
    big_layout = FactorLayout.from_factors([factors[big]])
    if sums is None:
        on_u = missing_row_stats(U, factors[big], big_layout, patterns, pattern_of_voxel, UtY, ZbtY, YtY, Z=Zb)
    else:
        on_u = missing_design(U, factors[big], big_layout, patterns, pattern_of_voxel, sums=sums, Z=Zb)
    return SchurMissingRowStats(layout=layout, XtX=X.T @ X, ZtX=np.asarray(Z.T @ X), ZtZ=(Z.T @ Z).tocsr(), on_u=on_u)


def schur_missing_row_stats_from_data(Y, X, factors: list[RandomFactor], centre: ResponseCentre | None = None,
                                      threads: int | None = None) -> SchurMissingRowStats | None:
    """`schur_missing_row_stats` from an (n, v) response with NaN for missing entries; with ``centre``,
    the sums of Y - c_v X w, formed block by block without a centred copy of Y (`observed_data_sums`)."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    _, big_cols, small_cols = eliminated_columns(layout)
    U = augmented_design(X, Z, small_cols)
    Zb = sp.csr_matrix(Z)[:, big_cols]
    present, UtY, ZbtY, YtY = observed_data_sums(Y, U, Zb, None, None if centre is None else
                                                 centre.padded(small_cols.size), threads)
    patterns, pattern_of_voxel = presence_patterns(present)
    stats = schur_missing_row_stats(X, factors, patterns, pattern_of_voxel, UtY=UtY, ZbtY=ZbtY, YtY=YtY)
    if stats is not None:
        stats.centre = centre
    return stats

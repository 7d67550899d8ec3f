"""One structure decision: from the factor layout and the missingness, the plan every fit follows.

`plan_fit` picks the structure (the objective of each presence pattern, and the nesting tree
it eliminates) once; `fit_lmm`, `fit_stats` and the pipeline's `fit_block` all take the
resulting `FitPlan`.  A structure is one objective file plus one line of `STRUCTURES`; a
structure that can fit every voxel against the complete design with the voxel's own
missing rows (docs/model.md, "Missing rows") names, in its entry, that objective (its
`missing_rows` capability) and how its statistics are formed; the one missing-row driver
(`blocks.fit_missing_rows`) fits them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from blmm.core.centre import ResponseCentre
from blmm.core.missing_rows import MissingRowStats, missing_row_stats_from_data
from blmm.core.nested_missing_rows import NestedMissingRowStats, nested_missing_row_stats_from_data
from blmm.core.objective import DenseObjective, LevelObjective, SchurObjective
from blmm.core.objective.base import Objective
from blmm.core.objective.missing import MissingObjective
from blmm.core.objective.nested import NestedObjective, NestedSchurObjective, nested_tree
from blmm.core.objective.nested_missing import NestedMissingObjective
from blmm.core.objective.schur_missing import NestedSchurMissingObjective, SchurMissingObjective
from blmm.core.schur_missing_rows import (
    SchurMissingRowStats, nested_schur_missing_row_stats_from_data, schur_missing_row_stats_from_data,
)
from blmm.core.sufficient import FactorLayout

AUTO_DENSE_COLUMNS = 2000  # "auto" keeps factors dense beside the eliminated ones up to this many columns


@dataclass(frozen=True)
class MissingRowsPath:
    """Voxels fitted against the complete design with their own missing rows: the objective on the
    complete design (``build(XtX, ZtX, ZtZ, n, layout, reml, tree)``, `missing_rows` True; its
    statistics' ``units(objective)`` give the driver its `blocks.MissingRowUnits`), and how the
    statistics are formed from an (n, v) response with NaNs (``from_data(Y, X, factors, layout,
    centre, threads)``: the sums of Y less the centre, without a centred copy of Y; None where the
    path cannot hold this design, whose presence patterns then get their own objectives)."""

    build: Callable[..., Objective]
    from_data: Callable


@dataclass(frozen=True)
class Structure:
    """One random-effects structure: its objective for one presence pattern (``build(XtX, ZtX,
    ZtZ, n, layout, reml, tree)``), the per-voxel dense part it must hold (``dense_part(layout,
    tree, p)``: (bytes, what) or None) and, where it has one, its missing-rows path."""

    name: str
    build: Callable[..., Objective]
    dense_part: Callable[[FactorLayout, list | None, int], tuple[int, str] | None]
    missing_rows: MissingRowsPath | None = None


def _no_dense_part(layout, tree, p):
    return None


def _dense_part(layout, tree, p):
    qd = layout.n_columns
    return 8 * (10 * qd ** 2 + 8 * p * p), f"a dense {qd} x {qd} system per voxel"


def _schur_dense_part(layout, tree, p):
    widths = [l * q for l, q in zip(layout.n_levels, layout.q)]
    if tree is not None and len(tree) < len(widths):
        qd = layout.n_columns - sum(widths[k] for k in tree)
        names = "the nested factors " + ", ".join(layout.names[k] for k in tree)
    else:
        qd = layout.n_columns - max(widths)
        names = "the factor with most levels"
    return 8 * (12 * (p + qd) ** 2 + 8 * qd ** 2), f"a dense {qd} x {qd} remainder per voxel after eliminating {names}"


def _levels(XtX, ZtX, ZtZ, n, layout, reml, tree) -> Objective:
    return LevelObjective(XtX, ZtX, ZtZ, n, layout.q[0], reml)


def _schur(XtX, ZtX, ZtZ, n, layout, reml, tree) -> Objective:
    if tree is not None and len(tree) < len(layout.q):  # a nesting tree eliminated, the rest dense
        return NestedSchurObjective(XtX, ZtX, ZtZ, n, layout, reml, tree)
    return SchurObjective(XtX, ZtX, ZtZ, n, layout, reml)


def _dense(XtX, ZtX, ZtZ, n, layout, reml, tree) -> Objective:
    return DenseObjective(XtX, ZtX, ZtZ, n, layout, reml)


def _levels_missing(XtX, ZtX, ZtZ, n, layout, reml, tree) -> Objective:
    return MissingObjective(XtX, ZtX, ZtZ, n, layout.q[0], reml)


def _schur_missing(XtX, ZtX, ZtZ, n, layout, reml, tree) -> Objective:
    if tree is not None and len(tree) < len(layout.q):  # a nesting tree eliminated, the rest dense
        return NestedSchurMissingObjective(XtX, ZtX, ZtZ, n, layout, reml, tree)
    return SchurMissingObjective(XtX, ZtX, ZtZ, n, layout, reml)


def _schur_missing_rows(Y, X, factors, layout, centre: ResponseCentre | None = None,
                        threads: int | None = None) -> SchurMissingRowStats | None:
    tree = nested_tree(layout)  # as plan_fit finds it for schur
    if tree is not None and len(tree) < len(layout.q):
        return nested_schur_missing_row_stats_from_data(Y, X, factors, tree, centre=centre, threads=threads)
    return schur_missing_row_stats_from_data(Y, X, factors, centre=centre, threads=threads)


def _level_missing_rows(Y, X, factors, layout, centre: ResponseCentre | None = None,
                        threads: int | None = None) -> MissingRowStats:
    return missing_row_stats_from_data(Y, X, factors[0], centre=centre, threads=threads)


def _nested_missing_rows(Y, X, factors, layout, centre: ResponseCentre | None = None,
                         threads: int | None = None) -> NestedMissingRowStats:
    return nested_missing_row_stats_from_data(Y, X, factors, layout=layout, centre=centre, threads=threads)


STRUCTURES: dict[str, Structure] = {s.name: s for s in (
    Structure("levels", _levels, _no_dense_part, MissingRowsPath(_levels_missing, _level_missing_rows)),
    Structure("nested", NestedObjective, _no_dense_part, MissingRowsPath(NestedMissingObjective, _nested_missing_rows)),
    Structure("schur", _schur, _schur_dense_part, MissingRowsPath(_schur_missing, _schur_missing_rows)),
    Structure("dense", _dense, _dense_part),
)}
STRUCTURE_NAMES = ("auto", *STRUCTURES)


@dataclass(frozen=True)
class FitPlan:
    """How every voxel is fitted: the structure, the nesting tree it eliminates (None if none),
    and whether voxels are fitted against the complete design with their own missing rows."""

    structure: str
    tree: list | None
    layout: FactorLayout
    missing_rows: bool = False

    @property
    def entry(self) -> Structure:
        return STRUCTURES[self.structure]

    @property
    def eliminates_one_factor(self) -> bool:
        """Schur eliminating one factor's levels, no nesting tree: its data are that factor's class sums
        on U = [X, Z_R] (core/schur_sums.py)."""
        return self.structure == "schur" and self.tree is None

    @property
    def dense_beside_tree(self) -> bool:
        """Schur eliminating a nesting tree, other factors dense: its data are the tree groups' class sums
        on U = [X, Z_R] (core/nested_schur_sums.py)."""
        return self.structure == "schur" and self.tree is not None and len(self.tree) < len(self.layout.q)

    @property
    def missing_rows_path(self) -> MissingRowsPath | None:
        return self.entry.missing_rows if self.missing_rows else None

    def objective(self, XtX: np.ndarray, ZtX: np.ndarray, ZtZ, n: int, reml: bool) -> Objective:
        """The objective of one presence pattern (its design sums); with missing rows per voxel, the
        structure's missing-rows objective on the complete design's sums."""
        build = self.entry.missing_rows.build if self.missing_rows else self.entry.build
        return build(XtX, ZtX, ZtZ, n, self.layout, reml, self.tree)

    def check_memory(self, p: int, max_block_bytes: int) -> None:
        """Refuse, before any work, a structure whose per-voxel dense part does not fit in the budget.

        The dense structure solves a q x q system per voxel, Schur a q_R x q_R one (q_R: the
        columns of all factors but the eliminated ones); one voxel must fit in
        `max_block_bytes` (MAXMEM's share), or the fit would be killed for memory midway.
        """
        part = self.entry.dense_part(self.layout, self.tree, p)
        if part is None or part[0] <= max_block_bytes:
            return
        need, what = part
        sizes = ", ".join(f"{name}: {l} levels x q={q}" for name, l, q in
                          zip(self.layout.names, self.layout.n_levels, self.layout.q))
        raise ValueError(
            f"this random-effects structure needs about {need / 2**20:,.0f} MiB per voxel ({what}; "
            f"factors: {sizes}), more than the memory budget of "
            f"{max_block_bytes / 2**20:,.0f} MiB (MAXMEM); refusing before fitting. Factors that "
            f"cross with thousands of levels each cannot be fitted exactly within this budget: "
            f"raise MAXMEM, or drop or nest one of the factors")


def plan_fit(layout: FactorLayout, structure: str = "auto", missing_rows: bool = False) -> FitPlan:
    """The plan for a layout: ``structure`` "auto" picks levels for one factor, nested for one
    nesting tree, else schur unless the factors left dense have more than 2,000 columns (then
    dense); ``missing_rows`` (voxels differ in their rows) takes the structure's missing-rows
    path where it has one, else each presence pattern gets its own objective."""
    n_factors = len(layout.q)
    if structure not in STRUCTURE_NAMES:
        raise ValueError(f"unknown structure {structure!r}; expected {', '.join(STRUCTURE_NAMES)}")
    tree = nested_tree(layout) if structure in ("auto", "nested", "schur") else None
    if structure == "auto" and tree is not None and len(tree) == n_factors:
        structure = "nested"  # every factor nests in one tree: eliminate by its outer level
    if structure == "auto":
        small_columns = layout.n_columns - max(l * q for l, q in zip(layout.n_levels, layout.q))
        if tree is not None:  # the nesting tree is eliminated; the other factors stay dense
            small_columns = layout.n_columns - sum(layout.n_levels[f] * layout.q[f] for f in tree)
        structure = "levels" if n_factors == 1 else ("schur" if small_columns <= AUTO_DENSE_COLUMNS else "dense")
    if structure == "nested" and (tree is None or len(tree) != n_factors):
        raise ValueError("the 'nested' structure needs every random factor nested in one tree "
                         "(e.g. subjects within families)")
    if structure == "levels" and n_factors != 1:
        raise ValueError("the 'levels' structure needs exactly one random factor")
    if structure == "schur" and n_factors < 2:
        raise ValueError("the 'schur' structure needs two or more random factors")
    return FitPlan(structure, tree, layout, bool(missing_rows) and STRUCTURES[structure].missing_rows is not None)

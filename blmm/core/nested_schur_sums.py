"""A nesting tree beside factors kept dense, fitted pattern by pattern from class-aggregated sums.

E.g. (1|family) + (1|subject) + (1|scanner): `NestedSchurObjective` eliminates the tree
(families, their subjects) through `NestedObjective` on the augmented design U = [X, Z_R]
(Z_R: the dense factors' columns), so a voxel's data enter only through U'Y, Y'Y and each of
the tree's groups' `LevelSums` on U (`tree_schur_groups`): the read stage writes those, never
Z'Y per level (docs/model.md, "Crossed factors next to a tree, from class sums").

A presence pattern changes a family's block only where its missing rows touch the family.  Its
objective so keeps, per complete group, the untouched families with their complete classes
(`LevelClasses.without_levels`: any partition into equal blocks is exact), and puts the touched
families that keep rows into groups of their own, by the block shape the pattern's tree gives
them (a subject that lost every image leaves the block).  Their y_j, stored apart where they
were in a big class, come out of the class aggregates (`pattern_sums`) and are taken at the
columns of their new block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blmm.core.design import RandomFactor
from blmm.core.level_classes import LevelClasses
from blmm.core.level_groups import LevelGroup, outer_level_places, tree_groups
from blmm.core.missing_rows import LevelSums
from blmm.core.objective.nested import NestedSchurObjective, NestedTree, TreeGroup
from blmm.core.schur_sums import ClassSumStats, class_sum_design, pattern_sums
from blmm.core.sufficient import FactorLayout, random_effects_matrix


def tree_schur_groups(X: np.ndarray, factors: list[RandomFactor], tree: list[int], outer_codes: np.ndarray
                      ) -> list[LevelGroup]:
    """The groups of a nesting tree beside dense factors, complete design (rows in level order, whole
    families adjacent): the tree's block shapes on U = [X, Z_R], as `NestedSchurObjective` forms them
    (outer_codes: each row's family)."""
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    ZtZ = (Z.T @ Z).tocsr()
    obj = NestedSchurObjective(X.T @ X, np.asarray(Z.T @ X), ZtZ, X.shape[0], layout, True, tree)  # REML: same groups
    return tree_groups(obj.level, Z, ZtZ, outer_codes)


def touched_only_classes(m: int) -> LevelClasses:
    """m levels, none aggregated: the touched families of a pattern, each with its own block."""
    return LevelClasses(np.arange(m), (), np.zeros(0, np.int64), np.arange(m))


@dataclass(frozen=True)
class PatternGroup:
    """Where the data of one group of a pattern's objective come from: complete group ``source``'s
    families less those the pattern touches (``touched``, levels of that group; empty: its fit
    classes), or (``source`` -1) touched families, each from its complete group ``origin`` at level
    ``level``, its new block's ``columns`` (m, b) at their places in the complete block."""

    source: int = -1
    touched: np.ndarray | None = None
    origin: np.ndarray | None = None
    level: np.ndarray | None = None
    columns: np.ndarray | None = None


@dataclass
class NestedSchurSumStats(ClassSumStats):
    """A nesting tree beside dense factors: statistics whose data sums are the tree groups' `LevelSums`
    on U (XtY = U'Y; ZtY unused), each presence pattern fitted by a `NestedSchurObjective` whose groups
    keep the complete design's where its missing rows leave families whole."""

    sums: list | None = None  # per complete group, its LevelSums (stored classes, touched y_j apart)
    groups: list | None = None  # the complete groups (`tree_schur_groups`)
    members: list | None = None  # per complete group, its families' nodes (`NestedTree` numbering)
    spans: dict | None = None  # the complete tree's spanned factors (kept in every pattern)
    tree: list | None = None
    family_of_row: np.ndarray | None = None  # (n_rows,) each row's family
    # per pattern, where its objective's groups' data come from (set with its objective; small: index arrays)
    pattern_groups: dict = field(default_factory=dict)

    def _pattern_groups(self, u: int, layout_tree: NestedTree) -> tuple[list[TreeGroup], list[PatternGroup]]:
        """Pattern u's groups for its objective, and where each one's data come from."""
        touched_families = np.unique(self.family_of_row[~self.patterns[u]])
        objective_groups, sources = [], []
        for g, (group, members) in enumerate(zip(self.groups, self.members)):
            hit = np.isin(group.outer, touched_families)
            if not hit.any():
                objective_groups.append(TreeGroup(layout_tree.shape_of(members[0]), members, group.fit_classes))
                sources.append(PatternGroup(g, np.zeros(0, np.int64)))
                continue
            whole = np.flatnonzero(~hit)
            if whole.size == 0:
                continue
            classes, _ = group.classes.without_levels(np.flatnonzero(hit), whole)
            numbered = LevelClasses(np.arange(whole.size), classes.big_members, classes.big_counts, classes.small_levels)
            objective_groups.append(TreeGroup(layout_tree.shape_of(members[0]), [members[i] for i in whole], numbered))
            sources.append(PatternGroup(g, np.flatnonzero(hit)))
        if touched_families.size == 0:
            return objective_groups, sources
        where = outer_level_places(self.groups, self.layout.n_levels[layout_tree.root])
        for shape, members in layout_tree.groups.items():
            mine = [nodes for nodes in members if layout_tree.node_level[nodes[0]] in touched_families]
            if not mine:
                continue
            family = layout_tree.node_level[[nodes[0] for nodes in mine]]
            origin, level = where[0][family], where[1][family]
            _, keep, _ = layout_tree.block_map(shape, mine[0])
            new = layout_tree.block_columns(mine, keep).reshape(len(mine), keep.size)
            columns = np.stack([places(self.groups[o].columns[j], cols) for o, j, cols in zip(origin, level, new)])
            objective_groups.append(TreeGroup(shape, mine, touched_only_classes(len(mine))))
            sources.append(PatternGroup(origin=origin, level=level, columns=columns))
        return objective_groups, sources

    def pattern_objective(self, plan, u: int, reml: bool) -> NestedSchurObjective:
        if not plan.dense_beside_tree:
            raise ValueError(f"a nesting tree's class sums beside dense factors are fitted by the schur structure "
                             f"with that tree, not {plan.structure!r}")
        ZtX, ZtZ = self.pattern_design(u)
        layout_tree = NestedTree(self.layout, ZtZ, self.tree, spans=self.spans)
        objective_groups, self.pattern_groups[u] = self._pattern_groups(u, layout_tree)
        return NestedSchurObjective(self.XtX[u], ZtX, ZtZ, int(self.n_obs[u]), self.layout, reml, self.tree,
                                    layout_tree, objective_groups)

    def pattern_data(self, objective: NestedSchurObjective, u: int, idx: np.ndarray):
        sums = [s.take(idx) for s in self.sums]
        out = []
        for pg in self.pattern_groups[u]:
            if pg.source < 0:
                out.append(touched_family_sums(sums, self.groups, pg))
                continue
            group = self.groups[pg.source]
            if pg.touched.size == 0:
                out.append(group.fit_sums(sums[pg.source]))
                continue
            whole = np.setdiff1d(np.arange(group.outer.size), pg.touched)
            classes, kept = group.classes.without_levels(pg.touched, whole)
            out.append(pattern_sums(sums[pg.source], group, classes, kept, pg.touched))
        return objective.data_from_sums(out)


def places(complete: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Where each of a touched family's new block columns sits in its complete block (Z column ids)."""
    order = np.argsort(complete)
    at = np.minimum(np.searchsorted(complete[order], new), complete.size - 1)
    if not np.array_equal(complete[order[at]], new):
        raise ValueError("a family's block in a presence pattern holds a column its complete block lacks")
    return order[at]


def touched_family_sums(sums: list[LevelSums], groups: list[LevelGroup], pg: PatternGroup) -> LevelSums:
    """A group of touched families' LevelSums: no class, each family's y_j (stored in its complete group,
    at the columns of its new block)."""
    v, m, b = sums[0].n_voxels, pg.level.size, pg.columns.shape[1]
    y = np.empty((v, m, b))
    for o in np.unique(pg.origin):
        sel = np.flatnonzero(pg.origin == o)
        yo = sums[o].level_y(groups[o].small_position(), np.repeat(np.arange(v), sel.size), np.tile(pg.level[sel], v))
        y[:, sel] = np.take_along_axis(yo.reshape(v, sel.size, -1), pg.columns[sel][None], axis=2)
    p = sums[0].XtY.shape[1]
    return LevelSums.untouched(sums[0].XtY, sums[0].YtY, np.zeros((v, 0, b, b, p)),
                               np.zeros((v, 0, b * (b + 1) // 2)), y)


def nested_schur_sum_stats(X: np.ndarray, factors: list[RandomFactor], tree: list[int], patterns: np.ndarray,
                           pattern_of_voxel: np.ndarray, sums: list[LevelSums], groups: list[LevelGroup]
                           ) -> NestedSchurSumStats:
    """A nesting tree beside dense factors: statistics from its groups' class-aggregated sums
    (`tree_schur_groups`, XtY = U'Y) and the presence patterns' design sums (X, factors: the complete
    design, rows as in ``patterns``)."""
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    design = class_sum_design(X, Z, layout, patterns, pattern_of_voxel, sums[0])
    complete = NestedTree(layout, (Z.T @ Z).tocsr(), tree)  # its groups are `groups`, in their order
    members = list(complete.groups.values())
    if [len(m) for m in members] != [g.outer.size for g in groups]:
        raise ValueError("the stored groups of families are not the complete design's")
    family_of_row = np.searchsorted(layout.levels[complete.root], factors[complete.root].labels).astype(np.int64)
    return NestedSchurSumStats(**design, sums=sums, groups=groups, members=members, spans=complete.spans,
                               tree=complete.tree, family_of_row=family_of_row)

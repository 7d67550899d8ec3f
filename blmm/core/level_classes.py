"""Classes of levels of one random factor, and the data sums aggregated over a class.

Levels with identical G_j = Z_j'Z_j form a class (docs/model.md).  A "big" class has at
least q p members: its levels share every voxel-dependent weight, so the data enter only
through class aggregates Σ_j y_j y_j' and Σ_j X_j[e]' y_j[f] (y_j = Z_j'Y).  The rule and
the aggregates live here once: `LevelObjective` uses them, and so does the pipeline's batch
writer, which stores the aggregates instead of every level's y_j.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def big_class_min(q: int, p: int) -> int:
    """Members a class needs to be aggregated: below q p, the level-by-level terms are cheaper."""
    return q * p


@dataclass(frozen=True)
class LevelClasses:
    """The classes of one factor's levels with rows (indices into those levels, ascending)."""

    level_index: np.ndarray  # (Lp,) levels that have rows, into all levels
    big_members: tuple  # per big class: its members (indices into level_index), ascending
    big_counts: np.ndarray  # (Cb,) members per big class
    small_levels: np.ndarray  # levels outside big classes (indices into level_index)

    @property
    def n_big(self) -> int:
        return len(self.big_members)

    @classmethod
    def from_blocks(cls, G_all: np.ndarray, p: int, min_members: int | None = None) -> "LevelClasses":
        """Classes from the diagonal blocks G_j (L, q, q) of Z'Z; levels with G_j = 0 have no rows."""
        L, q = G_all.shape[0], G_all.shape[1]
        present = np.any(G_all.reshape(L, -1) != 0, axis=1)
        level_index = np.flatnonzero(present)
        G = G_all[present]
        keys = np.ascontiguousarray(G.reshape(G.shape[0], q * q))
        _, cls_of, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        cls_of = cls_of.reshape(-1)
        threshold = big_class_min(q, p) if min_members is None else min_members
        big = np.flatnonzero(counts >= threshold)
        return cls(level_index=level_index, big_members=tuple(np.flatnonzero(cls_of == c) for c in big),
                   big_counts=counts[big].astype(np.int64), small_levels=np.flatnonzero(~np.isin(cls_of, big)))

    def without_levels(self, touched: np.ndarray, level_index: np.ndarray) -> tuple["LevelClasses", np.ndarray]:
        """The classes of a pattern of rows whose missing rows touch levels ``touched`` (into all levels),
        and which of these big classes each of its big classes is: a big class keeps its untouched
        members (their G_j is unchanged) and drops out when none is left; the touched levels that keep
        rows (``level_index``: the pattern's levels with rows) join the small levels."""
        touched = np.asarray(touched, np.int64)
        big, kept = [], []
        for c, mem in enumerate(self.big_members):
            ids = self.level_index[mem]
            ids = ids[~np.isin(ids, touched)]
            if ids.size:
                big.append(np.searchsorted(level_index, ids))
                kept.append(c)
        small_ids = np.union1d(self.level_index[self.small_levels], touched)
        small_ids = small_ids[np.isin(small_ids, level_index)]
        return (LevelClasses(level_index=np.asarray(level_index, np.int64), big_members=tuple(big),
                             big_counts=np.array([m.size for m in big], np.int64),
                             small_levels=np.searchsorted(level_index, small_ids)),
                np.array(kept, np.int64))

    def big_level_mask(self, n_levels: int) -> np.ndarray:
        """(L,) True for levels (into all levels) that belong to a big class."""
        out = np.zeros(n_levels, bool)
        for mem in self.big_members:
            out[self.level_index[mem]] = True
        return out


def upper_pairs(q: int) -> list:
    """(a, b) with a <= b, the order in which symmetric q x q aggregates are stored."""
    return list(zip(*np.triu_indices(q)))


def class_order(classes: LevelClasses, first: int, m: int) -> np.ndarray:
    """(m,) the levels first, ..., first + m - 1 in class order: each big class's members adjacent
    (ascending, classes in order), then the other levels; y_j held in this order gives
    `class_aggregates` each class as one slice, without a gather."""
    cls = np.full(m, classes.n_big, np.int64)
    for i, mem in enumerate(classes.big_members):
        mem = mem[(mem >= first) & (mem < first + m)]
        cls[mem - first] = i
    return first + np.argsort(cls, kind="stable")


def held_at(mem: np.ndarray, at: np.ndarray | None, first: int) -> np.ndarray | slice:
    """Where levels mem are held in y_j: ``at[mem - first]`` (mem - first without ``at``), as a
    slice when they are adjacent and ascending (a view, not a copy)."""
    pos = mem - first if at is None else at[mem - first]
    if pos.size and pos[-1] - pos[0] == pos.size - 1 and np.all(np.diff(pos) == 1):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return pos


def class_aggregates(classes: LevelClasses, Xl: np.ndarray, yl: np.ndarray, first: int = 0,
                     at: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per big class: KXYo (v, Cb, q, q, p) = Σ_j X_j[e]' y_j[f] (ordered (e, f)) and
    KYY (v, Cb, q(q+1)/2) = Σ_j y_j[a] y_j[b] over upper pairs.

    Xl (Lp, q, p) holds X_j = Z_j'X of every level with rows; yl (v, m, q) the voxels' y_j of
    the m consecutive levels first, ..., first + m - 1 (indices into level_index), so a batch
    of images holding whole levels adds its part and the parts sum to the full aggregates.
    yl holds level first + i at position i, or at ``at[i]`` where given (`class_order`).
    """
    v, m, q = yl.shape
    p = Xl.shape[2]
    pairs = upper_pairs(q)
    KXYo = np.zeros((v, classes.n_big, q, q, p))
    KYY = np.zeros((v, classes.n_big, len(pairs)))
    for i, mem in enumerate(classes.big_members):  # few big classes: one GEMM each
        mem = mem[(mem >= first) & (mem < first + m)]
        if mem.size == 0:
            continue
        Xm, ym = Xl[mem], yl[:, held_at(mem, at, first)]
        for e in range(q):
            for f in range(q):
                KXYo[:, i, e, f] = ym[:, :, f] @ Xm[:, e, :]
        for k, (a, b) in enumerate(pairs):
            KYY[:, i, k] = np.einsum("vm,vm->v", ym[:, :, a], ym[:, :, b])
    return KXYo, KYY


def symmetric_cross(KXYo: np.ndarray) -> np.ndarray:
    """KXY (v, Cb, q(q+1)/2, p) over upper pairs: Σ_j (X_j[a]' y_j[b] + X_j[b]' y_j[a]) off the diagonal."""
    q = KXYo.shape[2]
    pairs = upper_pairs(q)
    out = np.empty(KXYo.shape[:2] + (len(pairs), KXYo.shape[-1]))
    for k, (a, b) in enumerate(pairs):
        out[:, :, k] = KXYo[:, :, a, b] if a == b else KXYo[:, :, a, b] + KXYo[:, :, b, a]
    return out

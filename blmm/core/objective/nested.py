"""Nested random factors, eliminated by the outer level (docs/model.md, "Nested factors").

When every level of a factor lies within one level of another (subjects in families),
Z'Z is block diagonal by the outer level: family j's block holds the family's q_f effects
and the q_s effects of each of its subjects, q_f + m_j q_s columns in all.  Each such block
is one "level" of a `LevelObjective` with q = block size and D_j = blockdiag(D_f, D_s, …, D_s),
so families with identical blocks form classes exactly as subjects do for one factor, and
the cost does not grow with the number of families.

Families are grouped by the shape of their block (which factor each member belongs to, in
a canonical order: members sorted by their own Z'Z blocks, so that visit counts (1, 3) and
(3, 1) give the same block); every group is one `LevelObjective`.  The per-factor D enter
through a 0/1 linear map P, vec D_block = P vec[D_f, D_s]; the block gradient, Σ T, Σ uu'
and the expected information map back as P' g and P' F P, summed over groups.  X'V⁻¹X and
the other products combine as X'X − Σ_groups (X'X − X'V_g⁻¹X).

Chains of any length (site ⊃ family ⊃ subject) are handled the same way, with the block of
the outermost factor whose blocks stay small (`MAX_NESTED_BLOCK`); a factor above it (few
levels, big blocks) is better left dense (`NestedSchurObjective`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core import linalg as la
from blmm.core.level_classes import LevelClasses
from blmm.core.objective.base import Evaluation, array_bytes, no_units, profiled
from blmm.core.objective.levels import LevelObjective
from blmm.core.objective.schur import SchurData, SchurObjective, augmented_design, factor_columns

MAX_NESTED_BLOCK = 16  # largest block (columns per outer level) the nested route takes on its own


def _descendants(parent_of: dict, root: int) -> list[int]:
    out = [root]
    changed = True
    while changed:
        changed = False
        for k, par in parent_of.items():
            if par in out and k not in out:
                out.append(k)
                changed = True
    return out


def nested_tree(layout, max_block: int = MAX_NESTED_BLOCK) -> list[int] | None:
    """Factors (ascending index) of the largest nesting tree whose outer blocks have at most
    `max_block` columns; its root is the first member with no parent inside it.  None if no
    factor nests in another (or the layout carries no nesting information)."""
    parents = getattr(layout, "parent", None)
    if not parents or all(p is None for p in parents):
        return None
    parent_of = {k: p[0] for k, p in enumerate(parents) if p is not None}

    def block_size(root: int) -> int:
        """Largest number of columns under one level of `root`."""
        cols = np.full(layout.n_levels[root], layout.q[root], dtype=np.int64)
        for d in _descendants(parent_of, root)[1:]:
            code = np.arange(layout.n_levels[d])
            k = d
            while k != root:  # walk each level of d up to its root level
                code = parents[k][1][code]
                k = parent_of[k]
            cols += np.bincount(code, minlength=cols.size) * layout.q[d]
        return int(cols.max())

    best = None
    for r in range(len(layout.q)):
        members = _descendants(parent_of, r)
        if len(members) < 2 or block_size(r) > max_block:
            continue
        if best is None or len(members) > len(best):
            best = members
    return None if best is None else sorted(best)


@dataclass
class NestedData:
    XtY: np.ndarray
    YtY: np.ndarray
    groups: list  # LevelData per block shape

    def take(self, idx) -> "NestedData":
        return NestedData(la.select_rows(self.XtY, idx), la.select_rows(self.YtY, idx),
                          [g.take(idx) for g in self.groups])


class NestedTree:
    """The layout of a nesting tree in Z'Z, before any evaluation: its nodes (every level of every
    factor in the tree), their blocks G (own, and with the parent node), which nodes have rows, the
    outer levels grouped by block shape, and the factors spanned by their child (`spanned`).

    Host-only (numpy, off the array seam): it runs once per objective on Z'Z and small index arrays;
    `NestedObjective` evaluates in the namespace of the voxels' arrays."""

    def __init__(self, layout, ZtZ: sp.csr_matrix, tree: list[int] | None = None, spans: dict | None = None):
        tree = nested_tree(layout) if tree is None else sorted(tree)
        if tree is None:
            raise ValueError("no random factor nests in another")
        self.tree, self.layout = tree, layout
        qk = layout.q
        self.parent_of = {k: layout.parent[k][0] for k in tree if layout.parent[k] is not None
                          and layout.parent[k][0] in tree}
        roots = [k for k in tree if k not in self.parent_of]
        if len(roots) != 1:
            raise ValueError(f"factors {tree} do not form one nesting tree")
        self.root = roots[0]
        self._number_nodes()
        self._node_blocks(ZtZ)
        self._mark_present()
        # per-factor vec offsets in the reduced parameter [vec D_k for k in tree]
        self.q = [qk[k] for k in tree]
        self.soff = np.concatenate([[0], np.cumsum([q * q for q in self.q])]).astype(int)
        self.s = int(self.soff[-1])
        # given spans: a presence pattern keeps its complete design's (they hold row by row, so on any rows)
        self.spans = self._spanned() if spans is None else spans
        self.groups = self._group_outer_levels()

    def _number_nodes(self) -> None:
        """Global node numbering (node_base[k] + level), each node's factor, level and parent node."""
        layout, tree, parent_of = self.layout, self.tree, self.parent_of
        nlev = layout.n_levels
        self.node_base, nb = {}, 0
        for k in tree:
            self.node_base[k] = nb
            nb += nlev[k]
        self.n_nodes = nb
        self.node_factor = np.concatenate([np.full(nlev[k], k) for k in tree])
        self.node_level = np.concatenate([np.arange(nlev[k]) for k in tree])
        self.parent_node = np.full(nb, -1)
        for k in tree:
            if k in parent_of:
                self.parent_node[self.node_base[k]:self.node_base[k] + nlev[k]] = \
                    self.node_base[parent_of[k]] + layout.parent[k][1]

    def _node_blocks(self, ZtZ: sp.csr_matrix) -> None:
        """Gd: each node's own block of Z'Z; Gx: each node's block with its parent node."""
        layout, tree = self.layout, self.tree
        qk, off, nb = layout.q, layout.offsets, self.n_nodes
        # column -> node, effect
        col_node = np.full(layout.n_columns, -1)
        col_eff = np.zeros(layout.n_columns, np.int64)
        for k in tree:
            cols = np.arange(off[k], off[k + 1])
            col_node[cols] = self.node_base[k] + (cols - off[k]) // qk[k]
            col_eff[cols] = (cols - off[k]) % qk[k]
        qmax = max(qk[k] for k in tree)
        self.Gd = np.zeros((nb, qmax, qmax))
        self.Gx = np.zeros((nb, qmax, qmax))
        coo = ZtZ.tocoo()
        nr, nc = col_node[coo.row], col_node[coo.col]
        ok = (nr >= 0) & (nc >= 0)
        r, c, val, nr, nc = coo.row[ok], coo.col[ok], coo.data[ok], nr[ok], nc[ok]
        same = nr == nc
        np.add.at(self.Gd, (nr[same], col_eff[r[same]], col_eff[c[same]]), val[same])
        up = ~same & (self.parent_node[nr] == nc)
        np.add.at(self.Gx, (nr[up], col_eff[r[up]], col_eff[c[up]]), val[up])

    def _mark_present(self) -> None:
        """Nodes with rows (a parent of a node with rows has rows), and each node's children."""
        nlev, parent_of, parent_node = self.layout.n_levels, self.parent_of, self.parent_node
        self.present = np.any(self.Gd.reshape(self.n_nodes, -1) != 0, axis=1)
        for k in sorted(self.tree, key=lambda k: -self._depth(parent_of, k)):  # children before parents
            if k in parent_of:
                nodes = np.arange(self.node_base[k], self.node_base[k] + nlev[k])
                np.logical_or.at(self.present, parent_node[nodes[self.present[nodes]]], True)
        self.children = [[] for _ in range(self.n_nodes)]
        for node in np.flatnonzero(self.present & (parent_node >= 0)):
            self.children[parent_node[node]].append(int(node))

    def _group_outer_levels(self) -> dict:
        """The outer levels with rows, grouped by block shape: {shape (factor per node): [nodes per level]},
        each level's nodes in a canonical order (children sorted by their blocks' signature)."""
        qk, parent_of, node_factor, children = self.layout.q, self.parent_of, self.node_factor, self.children
        Gd, Gx = self.Gd, self.Gx

        def signature(node):
            k = int(node_factor[node])
            kids = sorted((signature(ch) for ch in children[node]), key=lambda s: s[0])
            key = (k, tuple(np.round(Gd[node, :qk[k], :qk[k]], 12).ravel()),
                   tuple(np.round(Gx[node, :qk[k], :qk[parent_of[k]]], 12).ravel()) if k in parent_of else (),
                   tuple(s[0] for s in kids))
            return key, node, kids

        def order(sig, out):
            out.append(sig[1])
            for kid in sig[2]:
                order(kid, out)
            return out

        groups: dict = {}
        base, root = self.node_base[self.root], self.root
        for lvl in np.flatnonzero(self.present[base:base + self.layout.n_levels[root]]):
            nodes = order(signature(base + lvl), [])
            shape = self.shape_of(nodes)
            groups.setdefault(shape, []).append(nodes)
        return groups

    def shape_of(self, nodes: list) -> tuple:
        """A block's shape: the factor of each of its nodes, in their order."""
        return tuple(int(self.node_factor[x]) for x in nodes)

    def block_columns(self, members: list, keep: np.ndarray) -> np.ndarray:
        """The Z columns of a group's blocks (its members' nodes in order, kept positions only)."""
        qk, off, node_factor, node_level = self.layout.q, self.layout.offsets, self.node_factor, self.node_level
        return np.concatenate([np.concatenate([off[node_factor[x]] + node_level[x] * qk[node_factor[x]]
                                               + np.arange(qk[node_factor[x]]) for x in nodes])[keep]
                               for nodes in members]).astype(np.int64)

    def _spanned(self) -> dict:
        """Factors whose Z columns are their child factor's columns times a fixed matrix a_k
        (e.g. a family intercept = the sum of its subjects' intercepts): {k: a_k (q_child, q_k)}.

        Found from Z'Z alone: a_k by least squares pooled over all nodes, accepted when the
        residual Σ ||Z_k - Σ_children Z_c a_k||² vanishes.  Such a factor's block columns are
        then dropped: its D_k enters the children's block as a_k D_k a_k' (fewer columns)."""
        tree, parent_of, node_factor, present = self.tree, self.parent_of, self.node_factor, self.present
        Gd, Gx, qk = self.Gd, self.Gx, self.layout.q
        out = {}
        for k in tree:
            kids = [c for c in tree if parent_of.get(c) == k]
            if len(kids) != 1:
                continue
            c = kids[0]
            ch = np.flatnonzero(present & (node_factor == c))
            par = np.flatnonzero(present & (node_factor == k))
            qc, qp = qk[c], qk[k]
            Gcc = Gd[ch, :qc, :qc].sum(axis=0)
            Gck = Gx[ch, :qc, :qp].sum(axis=0)
            try:
                a = np.linalg.solve(Gcc, Gck)
            except np.linalg.LinAlgError:
                continue
            total = np.trace(Gd[par, :qp, :qp].sum(axis=0))
            resid = total - 2 * np.trace(a.T @ Gck) + np.trace(a.T @ Gcc @ a)
            if total > 0 and abs(resid) <= 1e-10 * total:
                out[k] = np.round(a, 12)
        return out

    def block_map(self, shape, nodes):
        """P (b_kept², s) with vec D̃ = P vec[D_k], the kept block positions, and P's terms.

        D_block = blockdiag over the block's nodes of D_k; the columns of a spanned factor
        are Z_block = Z_kept E', so D̃ = E' D_block E and P = (E' ⊗ E') P_block."""
        qk, tree, soff, parent_node = self.layout.q, self.tree, self.soff, self.parent_node
        b = sum(qk[k] for k in shape)
        start = np.concatenate([[0], np.cumsum([qk[k] for k in shape])]).astype(int)
        local = {x: i for i, x in enumerate(nodes)}
        Pb = np.zeros((b * b, self.s))
        for i, k in enumerate(shape):
            ti, o = tree.index(k), start[i]
            for a in range(qk[k]):
                for cc in range(qk[k]):
                    Pb[(o + a) * b + o + cc, soff[ti] + a * qk[k] + cc] = 1.0
        dropped = np.zeros(b, bool)
        for i, k in enumerate(shape):
            if k in self.spans:
                dropped[start[i]:start[i + 1]] = True
        keep = np.flatnonzero(~dropped)
        E = np.zeros((b, b))
        E[keep, keep] = 1.0
        for i in reversed(range(len(shape))):  # children come after their parent in the order
            k = shape[i]
            if k not in self.spans:
                continue
            a = self.spans[k]
            for x in nodes[i + 1:]:
                if parent_node[x] == nodes[i]:
                    j = local[x]
                    E[start[i]:start[i + 1]] += a.T @ E[start[j]:start[j + 1]]
        E = E[:, keep]
        bk = keep.size
        P = np.kron(E.T, E.T) @ Pb
        P[np.abs(P) < 1e-14] = 0.0
        # Python numbers: they weigh arrays of any namespace (a numpy scalar is not a standard scalar)
        terms = [[(int(r // bk), int(r % bk), float(P[r, x])) for r in np.flatnonzero(P[:, x])]
                 for x in range(self.s)]
        return P, keep, terms

    @staticmethod
    def _depth(parent_of, k):
        d = 0
        while k in parent_of:
            k = parent_of[k]
            d += 1
        return d


@dataclass(frozen=True)
class TreeGroup:
    """One group of outer levels given to `NestedObjective`: its block shape, its members' nodes
    (`NestedTree` numbering, each member's in canonical order) and their classes (None: from the
    blocks; given: any partition into equal blocks, levels numbered as the members)."""

    shape: tuple
    members: list
    classes: LevelClasses | None = None


class NestedObjective:
    """A tree of nested factors, eliminated by the blocks of its outermost factor: each group of
    outer levels with one block shape (`NestedTree`) is a `LevelObjective` with q = the block size.

    ``groups`` (`TreeGroup`s over ``layout_tree``'s nodes) replace the tree's own grouping: a
    presence pattern's families keep their complete design's groups and classes where its missing
    rows leave them whole (core/nested_schur_sums.py)."""

    missing_rows = False
    has_deviance_hessian = False

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, tree: list[int] | None = None,
                 layout_tree: NestedTree | None = None, groups: list[TreeGroup] | None = None):
        ZtZ = sp.csr_matrix(ZtZ)
        if layout_tree is None:  # not kept: only what evaluation needs is
            layout_tree = NestedTree(layout, ZtZ, tree)
        if groups is None:
            groups = [TreeGroup(shape, members) for shape, members in layout_tree.groups.items()]
        self.tree, self.root = layout_tree.tree, layout_tree.root
        self.n, self.p, self.reml = int(n), XtX.shape[0], bool(reml)
        self.XtX = XtX
        self.q, self.s, self.spans = layout_tree.q, layout_tree.s, layout_tree.spans
        self.soff = tuple(int(o) for o in layout_tree.soff)  # slice bounds: host integers in any namespace
        self.levels, self.perm, self.P, self.Pterms, self.shapes = [], [], [], [], []
        for group in groups:
            shape, members = group.shape, group.members
            P, keep, terms = layout_tree.block_map(shape, members[0])
            perm = layout_tree.block_columns(members, keep)
            b = int(keep.size)
            # a class of a few families already pays for aggregated data sums (block sizes are small)
            lv = LevelObjective(XtX, ZtX[perm], ZtZ[perm][:, perm], n, b, reml, big_class_min=max(2, b),
                                classes=group.classes)
            self.levels.append(lv)
            self.perm.append(perm)
            self.P.append(P)
            self.Pterms.append(terms)
            self.shapes.append(shape)

    def per_voxel_bytes(self) -> int:
        """Working memory per voxel of one evaluation with its gradient (for block sizing)."""
        total = 0
        for lv in self.levels:
            total += 12 * lv.C * lv.q ** 2 + lv.Cb * len(lv.pairs) * (lv.p + 1) + 4 * lv.C
        return 8 * (total + 4 * self.s ** 2 + 8 * self.p ** 2)

    def held_bytes(self) -> int:
        # X'X is the levels' own (one array): counted there
        return sum(lv.held_bytes() for lv in self.levels) + array_bytes(self.perm, self.P, self.soff, self.spans)

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units=None) -> NestedData:
        no_units(self, units)
        XtY = np.ascontiguousarray(XtY)
        YtY = np.asarray(YtY, dtype=np.float64)
        return NestedData(XtY, YtY, [lv.data(XtY, ZtY[:, perm], YtY) for lv, perm in zip(self.levels, self.perm)])

    def data_from_sums(self, sums: list) -> NestedData:
        """NestedData from each group's class-aggregated sums (`LevelSums`, core/level_groups.py)."""
        XtY, YtY = np.ascontiguousarray(sums[0].XtY), np.asarray(sums[0].YtY, dtype=np.float64)
        return NestedData(XtY, YtY, [lv.data_from_sums(XtY, YtY, s.KXYo, s.KYY, s.y_small)
                                     for lv, s in zip(self.levels, sums)])

    def block_D(self, D_list, g):
        """Group g's block covariance D̃ = P_g vec[D_k] per voxel (v, b, b)."""
        xp = la.namespace(*[D_list[k] for k in self.tree])
        v = D_list[self.tree[0]].shape[0]
        Dvec = xp.concat([xp.reshape(D_list[k], (v, -1)) for k in self.tree], axis=1)
        b = self.levels[g].q
        return xp.reshape(Dvec @ self.P[g].T, (v, b, b))

    def products(self, D_list, data: NestedData):
        """X'V⁻¹X, X'V⁻¹Y, Y'V⁻¹Y and log|V| over the tree's factors (D_list: every factor, by index)."""
        XtVX = XtVY = YtVY = None
        logdetV = 0.0
        Rs = []
        for g, lv in enumerate(self.levels):
            A, B, C, ld, R = lv.products(self.block_D(D_list, g), data.groups[g])
            if XtVX is None:
                XtVX, XtVY, YtVY = A, B, C
            else:
                XtVX += A - self.XtX
                XtVY += B - data.XtY
                YtVY += C - data.YtY
            logdetV = logdetV + ld
            Rs.append(R)
        return XtVX, XtVY, YtVY, logdetV, Rs

    def gradient_parts(self, Rs, data: NestedData, gamma, Omega):
        """Per tree factor Σ T, Σ uu', Σ S Ω S' (lists of (v, q_k, q_k)) and the information (v, s, s)."""
        T_vec, uu_vec, corr_vec, info = self.gradient_vectors(Rs, data, gamma, Omega)
        return self.per_factor(T_vec), self.per_factor(uu_vec), self.per_factor(corr_vec), info

    def gradient_vectors(self, Rs, data: NestedData, gamma, Omega):
        """Σ T, Σ uu', Σ S Ω S' in the reduced coordinates [vec D_k for k in tree] (v, s), and the information."""
        xp = la.namespace(gamma)
        v = gamma.shape[0]
        T_vec = xp.zeros((v, self.s), dtype=gamma.dtype, device=la.device_of(gamma))
        uu_vec = xp.zeros((v, self.s), dtype=gamma.dtype, device=la.device_of(gamma))
        corr_vec = xp.zeros((v, self.s), dtype=gamma.dtype, device=la.device_of(gamma))
        info = xp.zeros((v, self.s, self.s), dtype=gamma.dtype, device=la.device_of(gamma))
        for g, lv in enumerate(self.levels):
            T, uu, corr, _ = lv.gradient_parts(Rs[g], data.groups[g], gamma, Omega, with_info=False)
            P = self.P[g]
            T_vec += xp.reshape(T, (v, -1)) @ P
            uu_vec += xp.reshape(uu, (v, -1)) @ P
            corr_vec += xp.reshape(corr, (v, -1)) @ P
            info += self._information(lv, Rs[g], self.Pterms[g])
        return T_vec, uu_vec, corr_vec, info

    def per_factor(self, vec: np.ndarray) -> list:
        """(v, s) in the reduced coordinates -> per tree factor (v, q_k, q_k)."""
        xp = la.namespace(vec)
        v = vec.shape[0]
        return [xp.reshape(vec[:, self.soff[i]:self.soff[i + 1]], (v, q, q)) for i, q in enumerate(self.q)]

    @staticmethod
    def _information(lv, R, terms):
        """P' F P with F[(a,b),(c,d)] = Σ_units m T[b,c] T[a,d], T = R G (symmetric), summed directly."""
        b = lv.q
        Tu = {}

        def T(i, j):
            i, j = min(i, j), max(i, j)
            if (i, j) not in Tu:
                t = sum(R[i][e] * lv.g[e][j] for e in range(b))
                if i != j:
                    t = 0.5 * (t + sum(R[j][e] * lv.g[e][i] for e in range(b)))
                Tu[i, j] = t
            return Tu[i, j]
        s = len(terms)
        xp = la.namespace(lv.mu)
        v = R[0][0].shape[0] if R[0][0].ndim == 2 else 1
        out = xp.zeros((v, s, s), dtype=lv.mu.dtype, device=la.device_of(lv.mu))
        for x in range(s):
            for y in range(x, s):
                if not terms[x] or not terms[y]:
                    continue
                acc = 0.0
                for i, j, w in terms[x]:
                    for i2, j2, w2 in terms[y]:
                        acc = acc + (w * w2) * T(j, i2) * T(i, j2)
                val = acc @ lv.mu
                out[:, x, y] = val
                out[:, y, x] = val
        return out

    def evaluate(self, D_list, data: NestedData, sigma2=None, grad=False) -> Evaluation:
        XtVX, XtVY, YtVY, logdetV, Rs = self.products(D_list, data)
        ev = profiled(la.sym(XtVX), XtVY, YtVY, logdetV, self.n, self.p, self.reml, sigma2)
        if not grad:
            return ev
        T_sum, uu, corr, info = self.gradient_parts(Rs, data, ev.beta, ev.C if self.reml else None)
        return with_gradient(ev, T_sum, uu, corr, info)


def with_gradient(ev: Evaluation, T_sum: list, uu: list, corr: list, info: np.ndarray) -> Evaluation:
    """ev with the deviance gradient G_k = Σ T - Σ S C S' - Σ uu'/σ² per factor and the information."""
    s2 = ev.sigma2[:, None, None]
    ev.grad = [la.sym(t - c - u / s2) for t, c, u in zip(T_sum, corr, uu)]
    ev.T_sum = T_sum
    ev.uu_sum = uu
    ev.info = info
    return ev


class NestedSchurObjective(SchurObjective):
    """A nesting tree eliminated by its outer blocks, plus crossed factors with few columns kept dense.

    E.g. (1|site) + (1|family) + (1|subject): families and subjects go through
    `NestedObjective` with the sites' columns riding along with X (U = [X, Z_R]); a second
    Woodbury step over the q_R site columns gives V⁻¹, as in `SchurObjective`.
    """

    def __init__(self, XtX, ZtX, ZtZ, n, layout, reml, tree: list[int], layout_tree: NestedTree | None = None,
                 groups: list[TreeGroup] | None = None, level: NestedObjective | None = None):
        """``level``: the tree's `NestedObjective` on U of these same sums, where one is built already."""
        ZtZ = sp.csr_matrix(ZtZ)
        self.n, self.p, self.reml = int(n), XtX.shape[0], bool(reml)
        self.qk = layout.q
        nlev = layout.n_levels
        self.tree = list(tree)
        self.small = [k for k in range(len(self.qk)) if k not in self.tree]
        if not self.small:
            raise ValueError("no crossed factor left: use NestedObjective")
        small_cols = dense_columns(layout, self.tree)
        self.small_cols = small_cols
        self.qR = small_cols.size
        if level is None:
            ZRtX = ZtX[small_cols]
            ZRtZR = np.asarray(ZtZ[small_cols][:, small_cols].todense())
            UtU = np.block([[XtX, ZRtX.T], [ZRtX, ZRtZR]])
            ZtU = np.hstack([ZtX, np.asarray(ZtZ[:, small_cols].todense())])  # all Z columns; the tree picks its own
            level = NestedObjective(UtU, ZtU, ZtZ, n, layout, reml, self.tree, layout_tree, groups)
        self.level = level
        # slice bounds: host integers in any namespace
        self.small_offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum([nlev[k] * self.qk[k]
                                                                                    for k in self.small])]))
        self.small_levels = [nlev[k] for k in self.small]
        self.small_q = [self.qk[k] for k in self.small]
        self.eye_p = np.eye(self.p)

    def per_voxel_bytes(self) -> int:
        pu = self.p + self.qR
        return self.level.per_voxel_bytes() + 8 * (12 * pu * pu + 8 * self.qR ** 2)

    def held_bytes(self) -> int:
        return self.level.held_bytes() + array_bytes(self.small_cols, self.small_offsets, self.eye_p)

    # host side (numpy): a block's sums arranged once, then moved (linalg.move); evaluation is on the seam
    def data(self, XtY, ZtY, YtY, units=None) -> SchurData:
        no_units(self, units)
        UtY = np.hstack([XtY, ZtY[:, self.small_cols]])
        return SchurData(self.level.data(UtY, ZtY, YtY), np.ascontiguousarray(ZtY[:, self.small_cols]),
                         np.ascontiguousarray(XtY))

    def data_from_sums(self, sums: list) -> SchurData:
        """SchurData from each tree group's class-aggregated sums of U = [X, Z_R] (`LevelSums`, XtY = U'Y:
        `tree_schur_design`), in this objective's groups."""
        UtY = sums[0].XtY
        return SchurData(self.level.data_from_sums(sums), np.ascontiguousarray(UtY[:, self.p:]),
                         np.ascontiguousarray(UtY[:, :self.p]))

    def _eliminated_products(self, D_list, data: SchurData):
        return self.level.products(D_list, data.level)

    def _coupled_information(self, R, data: SchurData, S, IAS, info, starts) -> None:
        """The tree's information and Σ T stay V₁'s, without blocks with the crossed factors (a scoring
        approximation: the gradient is exact; docs/model.md, "Crossed factors next to a tree")."""
        return None

    def _eliminated_parts(self, R, data: SchurData, gamma, Omega, s2, info, starts):
        T1, uu1, corr1, info1 = self._eliminated_gradient(R, data, gamma, Omega)
        ts = self.level.soff  # the tree's information keeps its cross terms
        for i, k in enumerate(self.tree):
            for i2, k2 in enumerate(self.tree):
                info[:, starts[k]:starts[k + 1], starts[k2]:starts[k2 + 1]] = info1[:, ts[i]:ts[i + 1], ts[i2]:ts[i2 + 1]]
        return {k: (la.sym(T1[i] - corr1[i] - uu1[i] / s2), T1[i], uu1[i]) for i, k in enumerate(self.tree)}


def dense_columns(layout, tree: list[int]) -> np.ndarray:
    """Z's columns of the factors outside a nesting tree (kept dense beside it), in factor order."""
    return factor_columns(layout, [k for k in range(len(layout.q)) if k not in tree])


def tree_schur_design(X: np.ndarray, Z, layout, tree: list[int]) -> np.ndarray:
    """The augmented design U = [X, Z_R] whose sums a nesting tree beside dense factors takes."""
    return augmented_design(X, Z, dense_columns(layout, tree))

"""Family-wise error by a restricted wild bootstrap with the variance components held at a fit.

Notation and formulas: docs/corrected.md.  In short, at every voxel V = I + ZDZ' is fixed, for each
contrast at the D of its null model (refitted here; or at the fit's D), V is block diagonal by the
connected components of the random factors' levels, and a resample y* = Xβ̃ + s∘ẽ (β̃ the GLS
estimate under the contrast's null, ẽ = y − Xβ̃, one weight s_c per independent block: Rademacher
signs by default, or normal, uniform or Webb weights) gives

    β̂* − β̃ = C Σ_c s_c g_c,   g_c = Σ_{i ∈ c} (V⁻¹X)_i ẽ_i,   C = (X'V⁻¹X)⁻¹,
    r*'V⁻¹r* = Σ_c s_c² ẽ_c'V_c⁻¹ẽ_c − h'Ch,  h = Σ_c s_c g_c
    (whole components per block; the first term is ẽ'V⁻¹ẽ when every s_c² = 1).

With C = RR' and a rotation of R'h whose first ``ndf`` coordinates carry the contrast, every
resampled T and F is a function of a = Σ_c s_c a_c: one matrix product (signs × blocks) @
(blocks × voxels·k) per chunk of resamples.  This module prepares the a_c per voxel (``prepare``),
resamples chunks of signs (``resample_signs``, ``resampled_maps``, ``chunk_maxima``) and turns null
maxima into FWE p-values (``fwe_mlog10p``); ``corrected_inference`` composes them in memory.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import special  # not scipy.stats: importing it costs ~1.2 s per process
from threadpoolctl import threadpool_limits

from blmm.core.design import Contrast, RandomFactor
from blmm.core.centre import centre_of
from blmm.core.design_basis import fitting_basis
from blmm.core.fit import fit_stats
from blmm.core.sufficient import FactorLayout, sufficient_stats
from blmm.core.fdr import fdr_mlog10q
from blmm.core.threads import run_blocks, thread_count
from blmm.core.result import FitResult
from blmm.core.status import FITTED
from blmm.core.inference import f_mlog10p, infer, t_mlog10p
from blmm.core.level_classes import LevelClasses
from blmm.core import linalg as la
from blmm.core.linalg import sym as la_sym
from blmm.core.objective.base import diag_blocks
from blmm.core.tail import TailFit, tail_p

STATISTICS = ("mlog10p", "t")  # what the maximum is taken over: −log10 p (Satterthwaite df) or T / F itself
# the null models' stop rule (llh): no Newton polish, so a tighter stop keeps D̂₀ ~10x nearer its optimum
# than the fit's default 1e-6 would, for a few scoring steps instead of the polish's differenced Hessian
NULL_FIT_TOL = 1e-8
SIGMA2_MODES = ("refit", "fixed")  # σ² re-estimated per resample (exact GLS refit with D fixed) or fixed
# σ̂*² of a resample: "fixed" holds the null model's residual sum and removes the contrast's share (r columns:
# what ABCD-size runs fit in), "refit" re-estimates it from all p (docs/corrected.md "Which σ²")
DEFAULT_SIGMA2 = "fixed"
PRECISIONS = ("float64", "float32")  # of the prepared contributions and the sign GEMM (docs/corrected.md)
WEIGHTS = ("rademacher", "webb", "normal", "uniform")  # the wild bootstrap's weight per block (docs/corrected.md)
# Each contrast's V: its null model's fitted D (the statistic does not depend on the tested columns' fit) or the
# full model's (docs/corrected.md "Which fit's variance components")
VARIANCES = ("null", "fit")
DEFAULT_VARIANCE = "null"
# Rademacher: exact for sign-symmetric block contributions once V does not depend on the tested columns (the
# null model's D); normal weights' heavier tail was conservative there (docs/corrected.md "Weights")
DEFAULT_WEIGHTS = "rademacher"
WEBB_POINTS = np.array([-np.sqrt(1.5), -1.0, -np.sqrt(0.5), np.sqrt(0.5), 1.0, np.sqrt(1.5)])  # mean 0, variance 1
UNIFORM_HALF_WIDTH = np.sqrt(3.0)  # uniform on [−√3, √3]: mean 0, variance 1, E w⁴ = 9/5
MAX_COMPONENT = 512  # images in one independent block: its M (or, blocks split, V_b⁻¹) is dense per voxel
# Resamples per sign GEMM, aligned: the same seed gives bit-identical maxima in any chunking.  128, not 32:
# the contributions are streamed from memory once per GEMM; 4x the rows per pass doubled the FLOPs per CPU s.
GEMM_BATCH = 128
# Classes pay off when they are shared: with more than this many classes per component (random slopes on
# a continuous covariate make every family its own class) the dense per-family path is the cheaper one.
MAX_CLASSES_PER_COMPONENT = 0.25
MapTransform = Callable[[np.ndarray], np.ndarray]  # (R, V) resampled statistic maps -> (R,) one value each


def max_over_voxels(maps: np.ndarray) -> np.ndarray:
    """The maximum statistic: (R, V) maps -> (R,), NaN voxels ignored (NaN where all are), in the maps'
    namespace (the standard has no nanmax: NaN as −inf, then back)."""
    xp = la.namespace(maps)
    if xp is np:
        return np.nanmax(maps, axis=1)
    top = xp.max(xp.where(xp.isnan(maps), -xp.inf, maps), axis=1)
    return xp.where(xp.all(xp.isnan(maps), axis=1), xp.nan, top)


# ---------------------------------------------------------------------------------------------
# Blocks and signs

def independent_blocks(factors: list[RandomFactor], names: list[str] | None = None) -> np.ndarray:
    """Block index of each image: connected components of the images linked by a shared level.

    ``names`` picks the factors that link images (default: every random factor).  With subjects
    nested in families the components are the families; with one factor, its levels.  Blocks are
    numbered in order of their first image.
    """
    chosen = factors if names is None else [f for f in factors if f.name in names]
    if names is not None and len(chosen) != len(set(names)):
        known = ", ".join(f.name for f in factors)
        unknown = sorted(set(names) - {f.name for f in chosen})
        raise ValueError(f"blocks: factors {unknown} not among the random factors ({known})")
    if not chosen:
        raise ValueError("blocks: at least one random factor is needed to define independent blocks")
    n = chosen[0].n
    rows, cols, offset = [], [], n
    for f in chosen:
        levels, codes = f.codes()
        rows.append(np.arange(n))
        cols.append(offset + codes)
        offset += levels.size
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sp.coo_matrix((np.ones(r.size), (r, c)), shape=(offset, offset))
    from scipy.sparse.csgraph import connected_components  # when used: scipy's csgraph costs every run ~15 ms (issue 21)

    _, labels = connected_components(graph, directed=False)
    return first_appearance_codes(labels[:n])


def first_appearance_codes(labels: np.ndarray) -> np.ndarray:
    """Integer codes 0, 1, … of any labels, numbered by first appearance."""
    _, first, codes = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[codes.reshape(-1)]


def resample_signs(seed: int, start: int, stop: int, n_blocks: int, weights: str = DEFAULT_WEIGHTS) -> np.ndarray:
    """Weights (signs, for Rademacher) of resamples start … stop − 1, (stop − start, n_blocks), float64.

    ``weights``: Rademacher (±1), Webb's six points (±√½, ±1, ±√(3/2)), standard normal or uniform on
    [−√3, √3], each of mean 0 and variance 1.  Resample 0 is the identity (all +1).  Resample r's
    weights come from their own stream, keyed by (seed, r), so any split of the resamples into chunks or workers
    gives the same weights.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    out = np.empty((stop - start, n_blocks))
    for i, r in enumerate(range(start, stop)):
        if r == 0:
            out[i] = 1.0
            continue
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(seed, spawn_key=(r,))))
        if weights == "rademacher":
            out[i] = 2.0 * rng.integers(0, 2, size=n_blocks) - 1.0
        elif weights == "webb":
            out[i] = WEBB_POINTS[rng.integers(0, 6, size=n_blocks)]
        elif weights == "uniform":
            out[i] = rng.uniform(-UNIFORM_HALF_WIDTH, UNIFORM_HALF_WIDTH, size=n_blocks)
        else:
            out[i] = rng.standard_normal(n_blocks)
    return out


# ---------------------------------------------------------------------------------------------
# Preparation: per voxel, the per-block contributions of every contrast

@dataclass
class ContrastResampling:
    """One contrast's prepared pieces at the prepared voxels."""

    name: str
    is_t: bool
    ndf: int  # numerator df (rank of L)
    columns: slice  # its k columns of ResamplingPrep.contributions: k = ndf (σ² fixed) or p (σ² refitted)
    resid_ss: np.ndarray  # (v,) ẽ'V⁻¹ẽ of the restricted residuals
    df: np.ndarray  # (v,) Satterthwaite (denominator) df of the fit, for −log10 p
    pair_ss: np.ndarray | None = None  # (n_pairs, v) ẽ_c'V⁻¹_cc'ẽ_c' of blocks splitting a component
    block_ss: np.ndarray | None = None  # (n_blocks, v) ẽ_c'V_c⁻¹ẽ_c: weights with s_c² ≠ 1


@dataclass
class ResamplingPrep:
    """Everything a chunk of resamples needs at a set of voxels (see ``prepare``)."""

    voxels: np.ndarray  # indices into the fit's voxels
    n_blocks: int
    dof: float  # n − p (REML) or n (ML): σ̂² = r'V⁻¹r / dof
    sigma2: np.ndarray  # (v,) σ̂² of the fit, recomputed from V (equal to the fit's)
    sigma2_mode: str
    two_sided: bool
    contrasts: list[ContrastResampling]
    contributions: np.ndarray  # (n_blocks, v, Σk) rotated per-block contributions a_c of every contrast
    block_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (n_pairs, 2)
    weights: str = DEFAULT_WEIGHTS  # WEIGHTS: the weight per block of every resample

    @property
    def n_voxels(self) -> int:
        return int(self.voxels.size)

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (what a process keeping it holds)."""
        per_contrast = [a for c in self.contrasts for a in (c.resid_ss, c.df, c.pair_ss, c.block_ss) if a is not None]
        return int(sum(a.nbytes for a in [self.voxels, self.sigma2, self.contributions, self.block_pairs, *per_contrast]))


def check_blocks(blocks: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Components (of V) that a sign block splits: flipping inside them is invalid (docs/corrected.md)."""
    n_comp = int(components.max()) + 1
    first_block = np.full(n_comp, -1)
    first_block[components] = blocks
    return np.unique(components[first_block[components] != blocks])


@dataclass(frozen=True)
class BlockLayout:
    """What depends on the design only: V's diagonal blocks (components) grouped by size, the
    fixed matrices V and X'V⁻¹X are linear in, and the images in sign-block order."""

    order: np.ndarray  # (n,) images in group order: group by group, each component's images together
    groups: list  # per component size n_b: (N, n_b) positions in ``order`` (a contiguous range)
    v_parts: list  # per group: (Σ_k q_k², N n_b²) with V = I + D entries @ v_parts
    k_parts: list  # per group: (N n_b², p(p+1)/2) with vech-packed X'V⁻¹X = Σ V⁻¹ entries @ k_parts
    to_blocks: np.ndarray  # (n,) group-order positions sorted by sign block
    block_starts: np.ndarray  # (n_blocks,) first position of each block in that order
    pairs: np.ndarray  # (n_pairs, 2) sign blocks splitting a component (empty unless allowed)
    pair_sites: list  # per group: (component, a, b) of the image pairs across blocks
    pair_sum: sp.csr_matrix  # (n_pairs, n_image_pairs)


def block_layout(X: np.ndarray, factors: list[RandomFactor], components: np.ndarray, blocks: np.ndarray
                 ) -> BlockLayout:
    """The design's share of ``prepare``: computed once, used by every voxel chunk."""
    p = X.shape[1]
    sizes = np.bincount(components)
    by_comp = np.argsort(components, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    codes = [f.codes()[1] for f in factors]
    iu, ju = np.triu_indices(p)
    order_parts, groups, v_parts, k_parts, pair_sites, cells = [], [], [], [], [], []
    offset = 0
    for nb in np.unique(sizes[sizes > 0]):
        comps = np.flatnonzero(sizes == nb)
        rows = by_comp[starts[comps][:, None] + np.arange(nb)[None, :]]  # (N, nb) image indices
        N = rows.shape[0]
        order_parts.append(rows.reshape(-1))
        groups.append(offset + np.arange(N * nb).reshape(N, nb))
        offset += N * nb
        mats = []
        for f, code in zip(factors, codes):
            same = code[rows][:, :, None] == code[rows][:, None, :]
            z = f.design[rows]
            for a in range(f.q):
                for b in range(f.q):
                    mats.append((same * z[:, :, a, None] * z[:, None, :, b]).reshape(-1))
        v_parts.append(np.stack(mats, axis=0))
        Xg = X[rows]
        k_parts.append((Xg[:, :, None, iu] * Xg[:, None, :, ju]).reshape(N * nb * nb, iu.size))
        a_, b_ = np.triu_indices(nb, k=1)
        ba, bb = blocks[rows[:, a_]], blocks[rows[:, b_]]
        comp, k = np.nonzero(ba != bb)
        pair_sites.append((comp, a_[k], b_[k]))
        cells.append(np.stack([np.minimum(ba, bb)[comp, k], np.maximum(ba, bb)[comp, k]], axis=1))
    order = np.concatenate(order_parts)
    to_blocks = np.argsort(blocks[order], kind="stable")
    block_starts = np.searchsorted(blocks[order][to_blocks], np.arange(int(blocks.max()) + 1))
    cells = np.concatenate(cells)
    if cells.size:
        pairs, which = np.unique(cells, axis=0, return_inverse=True)
        which = which.reshape(-1)
        pair_sum = sp.csr_matrix((np.ones(which.size), (which, np.arange(which.size))),
                                 shape=(pairs.shape[0], which.size))
    else:
        pairs, pair_sum = np.zeros((0, 2), dtype=np.int64), sp.csr_matrix((0, 0))
    return BlockLayout(order, groups, v_parts, k_parts, to_blocks, block_starts, pairs.astype(np.int64),
                       pair_sites, pair_sum)


# ---------------------------------------------------------------------------------------------
# Components in classes: V_b⁻¹ = I − Z_b M_b Z_b', one M per (voxel, class) of identical Z_b'Z_b

@dataclass(frozen=True)
class ComponentClass:
    """Components of V with one level structure and one Z_b'Z_b: they share M = D_b (I + G D_b)⁻¹."""

    group: int  # index into ComponentClasses.d_maps: components with this sequence of factors
    columns: slice  # its members' Z columns in class order (members × q, member-major)
    G: np.ndarray  # (q, q) Z_b'Z_b of every member
    K: np.ndarray  # (q², p(p+1)/2) Σ_members Xl_b[i]' Xl_b[j], upper (p, r) entries, (i, j) row-major


@dataclass(frozen=True)
class ComponentClasses:
    """What ``prepare`` needs of the design when sign blocks hold whole components of V: the
    components (families) grouped into classes, Z and Z_b'X_b in class order, and the sums of an
    image quantity over each sign block."""

    Z: sp.csr_matrix  # (n, Q) Z with its columns in class order
    Zt: sp.csr_matrix  # (Q, n) its transpose
    Xl: np.ndarray  # (Q, p) Z'X in class order: Z_b'X_b of each component
    XtX: np.ndarray  # (p, p)
    d_maps: list  # per group: (Σ_k q_k², q²) 0/1, vec D_b = D entries @ d_map
    classes: list  # ComponentClass, in class order
    image_sum: sp.csr_matrix  # (n_blocks, n) 0/1: sums an image quantity over each sign block


def component_classes(X: np.ndarray, factors: list[RandomFactor], components: np.ndarray, blocks: np.ndarray
                      ) -> ComponentClasses:
    """The classes of V's components (the design's share of ``prepare``, once for every voxel chunk).

    A component's levels are put in a canonical order (by factor, then by their own Z_l'Z_l), so that
    e.g. families of subjects with 1 and 3 visits match whichever subject comes first; components
    with the same factor sequence form a group, and within it `LevelClasses` (the fit's rule of
    identical Gram blocks) makes the classes.  Sign blocks must hold whole components.
    """
    n, p = X.shape
    codes = [f.codes()[1] for f in factors]
    Zparts, level_factor, level_col, level_key, level_comp = [], [], [], [], []
    col0 = 0
    for k, (f, c) in enumerate(zip(factors, codes)):
        L = int(c.max()) + 1
        level_comp.append(components[np.unique(c, return_index=True)[1]])  # the component of a level's first image
        rows = np.repeat(np.arange(n), f.q)
        Zparts.append(sp.csr_matrix((f.design.reshape(-1), (rows, (c[:, None] * f.q + np.arange(f.q)).reshape(-1))),
                                    shape=(n, L * f.q)))
        own = diag_blocks(sp.csr_matrix(Zparts[-1].T @ Zparts[-1]), L, f.q).reshape(L, -1)
        level_key.append(np.unique(own, axis=0, return_inverse=True)[1].reshape(-1))
        level_factor.append(np.full(L, k))
        level_col.append(col0 + np.arange(L) * f.q)
        col0 += L * f.q
    Z = sp.csc_matrix(sp.hstack(Zparts))
    level_factor, level_col, level_key, level_comp = map(np.concatenate, (level_factor, level_col, level_key,
                                                                           level_comp))
    order = np.lexsort((level_key, level_factor, level_comp))  # component, then factor, then own block
    comp_start = np.searchsorted(level_comp[order], np.arange(int(components.max()) + 1))
    comp_stop = np.append(comp_start[1:], order.size)
    by_shape: dict = {}
    for b in range(comp_start.size):
        lv = order[comp_start[b]:comp_stop[b]]
        by_shape.setdefault(tuple(level_factor[lv]), []).append(lv)
    qk = [f.q for f in factors]
    d_off = np.concatenate([[0], np.cumsum([q * q for q in qk])])
    iu, ju = np.triu_indices(p)
    d_maps, classes, perm_parts = [], [], []
    col = 0
    for g, (shape, levels) in enumerate(by_shape.items()):
        lv = np.stack(levels)  # (N, m) each component's levels in canonical order
        starts = np.concatenate([[0], np.cumsum([qk[k] for k in shape])])
        q = int(starts[-1])
        cols = np.concatenate([level_col[lv[:, j]][:, None] + np.arange(qk[k]) for j, k in enumerate(shape)], axis=1)
        Zg = Z[:, cols.reshape(-1)]
        G = diag_blocks(sp.csr_matrix(Zg.T @ Zg), lv.shape[0], q)
        Xl = np.asarray(Zg.T @ X).reshape(-1, q, p)
        d_map = np.zeros((int(d_off[-1]), q * q))
        for j, k in enumerate(shape):
            for a in range(qk[k]):
                for b in range(qk[k]):
                    d_map[d_off[k] + a * qk[k] + b, (starts[j] + a) * q + starts[j] + b] = 1.0
        d_maps.append(d_map)
        found = LevelClasses.from_blocks(G, p, min_members=1)  # every class aggregated: all are "big"
        for members in found.big_members:
            Xm = Xl[members]
            K = np.einsum("mir,mjs->ijrs", Xm, Xm)[:, :, iu, ju].reshape(q * q, iu.size)
            classes.append(ComponentClass(g, slice(col, col + members.size * q), G[members[0]], K))
            perm_parts.append(cols[members].reshape(-1))
            col += members.size * q
    perm = np.concatenate(perm_parts)
    Zt = sp.csr_matrix(Z[:, perm].T)
    Xl = np.asarray(Zt @ X)
    image_sum = sp.csr_matrix((np.ones(n), (blocks, np.arange(n))), shape=(int(blocks.max()) + 1, n))
    return ComponentClasses(sp.csr_matrix(Z[:, perm]), Zt, Xl, X.T @ X, d_maps, classes, image_sum)


def prepare(
    Y: np.ndarray,
    X: np.ndarray,
    factors: list[RandomFactor],
    fit: FitResult,
    contrasts: list[Contrast],
    voxels: np.ndarray | None = None,
    blocks: np.ndarray | None = None,
    df: list[np.ndarray] | None = None,
    sigma2: str = DEFAULT_SIGMA2,
    two_sided: bool = False,
    allow_split_blocks: bool = False,
    voxel_chunk: int = 64,
    gemm_dtype: str = "float64",
    threads: int | None = None,
    max_block_images: int = MAX_COMPONENT,
    weights: str = DEFAULT_WEIGHTS,
    variance: str = DEFAULT_VARIANCE,
) -> ResamplingPrep:
    """Prepare the restricted wild bootstrap of every contrast at ``voxels`` (default: the fitted ones).

    Y (n, V) complete data (no NaN at the prepared voxels), X (n, p), the fit's factors in its
    order, ``blocks`` the sign block of each image (default: ``independent_blocks(factors)``),
    ``df`` each contrast's Satterthwaite df over the fit's voxels (default: from ``infer``).
    ``allow_split_blocks`` permits blocks that split a component of V (the negative control only).
    ``gemm_dtype="float32"`` stores the contributions in single precision: the sign GEMM runs ~2x
    faster in half the memory, and T* and F* carry ~1e-7 relative error (the signs are exact).
    ``threads`` share the voxel chunks (default: the CPUs this process may use, blmm.host), each with a one-thread BLAS.
    ``max_block_images`` bounds the images of one component of V (V_b⁻¹ is dense per voxel).
    ``weights``: each block's weight in a resample (``WEIGHTS``; docs/corrected.md says which and why).
    ``variance``: V of each contrast's statistic, observed and resampled alike: "null" (default) the D of
    the model under the contrast's null, fitted here as the fit was (``null_models_D``), "fit" the fit's D.
    """
    if sigma2 not in SIGMA2_MODES:
        raise ValueError(f"sigma2 {sigma2!r}: expected one of {', '.join(SIGMA2_MODES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if variance not in VARIANCES:
        raise ValueError(f"variance {variance!r}: expected one of {', '.join(VARIANCES)}")
    if gemm_dtype not in PRECISIONS:
        raise ValueError(f"gemm_dtype {gemm_dtype!r}: expected one of {', '.join(PRECISIONS)}")
    Y = np.asarray(Y, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    if Y.shape[0] != n:
        raise ValueError(f"Y has {Y.shape[0]} rows but X has {n}")
    if voxels is None:
        voxels = np.flatnonzero(fit.status == FITTED)
    voxels = np.asarray(voxels, dtype=np.int64)
    if np.isnan(Y[:, voxels]).any():
        raise ValueError("resampling needs complete data at every prepared voxel (a NaN was found); "
                         "voxels with missing images are not supported yet")
    names = [f.name for f in factors]
    if fit.factor_names and list(fit.factor_names) != names:
        raise ValueError(f"factors {names} are not the fit's ({list(fit.factor_names)}), in the same order")
    components = independent_blocks(factors)
    largest = int(np.bincount(components).max())
    if largest > max_block_images:
        raise ValueError(f"the random factors ({', '.join(names)}) link {largest} images into one independent "
                         f"block (at most {max_block_images} expected): a factor crossing the others (e.g. a site) "
                         "leaves too few blocks to flip; resample without it")
    blocks = components if blocks is None else first_appearance_codes(np.asarray(blocks))
    if blocks.shape != (n,):
        raise ValueError(f"blocks: expected one block label per image ({n}), got shape {blocks.shape}")
    split = check_blocks(blocks, components)
    if split.size and not allow_split_blocks:
        raise ValueError(f"blocks split {split.size} independent component(s) of the random factors' levels "
                         "(e.g. subjects of one family in different blocks): flipping inside them is invalid")
    if df is None:
        inf = infer(fit, contrasts, two_sided)
        by_name = {r.name: r.df for r in inf.t + inf.f}
        df = [by_name[c.name] for c in contrasts]
    dof = float(n - p) if fit.reml else float(n)
    per_block_ss = weights != "rademacher"
    positions = np.array_split(np.arange(voxels.size), max(1, -(-voxels.size // voxel_chunk)))
    by_class = None if split.size else component_classes(X, factors, components, blocks)
    if by_class is not None and len(by_class.classes) > MAX_CLASSES_PER_COMPONENT * (int(components.max()) + 1):
        by_class = None
    layout = block_layout(X, factors, components, blocks) if by_class is None else None
    pairs = np.zeros((0, 2), dtype=np.int64) if layout is None else layout.pairs
    X_ordered = None if layout is None else X[layout.order]
    # contrasts sharing one V, prepared together: all at the fit's D, or each at its null model's
    if variance == "fit":
        groups = [(list(contrasts), [D[voxels] for D in fit.D])]
    else:
        groups = [([c], D0) for c, D0 in zip(contrasts, null_models_D(Y, X, factors, fit, contrasts, voxels, threads))]
    sigma2_parts, contribution_parts, info = [], [], []
    for group, D_group in groups:
        parts = [None] * len(positions)
        if layout is not None:  # blocks inside components (the negative control), or classes of one or two families

            def run(j: int) -> None:
                pos = positions[j]
                parts[j] = _prepare_chunk(Y[:, voxels[pos]][layout.order], X_ordered, [D[pos] for D in D_group],
                                          group, layout, dof, sigma2, per_block_ss)
        else:

            def run(j: int) -> None:
                pos = positions[j]
                parts[j] = _prepare_chunk_by_class(Y[:, voxels[pos]], X, [D[pos] for D in D_group], group,
                                                   by_class, dof, sigma2, per_block_ss)

        # many small products: one BLAS thread each (more only spin), voxel chunks shared by our threads
        with threadpool_limits(limits=1, user_api="blas"):
            run_blocks(run, list(range(len(positions))), thread_count(threads))
        sigma2_parts.append(np.concatenate([pt[0] for pt in parts]))
        contribution_parts.append(np.concatenate([pt[1].astype(gemm_dtype, copy=False) for pt in parts], axis=1))
        info.extend([[pt[2][j] for pt in parts] for j in range(len(group))])
    sigma2_hat = sigma2_parts[0] if variance == "fit" else np.asarray(fit.sigma2, dtype=np.float64)[voxels]
    contributions = np.concatenate(contribution_parts, axis=2)
    prepared, col = [], 0
    for j, (c, chunks_info) in enumerate(zip(contrasts, info)):
        ndf, k = chunks_info[0]["ndf"], chunks_info[0]["k"]
        prepared.append(ContrastResampling(
            c.name, c.is_t, ndf, slice(col, col + k),
            np.concatenate([ci["resid_ss"] for ci in chunks_info]),
            np.asarray(df[j], dtype=np.float64)[voxels],
            np.concatenate([ci["pair_ss"] for ci in chunks_info], axis=1) if pairs.size else None,
            np.concatenate([ci["block_ss"] for ci in chunks_info], axis=1) if chunks_info[0]["block_ss"] is not None
            else None))
        col += k
    return ResamplingPrep(voxels, int(blocks.max()) + 1, dof, sigma2_hat, sigma2, two_sided, prepared, contributions,
                          pairs, weights)


def null_models_D(Y: np.ndarray, X: np.ndarray, factors: list[RandomFactor], fit: FitResult,
                  contrasts: list[Contrast], voxels: np.ndarray, threads: int | None = None) -> list[list[np.ndarray]]:
    """Per contrast, per factor (v, q, q): D of the model under the contrast's null (β = Nγ, N spanning
    L's null space) at ``voxels``, fitted as the fit was (REML or ML, its method, in its fitting basis);
    the fit's D where that fit stopped short of FITTED, and everywhere when the null model has no fixed
    effect left (L of rank p) or there is no voxel to fit.

    The full model's sufficient statistics are formed once (the fit's centre rule) and each null model's
    follow by the map N (`SufficientStats.restricted`); scoring starts at the fit's D̂ (near D̂₀: the
    null drops a few columns of X), cold where the fit's D is not finite.  Contrasts whose L span the
    same rows share one null model and its fit.
    """
    fallback = [D[voxels] for D in fit.D]
    if voxels.size == 0:
        return [fallback for _ in contrasts]
    basis = fitting_basis(X, factors)  # the fit's: the same X and factors give the same basis
    X_fit, factors_fit = basis.fitting_X(X), basis.fitting_factors(factors)
    p = X.shape[1]
    stats = None
    warm = None  # D̃ = diag(s) D diag(s), made PSD: a stored D may hold a rounding-level negative eigenvalue
    if all(np.all(np.isfinite(D)) for D in fallback):
        warm = [la_sym(la.project_psd(la_sym(D * np.outer(s, s)[None]))) for D, s in zip(fallback, basis.scales)]
    out: list[list[np.ndarray]] = []
    fitted: list[tuple[np.ndarray, list[np.ndarray]]] = []  # (projector on L's rows, its null model's D)
    for c in contrasts:
        _, S, Wt = np.linalg.svd(np.atleast_2d(c.matrix) @ basis.T)  # L β = L T β̃ in the fitting basis
        rank = int(np.sum(S > 1e-8 * S[0]))
        if rank == p:
            out.append(fallback)
            continue
        rows = Wt[:rank].T @ Wt[:rank]
        # the same null space to float64's rounding of an orthonormal SVD basis
        same = [D0 for P, D0 in fitted if np.max(np.abs(P - rows)) < 1e-10]
        if same:
            out.append(same[0])
            continue
        if stats is None:  # one pass over the data for every contrast
            Yv = Y[:, voxels]
            stats = sufficient_stats(Yv, X_fit, factors_fit, FactorLayout.from_factors(factors_fit),
                                     centre=centre_of(Yv, X_fit, threads), threads=threads)
        null = fit_stats(stats.restricted(Wt[rank:].T), reml=fit.reml, method=fit.method, tol=NULL_FIT_TOL,
                         threads=threads, start=warm, inference=False)  # only D̂₀ is used
        kept = null.status == FITTED
        D0 = [np.where(kept[:, None, None], D0k / np.outer(s, s)[None], Dk)
              for D0k, Dk, s in zip(null.D, fallback, basis.scales)]
        fitted.append((rows, D0))
        out.append(D0)
    return out


def small_inverse(V: np.ndarray) -> np.ndarray:
    """Inverses of a stack of (…, n_b, n_b) positive definite matrices; closed form (the adjugate) for
    n_b ≤ 3, where most components are (numpy's stacked inverse costs ~0.3 µs per matrix)."""
    nb = V.shape[-1]
    if nb == 1:
        return 1.0 / V
    if nb > 3:
        return np.linalg.inv(V)
    adj = np.empty_like(V)
    if nb == 2:
        adj[..., 0, 0], adj[..., 1, 1] = V[..., 1, 1], V[..., 0, 0]
        adj[..., 0, 1], adj[..., 1, 0] = -V[..., 0, 1], -V[..., 1, 0]
    else:
        for i in range(3):
            for j in range(3):
                r, c = [k for k in range(3) if k != j], [k for k in range(3) if k != i]
                minor = V[..., r[0], c[0]] * V[..., r[1], c[1]] - V[..., r[0], c[1]] * V[..., r[1], c[0]]
                adj[..., i, j] = minor if (i + j) % 2 == 0 else -minor
    det = np.einsum("...j,...j->...", V[..., 0, :], adj[..., :, 0])
    return adj / det[..., None, None]


def _prepare_chunk(Y, X, D, contrasts, layout: BlockLayout, dof: float, sigma2: str, per_block_ss: bool):
    """σ̂², the (n_blocks, v, Σk) contributions and per contrast ẽ'V⁻¹ẽ at v voxels (and per block if
    ``per_block_ss``); Y and X in group order."""
    v = Y.shape[1]
    n, p = X.shape
    d_entries = np.concatenate([Dk.reshape(v, -1) for Dk in D], axis=1)  # D entries in v_parts' order
    inverses, K_packed = [], np.zeros((v, p * (p + 1) // 2))
    for rows, v_part, k_part in zip(layout.groups, layout.v_parts, layout.k_parts):
        N, nb = rows.shape
        V = (d_entries @ v_part).reshape(v, N, nb, nb)
        V += np.eye(nb)
        Vinv = small_inverse(V)
        inverses.append(Vinv)
        K_packed += Vinv.reshape(v, -1) @ k_part  # X'V⁻¹X as one GEMM over the group's entries of V⁻¹
    K = np.zeros((v, p, p))
    iu, ju = np.triu_indices(p)
    K[:, iu, ju] = K_packed
    K[:, ju, iu] = K_packed

    def v_inverse(E):  # (v, n) -> V⁻¹E blockwise, in group order
        out = np.empty_like(E)
        for rows, Vinv in zip(layout.groups, inverses):
            N, nb = rows.shape
            sl = slice(rows[0, 0], rows[0, 0] + N * nb)
            out[:, sl] = np.einsum("vnij,vnj->vni", Vinv, E[:, sl].reshape(v, N, nb)).reshape(v, -1)
        return out

    Yt = np.ascontiguousarray(Y.T)
    Vy = v_inverse(Yt)
    R, beta, gamma, sigma2_hat = gls_at_fixed_v(K, Vy @ X, np.einsum("vn,vn->v", Yt, Vy), dof)
    Xt_blocks = np.ascontiguousarray(X[layout.to_blocks].T)  # (p, n) images in block order
    VX = None
    if layout.pairs.size:  # (v, p, n) (V⁻¹X)' in block order, only when blocks split components
        VX = np.empty((v, n, p))
        for rows, Vinv in zip(layout.groups, inverses):
            N, nb = rows.shape
            sl = slice(rows[0, 0], rows[0, 0] + N * nb)
            VX[:, sl] = np.einsum("vnij,njp->vnip", Vinv, X[sl].reshape(N, nb, p)).reshape(v, N * nb, p)
        VX = np.ascontiguousarray(VX[:, layout.to_blocks].transpose(0, 2, 1))
    contribution_parts, info = [], []
    for c in contrasts:
        ndf, k, beta_null, rot = contrast_frame(c, R, beta, gamma, sigma2)
        e = Yt - beta_null @ X.T  # (v, n) residuals of the GLS under Lβ = 0, V fixed
        Ve = v_inverse(e)
        if VX is None:  # whole components per block: g_c = X_c'V_c⁻¹ẽ_c
            per_image = (rot @ Xt_blocks) * Ve[:, layout.to_blocks][:, None, :]  # (v, k, n)
        else:  # blocks inside components: g_c = Σ_{i ∈ c} (V⁻¹X)_i ẽ_i
            per_image = (rot @ VX) * e[:, layout.to_blocks][:, None, :]
        contribution_parts.append(np.add.reduceat(per_image, layout.block_starts, axis=2).transpose(2, 0, 1))
        pair_ss = None
        if layout.pairs.size:
            vals = []
            for rows, Vinv, (comp, a, bb) in zip(layout.groups, inverses, layout.pair_sites):
                eg = e[:, rows]  # (v, N, nb)
                vals.append(eg[:, comp, a] * Vinv[:, comp, a, bb] * eg[:, comp, bb])
            pair_ss = layout.pair_sum @ np.concatenate(vals, axis=1).T
        block_ss = None
        if per_block_ss:
            block_ss = np.add.reduceat((e * Ve)[:, layout.to_blocks], layout.block_starts, axis=1).T
            if pair_ss is not None:  # those sums hold the cross terms with the component's other blocks
                np.subtract.at(block_ss, layout.pairs[:, 0], pair_ss)
                np.subtract.at(block_ss, layout.pairs[:, 1], pair_ss)
        info.append({"ndf": ndf, "k": k, "resid_ss": np.einsum("vn,vn->v", e, Ve), "pair_ss": pair_ss,
                     "block_ss": block_ss})
    return sigma2_hat, np.concatenate(contribution_parts, axis=2), info


def _prepare_chunk_by_class(Y, X, D, contrasts, cc: ComponentClasses, dof: float, sigma2: str,
                            per_block_ss: bool):
    """``_prepare_chunk``'s results when sign blocks hold whole components, by Woodbury per class:
    V_b⁻¹ = I − Z_b M Z_b' with M = D_b (I + G D_b)⁻¹ once per (voxel, class), so
    X'V⁻¹X = X'X − Σ_classes Σ_ij M_ij K_ij (one small GEMM) and V⁻¹ẽ = ẽ − Z M Z'ẽ (sparse
    products)."""
    v = Y.shape[1]
    n, p = X.shape
    iu, ju = np.triu_indices(p)
    d_entries = np.concatenate([Dk.reshape(v, -1) for Dk in D], axis=1)
    D_blocks = []
    for d_map in cc.d_maps:
        q = int(round(np.sqrt(d_map.shape[1])))
        D_blocks.append((d_entries @ d_map).reshape(v, q, q))
    K_packed = np.repeat(cc.XtX[iu, ju][None], v, axis=0)
    Ms = []
    for cl in cc.classes:
        Db = D_blocks[cl.group]
        q = cl.G.shape[0]
        M = la_sym(np.linalg.solve(np.eye(q) + Db @ cl.G, Db))  # (I + D G)⁻¹ D = D (I + G D)⁻¹, symmetric
        K_packed -= M.reshape(v, q * q) @ cl.K
        Ms.append(M)
    K = np.zeros((v, p, p))
    K[:, iu, ju] = K_packed
    K[:, ju, iu] = K_packed

    def m_times(E):  # (Q, v) vectors on Z's columns -> M of each component applied to its own
        out = np.empty_like(E)
        for cl, M in zip(cc.classes, Ms):
            q = M.shape[-1]
            Ec = E[cl.columns].reshape(-1, q, v)
            Oc = out[cl.columns].reshape(-1, q, v)
            for a in range(q):
                Oc[:, a] = sum(M[:, a, b] * Ec[:, b] for b in range(q))
        return out

    # Woodbury's y'y − y'Z M Z'y cancels y's mean: work on y − Xβ₀ (β₀ by OLS; any β₀ is exact)
    beta0 = np.linalg.solve(cc.XtX, X.T @ Y)  # (p, v)
    Y0 = Y - X @ beta0  # (n, v): images by voxels throughout, so that block sums are sparse products
    yz = cc.Zt @ Y0  # (Q, v) Z'(y − Xβ₀)
    u = m_times(yz)
    XtVy = (X.T @ Y0 - cc.Xl.T @ u).T
    yVy = np.einsum("nv,nv->v", Y0, Y0) - np.einsum("jv,jv->v", yz, u)
    R, beta, _, sigma2_hat = gls_at_fixed_v(K, XtVy, yVy, dof)
    beta = beta0.T + beta
    gamma = np.linalg.solve(R, beta[..., None])[..., 0]
    contribution_parts, info = [], []
    for c in contrasts:
        ndf, k, beta_null, rot = contrast_frame(c, R, beta, gamma, sigma2)
        shift = (beta_null - beta0.T).T  # (p, v)
        e = Y0 - X @ shift  # (n, v) residuals of the GLS under Lβ = 0, V fixed
        Ve = e - cc.Z @ m_times(cc.Zt @ e)  # V⁻¹ẽ = ẽ − Z M Z'ẽ, component by component
        # a_b = rot X_b'V_b⁻¹ẽ_b: (n_blocks, v, k), images summed per sign block by a sparse product
        per_image = (X @ rot.reshape(v * k, p).T).reshape(n, v, k) * Ve[:, :, None]
        contribution_parts.append((cc.image_sum @ per_image.reshape(n, v * k)).reshape(-1, v, k))
        block_ss = cc.image_sum @ (e * Ve) if per_block_ss else None  # ẽ_b'V_b⁻¹ẽ_b
        resid_ss = np.einsum("nv,nv->v", e, Ve)
        info.append({"ndf": ndf, "k": k, "resid_ss": resid_ss, "pair_ss": None, "block_ss": block_ss})
    return sigma2_hat, np.concatenate(contribution_parts, axis=2), info


def gls_at_fixed_v(XtVX: np.ndarray, XtVy: np.ndarray, yVy: np.ndarray, dof: float):
    """(R with C = (X'V⁻¹X)⁻¹ = RR', β̂, whitened β̂ = R⁻¹β̂, σ̂²) per voxel from the GLS products."""
    R = np.linalg.cholesky(np.linalg.inv(la_sym(XtVX)))
    beta = (R @ (np.swapaxes(R, 1, 2) @ XtVy[..., None]))[..., 0]
    sigma2_hat = (yVy - np.einsum("vp,vp->v", XtVy, beta)) / dof
    gamma = np.linalg.solve(R, beta[..., None])[..., 0]
    return R, beta, gamma, sigma2_hat


def contrast_frame(c: Contrast, R: np.ndarray, beta: np.ndarray, gamma: np.ndarray, sigma2: str):
    """(ndf, k, β̃ the GLS estimate under Lβ = 0, rot (v, k, p) with a_c = rot g_c) of one contrast.

    With L R = U S W', the first ndf rows of W' span the contrast in whitened coordinates; a T's
    first coordinate takes the sign of Lβ̂ (T = a₁ / σ̂).  k = ndf with σ² held, p with σ² refitted.
    """
    p = R.shape[-1]
    U, S, Wt = np.linalg.svd(c.matrix @ R, full_matrices=True)
    ndf = int(np.max(np.sum(S > 1e-8 * S[:, :1], axis=1)))
    if c.is_t:
        Wt[:, 0] *= U[:, 0, 0, None]
    Wr = Wt[:, :ndf]
    delta = (R @ (np.swapaxes(Wr, 1, 2) @ (Wr @ gamma[..., None])))[..., 0]
    k = p if sigma2 == "refit" else ndf
    return ndf, k, beta - delta, Wt[:, :k] @ np.swapaxes(R, 1, 2)


# ---------------------------------------------------------------------------------------------
# Resampling a chunk of signs

def resampled_statistics(prep: ResamplingPrep, signs: np.ndarray) -> list[np.ndarray]:
    """Each contrast's resampled T or F, (R, v), for the sign rows ``signs`` (R, n_blocks), in the
    namespace of the prepared contributions (``linalg.move`` a prep to a device once): the sign GEMM
    and the elementwise T*, F*, σ̂*² (the signs, drawn on the host, move with each call)."""
    xp = la.namespace(prep.contributions)
    signs = xp.astype(la.from_host(xp, signs, la.device_of(prep.contributions)), prep.contributions.dtype)
    R = signs.shape[0]
    nblk, v, cols = prep.contributions.shape
    a_all = signs @ xp.reshape(prep.contributions, (nblk, v * cols))  # the one GEMM
    a_all = xp.astype(xp.reshape(a_all, (R, v, cols)), xp.float64)
    signs64 = xp.astype(signs, xp.float64)
    if prep.block_pairs.size:
        cross = (xp.take(signs64, la.from_host(xp, prep.block_pairs[:, 0], la.device_of(signs64)), axis=1)
                 * xp.take(signs64, la.from_host(xp, prep.block_pairs[:, 1], la.device_of(signs64)), axis=1))
    out = []
    for c in prep.contrasts:
        a = a_all[..., c.columns]
        num = a[..., 0] if c.is_t else xp.sum(a[..., :c.ndf] * a[..., :c.ndf], axis=-1)
        # (w∘ẽ)'V⁻¹(w∘ẽ) = Σ_c w_c² ẽ_c'V_c⁻¹ẽ_c: ẽ'V⁻¹ẽ itself when every w_c² = 1 (Rademacher); less the share
        # of the resample's fit: all p coordinates (σ² refitted) or the contrast's ndf (fixed: docs/corrected.md)
        kept = c.resid_ss[None, :] if c.block_ss is None else (signs64 * signs64) @ c.block_ss
        ss = kept - xp.sum(a * a, axis=-1)
        if c.pair_ss is not None:  # added to ẽ'V⁻¹ẽ: (w_c w_c' − 1); to the per-block sums: w_c w_c'
            ss = ss + 2.0 * ((cross - 1.0 if c.block_ss is None else cross) @ c.pair_ss)
        s2 = ss / prep.dof
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(num / xp.sqrt(s2) if c.is_t else num / (c.ndf * s2))
    return out


def statistic_maps(prep: ResamplingPrep, stats: list[np.ndarray], statistic: str = "mlog10p",
                   contrasts: list[ContrastResampling] | None = None, signed: bool = False) -> list[np.ndarray]:
    """The maps the maxima are taken over: −log10 p (with each voxel's Satterthwaite df) or T / F.

    T is one-sided (upper tail) unless the prep is two-sided, then |T| or its two-sided −log10 p;
    ``signed`` gives those two-sided maps T's sign, so that clusters and TFCE can be formed on each
    sign apart (their maximum statistic is then over the absolute value).
    ``contrasts``: the prep's contrasts that ``stats`` belong to (default: all, in order).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    out = []
    for c, s in zip(prep.contrasts if contrasts is None else contrasts, stats):
        if statistic == "t":
            m = np.abs(s) if (c.is_t and prep.two_sided) else s
        elif c.is_t:
            m = t_mlog10p(s, np.broadcast_to(c.df, s.shape), prep.two_sided)
        else:
            m = f_mlog10p(s, c.ndf, np.broadcast_to(c.df, s.shape))
        out.append(np.copysign(m, s) if (signed and c.is_t and prep.two_sided) else m)
    return out


def mlog10p_at_least(prep: ResamplingPrep, stats: list[np.ndarray], threshold: float,
                     signed: bool = False) -> list[np.ndarray]:
    """``statistic_maps``' −log10 p where it is at least ``threshold``, NaN elsewhere (cluster-forming
    maps); ``signed`` as in ``statistic_maps``: two-sided T maps carry T's sign.

    T maps evaluate p only where T reaches the voxel's T quantile for that p (scipy's stdtr per
    voxel is the cost of whole maps); the margin covers stdtrit's rounding, as in ``max_t_mlog10p``.
    """
    out = []
    for c, s in zip(prep.contrasts, stats):
        if c.is_t:
            stat = np.abs(s) if prep.two_sided else s
            with np.errstate(invalid="ignore"):
                quantile = -special.stdtrit(c.df, 10.0 ** -threshold / (2.0 if prep.two_sided else 1.0))
                rows, cols = np.nonzero(stat >= quantile - 1e-9 * np.abs(quantile))  # NaN compares False
            m = np.full(s.shape, np.nan)
            m[rows, cols] = t_mlog10p(s[rows, cols], c.df[cols], prep.two_sided)
        else:
            m = f_mlog10p(s, c.ndf, np.broadcast_to(c.df, s.shape))
        with np.errstate(invalid="ignore"):
            m = np.where(m >= threshold, m, np.nan)
        out.append(np.copysign(m, s) if (signed and c.is_t and prep.two_sided) else m)
    return out


def resampled_stats(prep: ResamplingPrep, seed: int, start: int, stop: int) -> list[np.ndarray]:
    """Resamples start … stop − 1 (0: the identity): every contrast's T* or F*, (R, v).

    The products run on whole batches of GEMM_BATCH resamples aligned to multiples of it, so
    a resample's value never depends on the chunk it was asked in: a BLAS product's rounding
    depends on the shape it is called with.  Chunks that are multiples of GEMM_BATCH waste nothing.
    """
    first, last = start // GEMM_BATCH * GEMM_BATCH, -(-stop // GEMM_BATCH) * GEMM_BATCH
    parts = [resampled_statistics(prep, resample_signs(seed, b, b + GEMM_BATCH, prep.n_blocks, prep.weights))
             for b in range(first, last, GEMM_BATCH)]
    xp = la.namespace(prep.contributions)
    return [xp.concat([pt[j] for pt in parts])[start - first:stop - first, ...]
            for j in range(len(prep.contrasts))]


def resampled_maps(prep: ResamplingPrep, seed: int, start: int, stop: int, statistic: str = "mlog10p",
                   signed: bool = False) -> list[np.ndarray]:
    """Resamples start … stop − 1 of every contrast as (R, v) maps of the statistic of the maxima
    (two-sided T maps with T's sign if ``signed``)."""
    return statistic_maps(prep, resampled_stats(prep, seed, start, stop), statistic, signed=signed)


def max_t_mlog10p(t: np.ndarray, df: np.ndarray, two_sided: bool) -> np.ndarray:
    """max over voxels of −log10 p of (R, v) T maps, evaluating p only where the maximum can be.

    For t > 0, −log10 P(T_ν > t) grows with ν, so a voxel can beat the largest T's −log10 p, L, only
    if its T reaches t_L, the T whose −log10 p at the largest df is L.  Equal to the maximum of
    ``t_mlog10p`` over every voxel, at a fraction of its cost (scipy's stdtr per voxel dominates).
    """
    stat = np.abs(t) if two_sided else t
    R = stat.shape[0]
    filled = np.where(np.isnan(stat), -np.inf, stat)
    top = np.argmax(filled, axis=1)
    L = t_mlog10p(stat[np.arange(R), top], df[top], two_sided)
    tail = 10.0 ** -L / (2.0 if two_sided else 1.0)
    with np.errstate(invalid="ignore"):
        t_L = -special.stdtrit(np.nanmax(df), tail)  # upper-tail quantile at the largest df
    t_L = np.where(np.isfinite(t_L) & (tail > 0), t_L, -np.inf)  # no bound where p underflows: all voxels
    rows, cols = np.nonzero(filled >= t_L[:, None] - 1e-9 * np.abs(t_L[:, None]))  # margin for stdtrit's rounding
    out = np.where(np.isnan(L), -np.inf, L)
    np.fmax.at(out, rows, t_mlog10p(stat[rows, cols], df[cols], two_sided))  # NaN voxels ignored, as nanmax
    return np.where(np.isneginf(out), np.nan, out)


def stats_maxima(prep: ResamplingPrep, stats: list[np.ndarray], statistic: str = "mlog10p") -> np.ndarray:
    """(R, n_contrasts) maxima over this prep's voxels of the statistic of each contrast."""
    out = []
    for c, s in zip(prep.contrasts, stats):
        if statistic == "mlog10p" and c.is_t:
            out.append(max_t_mlog10p(s, c.df, prep.two_sided))
        else:
            out.append(max_over_voxels(statistic_maps(prep, [s], statistic, [c])[0]))
    return np.stack(out, axis=1)


def chunk_maxima(prep: ResamplingPrep, seed: int, start: int, stop: int, statistic: str = "mlog10p"
                 ) -> np.ndarray:
    """(R, n_contrasts) maxima over this prep's voxels; voxel chunks combine by ``np.maximum``."""
    return stats_maxima(prep, resampled_stats(prep, seed, start, stop), statistic)


def fwe_mlog10p(observed: np.ndarray, null_maxima: np.ndarray) -> np.ndarray:
    """−log10 of p = #{maxima ≥ observed} / (B + 1); null_maxima holds the identity as entry 0.
    In the inputs' namespace (numpy for lists)."""
    xp = la.namespace_or_numpy(observed, null_maxima)
    m = xp.sort(xp.asarray(null_maxima, dtype=xp.float64))
    obs = xp.asarray(observed, dtype=xp.float64)
    count = m.shape[0] - xp.searchsorted(m, obs, side="left")
    with np.errstate(divide="ignore"):
        # the identity counts: observed ≤ its maximum
        out = 0.0 - xp.log10(xp.astype(xp.maximum(count, 1), xp.float64) / m.shape[0])
    return xp.where(xp.isnan(obs), xp.nan, out)


# ---------------------------------------------------------------------------------------------
# In memory: the whole correction of one fit

@dataclass
class ContrastCorrection:
    name: str
    observed: np.ndarray  # (V,) the statistic of the maxima (resample 0), NaN at voxels not fitted
    null_maxima: dict  # transform name -> (B + 1,) with the identity first
    fwe_mlog10p: np.ndarray  # (V,) −log10 FWE p of the maximum statistic
    fdr_mlog10q: np.ndarray | None  # (V,) −log10 q of the uncorrected −log10 p (BH / BY)
    tail_used: np.ndarray | None = None  # (V,) where the GPD tail replaced the empirical p
    tail_fit: TailFit | None = None


@dataclass
class CorrectedInference:
    contrasts: list  # ContrastCorrection per contrast, in order
    seed: int
    n_resamples: int  # B, beyond the identity
    statistic: str
    sigma2: str
    blocks: np.ndarray  # (n,) sign block of each image
    over_contrasts: np.ndarray | None = None  # (B + 1,) maxima over contrasts (PALM's -corrcon)
    fwe_over_contrasts: list | None = None  # (V,) −log10 FWE p per contrast, against over_contrasts


def corrected_inference(
    Y: np.ndarray,
    X: np.ndarray,
    factors: list[RandomFactor],
    fit: FitResult,
    contrasts: list[Contrast],
    n_resamples: int = 999,
    seed: int = 0,
    blocks: np.ndarray | None = None,
    two_sided: bool = False,
    statistic: str = "mlog10p",
    sigma2: str = DEFAULT_SIGMA2,
    over_contrasts: bool = False,
    tail: bool = False,
    fdr: str | None = "bh",
    transforms: Mapping[str, MapTransform] | None = None,
    resample_chunk: int = 128,
    allow_split_blocks: bool = False,
    gemm_dtype: str = "float64",
    weights: str = DEFAULT_WEIGHTS,
    variance: str = DEFAULT_VARIANCE,
) -> CorrectedInference:
    """FDR and max-statistic FWE of every contrast of a fit, with B resamples beyond the identity.

    ``transforms`` adds named statistics of whole resampled maps (e.g. a TFCE or cluster-mass
    maximum): each maps (R, V) statistic maps, NaN at voxels not fitted, to (R,) values, and its
    null distribution is returned beside "max" under its name.
    """
    inf = infer(fit, contrasts, two_sided)
    by_name = {r.name: r for r in inf.t + inf.f}
    blocks = independent_blocks(factors) if blocks is None else first_appearance_codes(np.asarray(blocks))
    prep = prepare(Y, X, factors, fit, contrasts, blocks=blocks, df=[by_name[c.name].df for c in contrasts],
                   sigma2=sigma2, two_sided=two_sided, allow_split_blocks=allow_split_blocks, gemm_dtype=gemm_dtype,
                   weights=weights, variance=variance)
    named: dict[str, MapTransform] = dict(transforms or {})
    if "max" in named:
        raise ValueError('transforms: "max" is the maximum statistic itself; name the transform otherwise')
    V = fit.n_voxels
    nulls = [{k: [] for k in ["max", *named]} for _ in contrasts]
    observed = [np.full(V, np.nan) for _ in contrasts]
    for start in range(0, n_resamples + 1, resample_chunk):
        stop = min(start + resample_chunk, n_resamples + 1)
        stats = resampled_stats(prep, seed, start, stop)
        maxima = stats_maxima(prep, stats, statistic)
        if start == 0:
            for j, m in enumerate(statistic_maps(prep, [s[:1] for s in stats], statistic)):
                observed[j][prep.voxels] = m[0]
        maps = statistic_maps(prep, stats, statistic) if named else []
        for j, m in enumerate(maps):
            full = np.full((m.shape[0], V), np.nan)
            full[:, prep.voxels] = m
            for k, fn in named.items():
                nulls[j][k].append(np.asarray(fn(full), dtype=np.float64))
        for j in range(len(contrasts)):
            nulls[j]["max"].append(maxima[:, j])
    out = []
    for j, c in enumerate(contrasts):
        maxima = {k: np.concatenate(v) for k, v in nulls[j].items()}
        fwe = fwe_mlog10p(observed[j], maxima["max"])
        used, fitted_tail = None, None
        if tail:
            p, used, fitted_tail = tail_p(observed[j], maxima["max"][1:], 10.0 ** -fwe)
            with np.errstate(divide="ignore"):
                fwe = np.where(np.isnan(observed[j]), np.nan, -np.log10(p))
        q = fdr_mlog10q(by_name[c.name].mlog10p, fdr) if fdr else None
        out.append(ContrastCorrection(c.name, observed[j], maxima, fwe, q, used, fitted_tail))
    result = CorrectedInference(out, seed, n_resamples, statistic, sigma2, blocks)
    if over_contrasts:
        result.over_contrasts = np.max(np.stack([cc.null_maxima["max"] for cc in out]), axis=0)
        result.fwe_over_contrasts = [fwe_mlog10p(cc.observed, result.over_contrasts) for cc in out]
    return result

"""Family-wise error by a restricted wild bootstrap with the variance components held at their fit.

Notation and formulas: docs/corrected.md.  In short, at every voxel V = I + ZDZ' is fixed at the
fitted D, V is block diagonal by the connected components of the random factors' levels, and a
resample y* = Xβ̃ + s∘ẽ (β̃ the GLS estimate under the contrast's null, ẽ = y − Xβ̃, one weight s_c
per independent block: standard normal by default, or Rademacher or Webb signs) gives

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
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fdr import fdr_mlog10q
from blmm.core.blocks import run_blocks, thread_count
from blmm.core.result import FitResult
from blmm.core.status import FITTED
from blmm.core.inference import f_mlog10p, infer, t_mlog10p
from blmm.core.linalg import sym as la_sym
from blmm.core.tail import TailFit, tail_p

STATISTICS = ("mlog10p", "t")  # what the maximum is taken over: −log10 p (Satterthwaite df) or T / F itself
SIGMA2_MODES = ("refit", "fixed")  # σ² re-estimated per resample (exact GLS refit with D fixed) or held
WEIGHTS = ("rademacher", "webb", "normal", "uniform")  # the wild bootstrap's weight per block (docs/corrected.md)
DEFAULT_WEIGHTS = "uniform"  # Rademacher was liberal on the mesh, normal conservative on the ring (docs/corrected.md)
WEBB_POINTS = np.array([-np.sqrt(1.5), -1.0, -np.sqrt(0.5), np.sqrt(0.5), 1.0, np.sqrt(1.5)])  # mean 0, variance 1
UNIFORM_HALF_WIDTH = np.sqrt(3.0)  # uniform on [−√3, √3]: mean 0, variance 1, E w⁴ = 9/5
MAX_COMPONENT = 512  # images in one independent block: V_b⁻¹ is formed densely per voxel
# Resamples per sign GEMM, aligned: the same seed gives bit-identical maxima in any chunking.  128, not 32:
# the contributions are streamed from memory once per GEMM; 4x the rows per pass doubled the FLOPs per CPU s.
GEMM_BATCH = 128
MapTransform = Callable[[np.ndarray], np.ndarray]  # (R, V) resampled statistic maps -> (R,) one value each


def max_over_voxels(maps: np.ndarray) -> np.ndarray:
    """The maximum statistic: (R, V) maps -> (R,), NaN voxels ignored."""
    return np.nanmax(maps, axis=1)


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
    columns: slice  # its k columns of ResamplingPrep.contributions: k = ndf (σ² held) or p (σ² refitted)
    resid_ss: np.ndarray  # (v,) ẽ'V⁻¹ẽ of the restricted residuals
    df: np.ndarray  # (v,) Satterthwaite (denominator) df of the fit, for −log10 p
    pair_ss: np.ndarray | None = None  # (n_pairs, v) ẽ_c'V⁻¹_cc'ẽ_c' of blocks splitting a component
    block_ss: np.ndarray | None = None  # (n_blocks, v) ẽ_c'V_c⁻¹ẽ_c: σ² refitted, weights with s_c² ≠ 1


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


def prepare(
    Y: np.ndarray,
    X: np.ndarray,
    factors: list[RandomFactor],
    fit: FitResult,
    contrasts: list[Contrast],
    voxels: np.ndarray | None = None,
    blocks: np.ndarray | None = None,
    df: list[np.ndarray] | None = None,
    sigma2: str = "refit",
    two_sided: bool = False,
    allow_split_blocks: bool = False,
    voxel_chunk: int = 64,
    gemm_dtype: str = "float64",
    threads: int | None = None,
    max_block_images: int = MAX_COMPONENT,
    weights: str = DEFAULT_WEIGHTS,
) -> ResamplingPrep:
    """Prepare the restricted wild bootstrap of every contrast at ``voxels`` (default: the fitted ones).

    Y (n, V) complete data (no NaN at the prepared voxels), X (n, p), the fit's factors in its
    order, ``blocks`` the sign block of each image (default: ``independent_blocks(factors)``),
    ``df`` each contrast's Satterthwaite df over the fit's voxels (default: from ``infer``).
    ``allow_split_blocks`` permits blocks that split a component of V (the negative control only).
    ``gemm_dtype="float32"`` stores the contributions in single precision: the sign GEMM runs ~2x
    faster in half the memory, and T* and F* carry ~1e-7 relative error (the signs are exact).
    ``threads`` share the voxel chunks (default: the CPU count), each with a one-thread BLAS.
    ``max_block_images`` bounds the images of one component of V (V_b⁻¹ is dense per voxel).
    ``weights``: each block's weight in a resample (``WEIGHTS``; docs/corrected.md says which and why).
    """
    if sigma2 not in SIGMA2_MODES:
        raise ValueError(f"sigma2 {sigma2!r}: expected one of {', '.join(SIGMA2_MODES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
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
    layout = block_layout(X, factors, components, blocks)
    dof = float(n - p) if fit.reml else float(n)
    X_ordered = X[layout.order]
    chunks = np.array_split(voxels, max(1, -(-voxels.size // voxel_chunk)))
    parts: list = [None] * len(chunks)

    def run(j: int) -> None:
        vox = chunks[j]
        parts[j] = _prepare_chunk(Y[:, vox][layout.order], X_ordered, [D[vox] for D in fit.D], contrasts, layout,
                                  dof, sigma2, sigma2 == "refit" and weights != "rademacher")

    # many small products: one BLAS thread each (more only spin), voxel chunks shared by our threads
    with threadpool_limits(limits=1, user_api="blas"):
        run_blocks(run, list(range(len(chunks))), thread_count(threads))
    sigma2_hat = np.concatenate([pt[0] for pt in parts])
    contributions = np.concatenate([pt[1].astype(gemm_dtype, copy=False) for pt in parts], axis=1)
    prepared, col = [], 0
    for j, c in enumerate(contrasts):
        ndf, k = parts[0][2][j]["ndf"], parts[0][2][j]["k"]
        prepared.append(ContrastResampling(
            c.name, c.is_t, ndf, slice(col, col + k),
            np.concatenate([pt[2][j]["resid_ss"] for pt in parts]),
            np.asarray(df[j], dtype=np.float64)[voxels],
            np.concatenate([pt[2][j]["pair_ss"] for pt in parts], axis=1) if layout.pairs.size else None,
            np.concatenate([pt[2][j]["block_ss"] for pt in parts], axis=1) if parts[0][2][j]["block_ss"] is not None
            else None))
        col += k
    return ResamplingPrep(voxels, int(blocks.max()) + 1, dof, sigma2_hat, sigma2, two_sided, prepared, contributions,
                          layout.pairs, weights)


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
    b = Vy @ X  # (v, p) X'V⁻¹y
    yVy = np.einsum("vn,vn->v", Yt, Vy)
    R = np.linalg.cholesky(np.linalg.inv(la_sym(K)))  # C = (X'V⁻¹X)⁻¹ = RR'
    beta = (R @ (np.swapaxes(R, 1, 2) @ b[..., None]))[..., 0]
    sigma2_hat = (yVy - np.einsum("vp,vp->v", b, beta)) / dof
    gamma = np.linalg.solve(R, beta[..., None])[..., 0]  # whitened β̂ = R⁻¹β̂
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
        U, S, Wt = np.linalg.svd(c.matrix @ R, full_matrices=True)  # L R = U S W'
        ndf = int(np.max(np.sum(S > 1e-8 * S[:, :1], axis=1)))
        if c.is_t:
            Wt[:, 0] *= U[:, 0, 0, None]  # first coordinate with the sign of Lβ̂ (T = a₁ / σ̂)
        Wr = Wt[:, :ndf]  # (v, ndf, p) rows spanning the contrast in whitened coordinates
        delta = (R @ (np.swapaxes(Wr, 1, 2) @ (Wr @ gamma[..., None])))[..., 0]
        e = Yt - (beta - delta) @ X.T  # (v, n) residuals of the GLS under Lβ = 0, V fixed
        Ve = v_inverse(e)
        k = p if sigma2 == "refit" else ndf
        rot = Wt[:, :k] @ np.swapaxes(R, 1, 2)  # (v, k, p): a_c = W'R' g_c
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


# ---------------------------------------------------------------------------------------------
# Resampling a chunk of signs

def resampled_statistics(prep: ResamplingPrep, signs: np.ndarray) -> list[np.ndarray]:
    """Each contrast's resampled T or F, (R, v), for the sign rows ``signs`` (R, n_blocks)."""
    signs = np.asarray(signs, dtype=prep.contributions.dtype)
    R = signs.shape[0]
    nblk, v, cols = prep.contributions.shape
    a_all = signs @ prep.contributions.reshape(nblk, v * cols)  # the one GEMM
    a_all = a_all.reshape(R, v, cols).astype(np.float64, copy=False)
    if prep.block_pairs.size:
        cross = np.asarray(signs[:, prep.block_pairs[:, 0]] * signs[:, prep.block_pairs[:, 1]], dtype=np.float64)
    out = []
    for c in prep.contrasts:
        a = a_all[..., c.columns]
        num = a[..., 0] if c.is_t else np.einsum("rvk,rvk->rv", a[..., :c.ndf], a[..., :c.ndf])
        if prep.sigma2_mode == "fixed":
            s2 = np.broadcast_to(prep.sigma2, (R, v))
        else:  # (w∘ẽ)'V⁻¹(w∘ẽ) = Σ_c w_c² ẽ_c'V_c⁻¹ẽ_c: ẽ'V⁻¹ẽ itself when every w_c² = 1 (Rademacher)
            kept = c.resid_ss[None, :] if c.block_ss is None else np.square(signs, dtype=np.float64) @ c.block_ss
            ss = kept - np.einsum("rvk,rvk->rv", a, a)
            if c.pair_ss is not None:  # added to ẽ'V⁻¹ẽ: (w_c w_c' − 1); to the per-block sums: w_c w_c'
                ss = ss + 2.0 * ((cross - 1.0 if c.block_ss is None else cross) @ c.pair_ss)
            s2 = ss / prep.dof
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(num / np.sqrt(s2) if c.is_t else num / (c.ndf * s2))
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
    return [np.concatenate([pt[j] for pt in parts])[start - first:stop - first] for j in range(len(prep.contrasts))]


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
    """−log10 of p = #{maxima ≥ observed} / (B + 1); null_maxima holds the identity as entry 0."""
    m = np.sort(np.asarray(null_maxima, dtype=np.float64))
    obs = np.asarray(observed, dtype=np.float64)
    count = m.size - np.searchsorted(m, obs, side="left")
    with np.errstate(divide="ignore"):
        out = 0.0 - np.log10(np.maximum(count, 1) / m.size)  # the identity counts: observed ≤ its maximum
    return np.where(np.isnan(obs), np.nan, out)


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
    sigma2: str = "refit",
    over_contrasts: bool = False,
    tail: bool = False,
    fdr: str | None = "bh",
    transforms: Mapping[str, MapTransform] | None = None,
    resample_chunk: int = 128,
    allow_split_blocks: bool = False,
    gemm_dtype: str = "float64",
    weights: str = DEFAULT_WEIGHTS,
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
                   weights=weights)
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

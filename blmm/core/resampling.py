"""Family-wise error by a restricted wild bootstrap with the variance components held at their fit.

Notation and formulas: docs/corrected.md.  In short, at every voxel V = I + ZDZ' is fixed at the
fitted D, V is block diagonal by the connected components of the random factors' levels, and a
resample y* = Xβ̃ + s∘ẽ (β̃ the GLS estimate under the contrast's null, ẽ = y − Xβ̃, one Rademacher
sign per independent block) gives

    β̂* − β̃ = C Σ_c s_c g_c,   g_c = Σ_{i ∈ c} (V⁻¹X)_i ẽ_i,   C = (X'V⁻¹X)⁻¹,
    r*'V⁻¹r* = ẽ'V⁻¹ẽ − h'Ch,  h = Σ_c s_c g_c   (whole components per block: ẽ'V⁻¹ẽ is sign-free).

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
from scipy.sparse.csgraph import connected_components

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fdr import fdr_mlog10q
from blmm.core.fit import FITTED, FitResult
from blmm.core.inference import f_mlog10p, infer, t_mlog10p
from blmm.core.tail import TailFit, tail_p

STATISTICS = ("mlog10p", "t")  # what the maximum is taken over: −log10 p (Satterthwaite df) or T / F itself
SIGMA2_MODES = ("refit", "fixed")  # σ² re-estimated per resample (exact GLS refit with D fixed) or held
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
        raise ValueError(f"blocks: factors {sorted(set(names) - {f.name for f in chosen})} not among the random factors ({known})")
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


def resample_signs(seed: int, start: int, stop: int, n_blocks: int) -> np.ndarray:
    """Rademacher signs of resamples start … stop − 1, (stop − start, n_blocks), float64.

    Resample 0 is the identity (all +1).  Resample r's signs come from their own stream, keyed by
    (seed, r), so any split of the resamples into chunks or workers gives the same signs.
    """
    out = np.empty((stop - start, n_blocks))
    for i, r in enumerate(range(start, stop)):
        if r == 0:
            out[i] = 1.0
        else:
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(seed, spawn_key=(r,))))
            out[i] = 2.0 * rng.integers(0, 2, size=n_blocks) - 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Preparation: per voxel, the per-block contributions of every contrast

@dataclass
class ContrastResampling:
    """One contrast's prepared pieces at the prepared voxels."""

    name: str
    is_t: bool
    ndf: int  # numerator df (rank of L)
    coef: np.ndarray  # (n_blocks, v, k): rotated per-block contributions a_c; k = ndf (fixed σ²) or p
    resid_ss: np.ndarray  # (v,) ẽ'V⁻¹ẽ of the restricted residuals
    df: np.ndarray  # (v,) Satterthwaite (denominator) df of the fit, for −log10 p
    pair_ss: np.ndarray | None = None  # (n_pairs, v) ẽ_c'V⁻¹_cc'ẽ_c' of blocks splitting a component


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
    block_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (n_pairs, 2)

    @property
    def n_voxels(self) -> int:
        return int(self.voxels.size)


@dataclass(frozen=True)
class ComponentGroups:
    """The images of V's diagonal blocks (components), grouped by component size."""

    rows: list  # per size n_b: (N, n_b) image indices of the N components of that size


def component_groups(components: np.ndarray) -> ComponentGroups:
    order = np.argsort(components, kind="stable")
    sizes = np.bincount(components)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = []
    for nb in np.unique(sizes[sizes > 0]):
        comps = np.flatnonzero(sizes == nb)
        rows.append(order[starts[comps][:, None] + np.arange(nb)[None, :]])
    return ComponentGroups(rows)


def check_blocks(blocks: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Components (of V) that a sign block splits: flipping inside them is invalid (docs/corrected.md)."""
    n_comp = int(components.max()) + 1
    first_block = np.full(n_comp, -1)
    first_block[components] = blocks
    return np.unique(components[first_block[components] != blocks])


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
) -> ResamplingPrep:
    """Prepare the restricted wild bootstrap of every contrast at ``voxels`` (default: the fitted ones).

    Y (n, V) complete data (no NaN at the prepared voxels), X (n, p), the fit's factors in its
    order, ``blocks`` the sign block of each image (default: ``independent_blocks(factors)``),
    ``df`` each contrast's Satterthwaite df over the fit's voxels (default: from ``infer``).
    ``allow_split_blocks`` permits blocks that split a component of V (the negative control only).
    """
    if sigma2 not in SIGMA2_MODES:
        raise ValueError(f"sigma2 {sigma2!r}: expected one of {', '.join(SIGMA2_MODES)}")
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
    components = independent_blocks(factors)
    blocks = components if blocks is None else first_appearance_codes(np.asarray(blocks))
    if blocks.shape != (n,):
        raise ValueError(f"blocks: expected one block label per image ({n}), got shape {blocks.shape}")
    split = check_blocks(blocks, components)
    if split.size and not allow_split_blocks:
        raise ValueError(f"blocks split {split.size} independent component(s) of the random factors' levels "
                         "(e.g. subjects of one family in different blocks): flipping inside them is invalid")
    n_blocks = int(blocks.max()) + 1
    if df is None:
        inf = infer(fit, contrasts, two_sided)
        by_name = {r.name: r.df for r in inf.t + inf.f}
        df = [by_name[c.name] for c in contrasts]
    groups = component_groups(components)
    block_pairs, pair_index = split_pairs(groups, blocks)
    dof = float(n - p) if fit.reml else float(n)
    ind = sp.csr_matrix((np.ones(n), (blocks, np.arange(n))), shape=(n_blocks, n))

    parts = []
    for lo in range(0, voxels.size, voxel_chunk):
        vox = voxels[lo:lo + voxel_chunk]
        parts.append(_prepare_chunk(Y[:, vox], X, factors, [D[vox] for D in fit.D], contrasts,
                                    [d[vox] for d in df], groups, ind, pair_index, dof, sigma2))
    sig = np.concatenate([pt[0] for pt in parts]) if parts else np.zeros(0)
    prepared = []
    for j, c in enumerate(contrasts):
        chunks = [pt[1][j] for pt in parts]
        prepared.append(ContrastResampling(
            c.name, c.is_t, chunks[0]["ndf"] if chunks else c.n_rows,
            np.concatenate([ch["coef"] for ch in chunks], axis=1),
            np.concatenate([ch["resid_ss"] for ch in chunks]),
            np.concatenate([ch["df"] for ch in chunks]),
            np.concatenate([ch["pair_ss"] for ch in chunks], axis=1) if block_pairs.size else None))
    return ResamplingPrep(voxels, n_blocks, dof, sig, sigma2, two_sided, prepared, block_pairs)


@dataclass(frozen=True)
class PairIndex:
    """Image pairs (i, j) in one component but different sign blocks, per component-size group."""

    per_group: list  # per group: (comp, a, b) positions within the group's (N, n_b, n_b) arrays
    to_block_pair: sp.csr_matrix  # (n_block_pairs, n_image_pairs): sums image pairs into block pairs


def split_pairs(groups: ComponentGroups, blocks: np.ndarray) -> tuple[np.ndarray, PairIndex]:
    per_group, cells = [], []
    for rows in groups.rows:
        nb = rows.shape[1]
        a, b = np.triu_indices(nb, k=1)
        ba, bb = blocks[rows[:, a]], blocks[rows[:, b]]
        comp, k = np.nonzero(ba != bb)
        per_group.append((comp, a[k], b[k]))
        cells.append(np.stack([np.minimum(ba, bb)[comp, k], np.maximum(ba, bb)[comp, k]], axis=1))
    cells = np.concatenate(cells) if cells else np.zeros((0, 2), dtype=np.int64)
    if cells.size == 0:
        return np.zeros((0, 2), dtype=np.int64), PairIndex(per_group, sp.csr_matrix((0, 0)))
    pairs, which = np.unique(cells, axis=0, return_inverse=True)
    which = which.reshape(-1)
    to = sp.csr_matrix((np.ones(which.size), (which, np.arange(which.size))), shape=(pairs.shape[0], which.size))
    return pairs.astype(np.int64), PairIndex(per_group, to)


def _v_inverse_products(Y, X, factors, D, groups):
    """(V⁻¹X (v, n, p), V⁻¹Y (v, n), V⁻¹ per group (v, N, n_b, n_b)) with V = I + Σ_k Z_k D_k Z_k'."""
    v = Y.shape[1]
    n, p = X.shape
    codes = [f.codes()[1] for f in factors]
    VinvX = np.empty((v, n, p))
    Vinvy = np.empty((v, n))
    inverses = []
    for rows in groups.rows:
        N, nb = rows.shape
        # V = I + Σ_k Σ_ab D_k[ab] (S_k ∘ z_a z_b'): one product of the D entries with fixed matrices
        mats, coefs = [], []
        for f, code, Dk in zip(factors, codes, D):
            same = code[rows][:, :, None] == code[rows][:, None, :]
            z = f.design[rows]  # (N, nb, q)
            for a in range(f.q):
                for b in range(f.q):
                    mats.append((same * z[:, :, a, None] * z[:, None, :, b]).reshape(-1))
                    coefs.append(Dk[:, a, b])
        V = (np.stack(coefs, axis=1) @ np.stack(mats, axis=0)).reshape(v, N, nb, nb)
        V += np.eye(nb)
        Vinv = np.linalg.inv(V)
        VinvX[:, rows] = Vinv @ X[rows]
        Vinvy[:, rows] = (Vinv @ Y[rows].transpose(2, 0, 1)[..., None])[..., 0]
        inverses.append(Vinv)
    return VinvX, Vinvy, inverses


def _prepare_chunk(Y, X, factors, D, contrasts, df, groups, ind, pair_index, dof, sigma2):
    v = Y.shape[1]
    p = X.shape[1]
    VinvX, Vinvy, inverses = _v_inverse_products(Y, X, factors, D, groups)
    K = X.T @ VinvX  # (v, p, p) X'V⁻¹X
    b = np.einsum("np,vn->vp", X, Vinvy)
    yVy = np.einsum("nv,vn->v", Y, Vinvy)
    R = np.linalg.cholesky(np.linalg.inv(K))  # C = RR'
    beta = np.einsum("vpq,vq->vp", R @ np.swapaxes(R, 1, 2), b)
    sig = (yVy - np.einsum("vp,vp->v", b, beta)) / dof
    gamma = np.linalg.solve(R, beta[..., None])[..., 0]  # whitened β̂ = R⁻¹β̂
    out = []
    for c, dfc in zip(contrasts, df):
        L = c.matrix
        LR = L @ R  # (v, m, p)
        U, S, Wt = np.linalg.svd(LR, full_matrices=True)
        ranks = np.sum(S > 1e-8 * S[:, :1], axis=1)  # infer's eigen-tolerance on LCL' (S²) is looser
        ndf = int(ranks.max())
        if c.is_t:
            Wt[:, 0] *= U[:, 0, 0, None]  # first coordinate with the sign of Lβ̂ (T = a₁ / σ̂)
        Wr = Wt[:, :ndf]  # (v, ndf, p) rows spanning the contrast in whitened coordinates
        delta = np.einsum("vpq,vrq,vr->vp", R, Wr, np.einsum("vrq,vq->vr", Wr, gamma))
        beta_null = beta - delta  # GLS under Lβ = 0, V fixed
        e = Y.T - beta_null @ X.T  # (v, n) restricted residuals
        Ve = Vinvy - np.einsum("vnp,vp->vn", VinvX, beta_null)
        resid_ss = np.einsum("vn,vn->v", e, Ve)
        k = p if sigma2 == "refit" else ndf
        rot = np.einsum("vkq,vpq->vkp", Wt[:, :k], R)  # a = rot · g = W' R' g
        per_image = (VinvX @ np.swapaxes(rot, 1, 2)) * e[..., None]  # (v, n, k)
        coef = (ind @ np.ascontiguousarray(per_image.transpose(1, 0, 2)).reshape(per_image.shape[1], -1))
        pair_ss = None
        if pair_index.to_block_pair.shape[0]:
            vals = []
            for rows, Vinv, (comp, a, bb) in zip(groups.rows, inverses, pair_index.per_group):
                eg = e[:, rows]  # (v, N, nb)
                vals.append(eg[:, comp, a] * Vinv[:, comp, a, bb] * eg[:, comp, bb])
            pair_ss = pair_index.to_block_pair @ np.concatenate(vals, axis=1).T
        out.append({"ndf": ndf, "coef": np.asarray(coef).reshape(-1, v, k), "resid_ss": resid_ss,
                    "df": np.asarray(dfc, dtype=np.float64), "pair_ss": pair_ss})
    return sig, out


# ---------------------------------------------------------------------------------------------
# Resampling a chunk of signs

def resampled_statistics(prep: ResamplingPrep, signs: np.ndarray) -> list[np.ndarray]:
    """Each contrast's resampled T or F, (R, v), for the sign rows ``signs`` (R, n_blocks)."""
    signs = np.asarray(signs, dtype=np.float64)
    R = signs.shape[0]
    if prep.block_pairs.size:
        flips = signs[:, prep.block_pairs[:, 0]] * signs[:, prep.block_pairs[:, 1]] - 1.0  # (R, n_pairs)
    out = []
    for c in prep.contrasts:
        nblk, v, k = c.coef.shape
        a = (signs @ c.coef.reshape(nblk, v * k)).reshape(R, v, k)  # the one GEMM
        num = a[..., 0] if c.is_t else np.einsum("rvk,rvk->rv", a[..., :c.ndf], a[..., :c.ndf])
        if prep.sigma2_mode == "fixed":
            s2 = np.broadcast_to(prep.sigma2, (R, v))
        else:
            ss = c.resid_ss[None, :] - np.einsum("rvk,rvk->rv", a, a)
            if c.pair_ss is not None:
                ss = ss + 2.0 * (flips @ c.pair_ss)
            s2 = ss / prep.dof
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(num / np.sqrt(s2) if c.is_t else num / (c.ndf * s2))
    return out


def statistic_maps(prep: ResamplingPrep, stats: list[np.ndarray], statistic: str = "mlog10p") -> list[np.ndarray]:
    """The maps the maxima are taken over: −log10 p (with each voxel's Satterthwaite df) or T / F.

    T is one-sided (upper tail) unless the prep is two-sided, then |T| or its two-sided −log10 p.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    out = []
    for c, s in zip(prep.contrasts, stats):
        if statistic == "t":
            out.append(np.abs(s) if (c.is_t and prep.two_sided) else s)
        elif c.is_t:
            out.append(t_mlog10p(s, np.broadcast_to(c.df, s.shape), prep.two_sided))
        else:
            out.append(f_mlog10p(s, c.ndf, np.broadcast_to(c.df, s.shape)))
    return out


def resampled_maps(prep: ResamplingPrep, seed: int, start: int, stop: int, statistic: str = "mlog10p"
                   ) -> list[np.ndarray]:
    """Resamples start … stop − 1 (0: the identity) of every contrast, (R, v) statistic maps."""
    signs = resample_signs(seed, start, stop, prep.n_blocks)
    return statistic_maps(prep, resampled_statistics(prep, signs), statistic)


def chunk_maxima(prep: ResamplingPrep, seed: int, start: int, stop: int, statistic: str = "mlog10p"
                 ) -> np.ndarray:
    """(R, n_contrasts) maxima over this prep's voxels; voxel chunks combine by ``np.maximum``."""
    maps = resampled_maps(prep, seed, start, stop, statistic)
    return np.stack([max_over_voxels(m) for m in maps], axis=1)


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
    resample_chunk: int = 100,
    allow_split_blocks: bool = False,
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
                   sigma2=sigma2, two_sided=two_sided, allow_split_blocks=allow_split_blocks)
    named: dict[str, MapTransform] = {"max": max_over_voxels}
    named.update(transforms or {})
    V = fit.n_voxels
    nulls = [{k: [] for k in named} for _ in contrasts]
    observed = [np.full(V, np.nan) for _ in contrasts]
    for start in range(0, n_resamples + 1, resample_chunk):
        stop = min(start + resample_chunk, n_resamples + 1)
        for j, m in enumerate(resampled_maps(prep, seed, start, stop, statistic)):
            full = np.full((m.shape[0], V), np.nan)
            full[:, prep.voxels] = m
            if start == 0:
                observed[j] = full[0].copy()
            for k, fn in named.items():
                nulls[j][k].append(np.asarray(fn(full), dtype=np.float64))
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

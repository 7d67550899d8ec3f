"""Fit every voxel: choose a structure per presence pattern, then score, settle and package blocks.

The stages compose as lme4's modular chain does: sufficient statistics -> an objective
per pattern (core/objective) -> scoring (core/scoring) -> the reported optimum
(core/boundary) -> what inference needs at that point (core/hessian) -> `FitResult`.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from blmm.core import linalg as la
from blmm.core.centre import centre_of, centred_response, flat_voxels, removed_size, restore_beta
from blmm.core.boundary import SettledPoint, boundary_coordinates, free_parameters, settle
from blmm.core.design import RandomFactor, identifiability_problems, unidentifiable_patterns
from blmm.core.design_basis import DesignNote, fitting_basis, full_column_rank
from blmm.core.hessian import variance_hessian
from blmm.core.objective import DenseObjective, LevelObjective, SchurObjective
from blmm.core.objective.nested import NestedObjective, NestedSchurObjective, check_memory, nested_tree
from blmm.core.objective.base import subset_eval, take_rows
from blmm.core.scoring import METHODS, ScoringResult, check_method, score
from blmm.core.status import (  # noqa: F401  (re-exported: the codes' one home is core/status.py)
    CONSTANT_RESPONSE, CONVERGED, DROPPED_FEW, DROPPED_RANK, DROPPED_UNIDENTIFIABLE, FAILED, FITTED, ITERATION_LIMIT,
    NOT_FINITE, NOT_FITTED, STATUS_NAMES, STEP_FAILED, STOP_NAMES,
)
from blmm.core.sufficient import SufficientStats, presence_patterns, sufficient_stats

@dataclass
class FitResult:
    """Per-voxel estimates and everything inference needs."""

    beta: np.ndarray  # (v, p)
    sigma2: np.ndarray  # (v,)
    D: list  # per factor (v, q_k, q_k), relative to σ²
    llh: np.ndarray  # (v,) float64, lme4's logLik
    converged: np.ndarray  # (v,) bool
    n_iter: np.ndarray  # (v,) int
    n_obs: np.ndarray  # (v,) int, images present
    status: np.ndarray  # (v,) int, FITTED or a reason for dropping
    stop: np.ndarray  # (v,) int, why scoring stopped (STOP_NAMES)
    cov_beta: np.ndarray  # (v, p, p)
    cov_beta_grad: np.ndarray  # (v, k, p, p), derivative in φ (docs/model.md)
    hessian: np.ndarray  # (v, k, k), deviance Hessian in φ (identity rows for dropped θ)
    free: np.ndarray  # (v, k) bool: φ entries of factors not on the boundary
    resms: np.ndarray  # (v,) e'e/(n - p) at the GLS β̂
    factor_names: list = field(default_factory=list)
    q: list = field(default_factory=list)
    reml: bool = True
    method: str = "pSFS"

    @property
    def n_voxels(self) -> int:
        return int(self.beta.shape[0])

    @property
    def p(self) -> int:
        return int(self.beta.shape[1])

    @property
    def fitted(self) -> np.ndarray:
        return self.status == FITTED

    @property
    def boundary(self) -> np.ndarray:
        """Voxels where some D_k is singular."""
        return self.fitted & ~np.all(self.free, axis=1)

    def vech_D(self) -> np.ndarray:
        """[vech(D_1), …, vech(D_r)] per voxel (upstream's blmm_vox_D order)."""
        return np.concatenate([la.vech(D) for D in self.D], axis=1)


def fit_lmm(
    Y: np.ndarray,
    X: np.ndarray,
    factors: list[RandomFactor],
    reml: bool = True,
    method: str = "pSFS",
    tol: float = 1e-6,
    max_iter: int = 10000,
    safe_mode: bool = True,
    column_names: list[str] | None = None,
    **options,
) -> FitResult:
    """Fit the linear mixed model Y = Xβ + Zb + ε, b ~ N(0, σ²D), ε ~ N(0, σ²I) at every voxel.

    ``Y`` is (n images, v voxels), NaN where an image is missing at a voxel (each voxel is fitted
    on its own images); ``X`` is (n, p); ``factors`` are the random factors making up Z, one
    ``RandomFactor`` each (lme4's ``(1 + time | subject)`` is one factor with two columns).
    ``reml`` (default) or ML; ``method`` is the Fisher-scoring variant (FS, pFS, SFS, pSFS);
    ``tol`` the log-likelihood change that stops it.  Returns a ``FitResult``: ``beta`` (v, p),
    ``sigma2`` (v,), ``D`` (per factor (v, q_k, q_k), relative to σ²), ``llh`` (lme4's logLik),
    ``converged`` and what ``infer`` needs.  Images from files: ``blmm.load_images``; a model
    as a formula over a table: ``blmm.fit_formula``.

    Example, a random intercept and slope of time per subject::

        import numpy as np, blmm
        X = np.column_stack([np.ones(n), age, time])
        subject = blmm.RandomFactor("subject", subject_ids, np.column_stack([np.ones(n), time]),
                                    columns=("(Intercept)", "time"))
        fit = blmm.fit_lmm(Y, X, [subject])
        fit.beta[:, 2], fit.sigma2 * fit.D[0][:, 1, 1]   # time's effect, its random-slope variance
    

    The fit runs in the fitting basis (core/design_basis.py), decided once before any fitting:
    a rank-deficient X or random-effects design is refused (DesignError naming the columns, by
    ``column_names`` where given), very different column scales give a DesignNote warning, and the
    result is restored to the units of X and the factors' designs as given.

    ``safe_mode``: refuse a design lme4 refuses by default (ValueError naming the factor and the
    counts: core.design.identifiability_problems), and drop the voxels whose rows present fail
    the same checks (status DROPPED_UNIDENTIFIABLE).  On by default, as lme4 and the command line;
    ``safe_mode=False`` fits such designs (the fit is well defined while n > p + 1 and X has full rank).
    """
    if safe_mode:
        problems = identifiability_problems(factors)
        if problems:
            raise ValueError("; ".join(problem.message() for problem in problems)
                             + "; pass safe_mode=False to fit it anyway, or use a simpler term")
    basis = fitting_basis(X, factors, column_names)
    for note in basis.notes:
        warnings.warn(note, DesignNote, stacklevel=2)
    res = basis.restore(_fit_in_basis(Y, basis.fitting_X(X), basis.fitting_factors(factors), reml, method, tol,
                                      max_iter, **options))
    observed = ~np.isnan(np.asarray(Y, dtype=np.float64).reshape(len(X), -1)) if safe_mode else None
    if observed is not None and not observed.all():
        patterns, pattern_of_voxel = presence_patterns(observed)
        drop = unidentifiable_patterns(patterns, factors)[pattern_of_voxel] & (res.status == FITTED)
        res.status[drop] = DROPPED_UNIDENTIFIABLE
        _blank_unfitted(res)
        res.stop[drop] = NOT_FITTED
    return res


def _fit_in_basis(Y, X, factors, reml, method, tol, max_iter, **options) -> FitResult:
    """fit_lmm's fit on designs already in the fitting basis: the sums are formed from Y with a
    per-voxel centre taken out, put back into β after the fit (`blmm.core.centre`, docs/model.md
    "The centre")."""
    centre = centre_of(Y, X)
    Y = centred_response(Y, X, centre)
    stats = _stats_from_data(Y, X, factors, options.get("structure", "auto"))
    stats.centre = centre
    return fit_stats(stats, reml=reml, method=method, tol=tol, max_iter=max_iter, **options)


def _stats_from_data(Y: np.ndarray, X: np.ndarray, factors: list[RandomFactor], structure: str):
    """The sufficient statistics `fit_lmm` fits: missing rows per voxel where its structure allows."""
    if len(factors) == 1 and structure in ("auto", "levels") and np.isnan(Y).any():
        from blmm.core.missing_rows import missing_row_stats_from_data  # voxel-specific rows (issue 11)
        return missing_row_stats_from_data(Y, X, factors[0])
    if len(factors) > 1 and structure in ("auto", "nested") and np.isnan(Y).any():
        from blmm.core.sufficient import FactorLayout
        layout = FactorLayout.from_factors(factors)
        if choose_structure(layout, structure)[0] == "nested":  # one nesting tree, rows per voxel (issue 11)
            from blmm.core.nested_missing_rows import nested_missing_row_stats_from_data
            return nested_missing_row_stats_from_data(Y, X, factors, layout=layout)
    return sufficient_stats(Y, X, factors)


def fit_stats(
    stats: SufficientStats,
    reml: bool = True,
    method: str = "pSFS",
    tol: float = 1e-6,
    max_iter: int = 10000,
    structure: str = "auto",
    max_block_bytes: int = 512 * 2**20,
    threads: int | None = None,
) -> FitResult:
    """Fit every voxel from its sufficient statistics (`fit_centred_stats`), then put the centre
    the sums were formed without (``stats.centre``) back into β."""
    res = fit_centred_stats(stats, reml=reml, method=method, tol=tol, max_iter=max_iter, structure=structure,
                            max_block_bytes=max_block_bytes, threads=threads)
    restore_beta(res.beta, getattr(stats, "centre", None))
    return res


def fit_centred_stats(
    stats: SufficientStats,
    reml: bool = True,
    method: str = "pSFS",
    tol: float = 1e-6,
    max_iter: int = 10000,
    structure: str = "auto",
    max_block_bytes: int = 512 * 2**20,
    threads: int | None = None,
) -> FitResult:
    """Fit every voxel from its sufficient statistics; β is that of the response the sums were
    formed from (`fit_stats` puts ``stats.centre`` back).

    structure: "levels" (one factor, grouped levels), "schur" (several factors: the one with
    most levels, or a nesting tree, eliminated level by level, the rest dense), "dense" (any
    factors: a dense q x q system per voxel), "nested" (factors nested in one tree, e.g.
    subjects in families: eliminated by the outer level's blocks, docs/model.md) or "auto"
    (levels for one factor, nested for one nesting tree, else schur unless the remaining
    factors have more than 2,000 columns).  A structure whose dense part does not fit one
    voxel in max_block_bytes is refused (ValueError) before any fitting.
    `MissingRowStats` (one factor) and `NestedMissingRowStats` (one nesting tree) are fitted
    with voxel-specific missing rows, without per-pattern objectives (docs/model.md).
    max_block_bytes bounds the working memory of all voxel blocks in flight and the presence
    patterns' objectives held meanwhile (patterns are fitted in rounds); `threads` (default: the
    CPU count) fit blocks concurrently.
    """
    method = check_method(method)
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    from blmm.core.missing_rows import MissingRowStats, fit_missing_rows
    if isinstance(stats, MissingRowStats):  # one factor, missing rows per voxel (issue 11)
        if structure not in ("auto", "levels"):
            raise ValueError(f"missing-row statistics fit with the 'levels' structure, not {structure!r}")
        return fit_missing_rows(stats, reml=reml, method=method, tol=tol, max_iter=max_iter,
                                max_block_bytes=max_block_bytes, threads=threads)
    from blmm.core.nested_missing_rows import NestedMissingRowStats, fit_nested_missing_rows
    if isinstance(stats, NestedMissingRowStats):  # a nesting tree, missing rows per voxel (issue 11)
        structure, tree = choose_structure(stats.layout, structure)
        if structure != "nested":
            raise ValueError(f"nested missing-row statistics fit with the 'nested' structure, not {structure!r}")
        return fit_nested_missing_rows(stats, reml=reml, method=method, tol=tol, max_iter=max_iter,
                                       max_block_bytes=max_block_bytes, threads=threads, tree=tree)
    layout = stats.layout
    structure, tree = choose_structure(layout, structure)
    v, p = stats.n_voxels, stats.p
    qk = list(layout.q)
    k = 1 + sum(q * (q + 1) // 2 for q in qk)
    check_memory(structure, layout, p, max_block_bytes, tree)  # refuse before any work, with numbers
    res = _empty_result(v, p, qk, k, list(layout.names), reml, method)
    res.n_obs[:] = stats.voxel_n_obs()
    threads = thread_count(threads)

    def run(job) -> None:
        obj, n, XtX, idx = job
        data = obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx])
        out = _fit_block(obj, data, qk, method, tol, int(max_iter), reml, n, p)
        _store(res, idx, out)  # blocks write disjoint rows
        eTe = (stats.YtY[idx] - 2 * np.einsum("vp,vp->v", out.beta, stats.XtY[idx])
               + np.einsum("vp,pq,vq->v", out.beta, XtX, out.beta))
        res.resms[idx] = eTe / (n - p)

    # patterns are fitted in rounds: a round's objectives hold at most half of max_block_bytes and
    # its voxel blocks' working memory the other half (many patterns: many rounds, never all at once)
    several = np.unique(stats.pattern_of_voxel).size > 1
    round_budget = max_block_bytes // 2 if several else 0  # one pattern: one objective, as before
    block_budget = max_block_bytes - round_budget
    jobs: list = []
    held = 0
    for u in range(stats.patterns.shape[0]):  # loop over missingness patterns, not voxels
        vox = np.flatnonzero(stats.pattern_of_voxel == u)
        if vox.size == 0:
            continue
        n = int(stats.n_obs[u])
        XtX = stats.XtX[u]
        if n <= p:
            res.status[vox] = DROPPED_FEW
            continue
        if not full_column_rank(XtX[None])[0]:
            res.status[vox] = DROPPED_RANK
            continue
        vox = drop_flat_voxels(res, vox, XtX, stats.XtY[vox], stats.YtY[vox], n, removed_size(stats.centre, vox))
        if vox.size == 0:
            continue
        obj, per_voxel = _pattern_objective(structure, tree, stats, u, n, reml)
        size = held_bytes(obj)
        if jobs and held + size > round_budget:
            run_blocks(run, jobs, threads)
            jobs, held = [], 0
        held += size
        per_voxel += 8 * (k + 6) * p * p  # the packaged inference quantities
        # voxel blocks bound the memory; threads share the blocks (numpy releases the GIL)
        block = max(1, int(block_budget // max(per_voxel, 1) // max(threads, 1)))
        if threads > 1:
            block = min(block, max(64, -(-vox.size // (2 * threads))))  # enough blocks to share
        jobs.extend((obj, n, XtX, vox[start:start + block]) for start in range(0, vox.size, block))
        del obj
    run_blocks(run, jobs, threads)
    _blank_unfitted(res)
    return res


def drop_flat_voxels(res: FitResult, idx: np.ndarray, XtX: np.ndarray, XtY: np.ndarray, YtY: np.ndarray,
                     n_obs: int, removed: np.ndarray | float) -> np.ndarray:
    """Marks voxels idx with nothing to fit (`flat_voxels`) CONSTANT_RESPONSE; returns the rest."""
    flat = flat_voxels(XtX, XtY, YtY, n_obs, removed)
    res.status[idx[flat]] = CONSTANT_RESPONSE
    return idx[~flat]


def screen_voxels(res: FitResult, idx: np.ndarray, XtX: np.ndarray, XtY: np.ndarray, YtY: np.ndarray,
                  n_obs: np.ndarray, centre) -> np.ndarray:
    """Voxels idx with their own rows (XtX per voxel): marks those whose X is rank deficient there
    DROPPED_RANK and those with nothing to fit (`flat_voxels`) CONSTANT_RESPONSE; the rest's mask."""
    full = full_column_rank(XtX)  # the rank rule of core/design_basis.py, unit-free
    flat = np.zeros_like(full)  # nothing to fit: a constant or exactly linear response
    flat[full] = flat_voxels(XtX[full], XtY[full], YtY[full], n_obs[full], removed_size(centre, idx[full]))
    res.status[idx[~full]] = DROPPED_RANK
    res.status[idx[flat]] = CONSTANT_RESPONSE
    return full & ~flat


def thread_count(threads: int | None) -> int:
    """Threads that fit voxel blocks: the CPU count unless given."""
    return (os.cpu_count() or 1) if threads is None else max(1, int(threads))


def held_bytes(obj, depth: int = 3) -> int:
    """Bytes of the arrays an object holds (its attributes, lists and sub-objects, a few levels deep)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if sp.issparse(obj):
        return int(sum(getattr(obj, name).nbytes for name in ("data", "indices", "indptr", "row", "col")
                       if hasattr(obj, name)))
    if depth == 0:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(item, depth - 1) for item in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(item, depth - 1) for item in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(held_bytes(item, depth - 1) for item in vars(obj).values())
    return 0


def run_blocks(run, jobs: list, threads: int) -> None:
    """``run(job)`` for every voxel block, on ``threads`` threads (numpy releases the GIL)."""
    if threads > 1 and len(jobs) > 1:
        # our threads share the cores: a multi-threaded BLAS under each would oversubscribe them
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(run, jobs))
    else:
        for job in jobs:
            run(job)


STRUCTURES = ("auto", "levels", "nested", "schur", "dense")


def choose_structure(layout, structure: str = "auto") -> tuple[str, tuple | None]:
    """The structure to fit with, and the nesting tree it eliminates (None if none)."""
    n_factors = len(layout.q)
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; expected {', '.join(STRUCTURES)}")
    tree = nested_tree(layout) if structure in ("auto", "nested", "schur") else None
    if structure == "auto" and tree is not None and len(tree) == n_factors:
        structure = "nested"  # every factor nests in one tree: eliminate by its outer level
    if structure == "auto":
        small_columns = layout.n_columns - max(l * q for l, q in zip(layout.n_levels, layout.q))
        if tree is not None:  # the nesting tree is eliminated; the other factors stay dense
            small_columns = layout.n_columns - sum(layout.n_levels[f] * layout.q[f] for f in tree)
        structure = "levels" if n_factors == 1 else ("schur" if small_columns <= 2000 else "dense")
    if structure == "nested" and (tree is None or len(tree) != n_factors):
        raise ValueError("the 'nested' structure needs every random factor nested in one tree "
                         "(e.g. subjects within families)")
    if structure == "levels" and n_factors != 1:
        raise ValueError("the 'levels' structure needs exactly one random factor")
    if structure == "schur" and n_factors < 2:
        raise ValueError("the 'schur' structure needs two or more random factors")
    return structure, tree


def _pattern_objective(structure: str, tree, stats: SufficientStats, u: int, n: int, reml: bool):
    """The objective of presence pattern u, and its working bytes per voxel."""
    layout, p = stats.layout, stats.p
    XtX, ZtX, ZtZ = stats.XtX[u], stats.ZtX[u], stats.ZtZ[u]
    if structure == "levels":
        obj = LevelObjective(XtX, ZtX, ZtZ, n, layout.q[0], reml)
        return obj, 8 * (16 * obj.C * obj.q ** 2 + obj.Cb * len(obj.pairs) * (p + 1))
    if structure == "nested":
        obj = NestedObjective(XtX, ZtX, ZtZ, n, layout, reml, tree)
        return obj, obj.per_voxel_bytes()
    if structure == "schur" and tree is not None and len(tree) < len(layout.q):  # nesting tree + dense rest
        obj = NestedSchurObjective(XtX, ZtX, ZtZ, n, layout, reml, tree)
        return obj, obj.per_voxel_bytes()
    if structure == "schur":
        obj = SchurObjective(XtX, ZtX, ZtZ, n, layout, reml)
        lv, pu = obj.level, p + obj.qR
        return obj, 8 * (12 * lv.C * lv.q ** 2 + lv.Cb * len(lv.pairs) * (pu + 1) + 12 * pu * pu + 8 * obj.qR ** 2)
    obj = DenseObjective(XtX, ZtX, ZtZ, n, layout, reml)
    return obj, 8 * 10 * obj.qtot ** 2


def _empty_result(v, p, qk, k, names, reml, method) -> FitResult:
    return FitResult(
        beta=np.full((v, p), np.nan), sigma2=np.full(v, np.nan),
        D=[np.full((v, q, q), np.nan) for q in qk], llh=np.full(v, np.nan),
        converged=np.zeros(v, bool), n_iter=np.zeros(v, np.int64), n_obs=np.zeros(v, np.int64),
        status=np.full(v, FITTED, np.int64), stop=np.full(v, NOT_FITTED, np.int64), cov_beta=np.full((v, p, p), np.nan),
        cov_beta_grad=np.full((v, k, p, p), np.nan), hessian=np.full((v, k, k), np.nan),
        free=np.zeros((v, k), bool), resms=np.full(v, np.nan), factor_names=names, q=qk,
        reml=reml, method=method,
    )


def _store(res: FitResult, idx, out: "BlockFit") -> None:
    res.beta[idx] = out.beta
    res.sigma2[idx] = out.sigma2
    for f, D in enumerate(out.D):
        res.D[f][idx] = D
    res.llh[idx] = out.llh
    res.converged[idx] = out.converged
    res.n_iter[idx] = out.n_iter
    res.stop[idx] = out.stop
    res.cov_beta[idx] = out.cov_beta
    res.cov_beta_grad[idx] = out.cov_beta_grad
    res.hessian[idx] = out.hessian
    res.free[idx] = out.free
    res.status[idx] = np.where(out.ok, FITTED, FAILED)


def _blank_unfitted(res: FitResult) -> None:
    bad = res.status != FITTED
    for arr in (res.beta, res.sigma2, res.llh, res.cov_beta, res.cov_beta_grad, res.hessian, res.resms, *res.D):
        arr[bad] = np.nan
    res.converged[bad] = False
    res.stop[res.status == FAILED] = NOT_FINITE
    res.stop[bad & (res.status != FAILED)] = NOT_FITTED  # dropped before fitting


@dataclass
class BlockFit:
    """One voxel block's reported optimum and what inference needs at exactly that point."""

    beta: np.ndarray
    sigma2: np.ndarray
    D: list
    llh: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    stop: np.ndarray
    ok: np.ndarray
    cov_beta: np.ndarray
    cov_beta_grad: np.ndarray
    hessian: np.ndarray
    free: np.ndarray


def _fit_block(obj, data, qk, method, tol, max_iter, reml, n, p) -> BlockFit:
    """Score one voxel block, settle the optimum (boundary snap, Newton polish), then package it."""
    scored = score(obj, data, qk, method, tol, max_iter, reml, n, p)
    point = settle(obj, data, scored.D, qk, reml, n, p)
    return _package(obj, data, point, scored, qk, reml, n, p)


def _package(obj, data, point: SettledPoint, scored: ScoringResult, qk, reml, n, p) -> BlockFit:
    """Inference quantities at exactly the reported point: Cov(β̂), its derivatives and the Hessian."""
    D, ev, H, dC = point.D, point.ev, point.H, point.dC
    if np.any(point.moved):  # the polish moved these voxels: their Hessian is recomputed there
        rows = np.flatnonzero(point.moved)
        H_r, dC_r = variance_hessian(obj, take_rows(data, rows, D[0].shape[0]), [Dk[rows] for Dk in D],
                                      subset_eval(ev, rows), qk, reml, n, p)
        H, dC = H.copy(), dC.copy()
        H[rows], dC[rows] = H_r, dC_r
    free = free_parameters(D, qk)
    H_phi, dC_phi, _ = boundary_coordinates(H, dC, ev.grad, D, qk, free)
    finite = ev.ok & np.isfinite(ev.llh) & np.isfinite(ev.sigma2)
    return BlockFit(
        beta=ev.beta, sigma2=ev.sigma2, D=D, llh=ev.llh, converged=scored.converged & finite,
        n_iter=scored.n_iter, stop=np.where(finite, scored.stop, NOT_FINITE), ok=scored.ok & finite,
        cov_beta=ev.sigma2[:, None, None] * ev.C, cov_beta_grad=dC_phi, hessian=H_phi, free=free,
    )

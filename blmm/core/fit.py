"""Fit every voxel: plan the structure once (core/structure.py), then fit its voxel blocks (core/blocks.py).

The stages compose as lme4's modular chain does: sufficient statistics -> an objective
per pattern (core/objective) -> scoring (core/scoring) -> the reported optimum
(core/boundary) -> what inference needs at that point (core/hessian) -> `FitResult`.
"""
from __future__ import annotations

import warnings

import numpy as np

from blmm.core.blocks import Scheduler, fit_missing_rows
from blmm.core.centre import centre_of, restore_beta
from blmm.core.design import RandomFactor, identifiability_problems, unidentifiable_patterns
from blmm.core.design_basis import DesignNote, fitting_basis
from blmm.core.missing_rows import MissingRowCounts
from blmm.core.result import FitResult
from blmm.core.row_block_sums import complete_level_stats
from blmm.core.schur_sums import complete_schur_stats
from blmm.core.scoring import check_method
from blmm.core.status import DROPPED_FEW, DROPPED_UNIDENTIFIABLE, FITTED, NOT_FITTED
from blmm.core.structure import FitPlan, plan_fit
from blmm.core.sufficient import FactorLayout, SufficientStats, presence_patterns, sufficient_stats


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
    if safe_mode and has_nan(Y):  # complete data (the common case) make no (n, v) boolean copy
        observed = ~np.isnan(np.asarray(Y).reshape(len(X), -1))  # no float64 copy of Y
        patterns, pattern_of_voxel = presence_patterns(observed)
        drop = unidentifiable_patterns(patterns, factors)[pattern_of_voxel] & (res.status == FITTED)
        res.status[drop] = DROPPED_UNIDENTIFIABLE
        res.blank_unfitted()
        res.stop[drop] = NOT_FITTED
    return res


def has_nan(Y: np.ndarray) -> bool:
    """Whether Y holds a NaN, in one pass without an (n, v) boolean copy: np.min propagates NaN."""
    Y = np.asarray(Y)
    return Y.size > 0 and bool(np.isnan(np.min(Y)))


def _fit_in_basis(Y, X, factors, reml, method, tol, max_iter, structure="auto", **options) -> FitResult:
    """fit_lmm's fit on designs already in the fitting basis: the sums are formed from Y with a
    per-voxel centre taken out, put back into β after the fit (`blmm.core.centre`, docs/model.md
    "The centre"); voxels differ in their rows where Y has NaNs (the plan's missing-rows path)."""
    centre = centre_of(Y, X, options.get("threads"))
    layout = FactorLayout.from_factors(factors)
    missing = has_nan(Y)
    plan = plan_fit(layout, structure, missing_rows=missing)  # Y - c X w has Y's NaN
    path = plan.missing_rows_path  # either way the sums of the centred Y, without a centred copy of it
    if plan.structure == "levels" and path is None:
        # one factor, complete data: class-aggregated sums by row blocks, fitted as the pipeline fits them
        stats = complete_level_stats(Y, X, factors[0], layout, centre, options.get("threads"))
        if stats is not None:  # None: a NaN that has_nan missed (none do)
            return fit_stats(stats, reml=reml, method=method, tol=tol, max_iter=max_iter,
                             plan=plan_fit(layout, "levels", missing_rows=True), **options)
    if plan.eliminates_one_factor and not missing:
        # crossed factors, complete data: the class sums Schur reads by row blocks of U = [X, Z_R], no Z'Y
        stats = complete_schur_stats(Y, X, factors, centre, options.get("threads"))
        if stats is not None:  # None: a level with G_j = 0 (the class sums hold every level)
            return fit_stats(stats, reml=reml, method=method, tol=tol, max_iter=max_iter, plan=plan, **options)
    stats = None if path is None else path.from_data(Y, X, factors, layout, centre, options.get("threads"))
    if stats is None:  # no missing rows, or a design the path cannot hold: one objective per presence pattern
        plan = plan_fit(layout, structure)
        stats = sufficient_stats(Y, X, factors, layout, centre=centre, threads=options.get("threads"))
    return fit_stats(stats, reml=reml, method=method, tol=tol, max_iter=max_iter, plan=plan, **options)


def fit_stats(
    stats: SufficientStats | MissingRowCounts,
    reml: bool = True,
    method: str = "pSFS",
    tol: float = 1e-6,
    max_iter: int = 10000,
    structure: str = "auto",
    max_block_bytes: int = 512 * 2**20,
    threads: int | None = None,
    plan: FitPlan | None = None,
    start: list[np.ndarray] | None = None,
    inference: bool = True,
) -> FitResult:
    """Fit every voxel from its sufficient statistics, then put the centre the sums were formed
    without (``stats.centre``) back into β.

    ``plan`` (`blmm.core.structure.plan_fit`) says how; by default it is planned from
    ``structure``: "levels" (one factor, grouped levels), "schur" (several factors: the one with
    most levels, or a nesting tree, eliminated level by level, the rest dense), "dense" (any
    factors: a dense q x q system per voxel), "nested" (factors nested in one tree, e.g.
    subjects in families: eliminated by the outer level's blocks, docs/model.md) or "auto"
    (levels for one factor, nested for one nesting tree, else schur unless the remaining
    factors have more than 2,000 columns).  A structure whose dense part does not fit one
    voxel in max_block_bytes is refused (ValueError) before any fitting.
    `MissingRowStats` (one factor) and `NestedMissingRowStats` (one nesting tree) are fitted
    with voxel-specific missing rows, without per-pattern objectives (docs/model.md): the
    plan's missing-rows objective, by the one missing-row driver (`blocks.fit_missing_rows`).
    max_block_bytes bounds the working memory of all voxel blocks in flight and the presence
    patterns' objectives held meanwhile (patterns are fitted in rounds); `threads` (default: the
    CPUs this process may use, blmm.host) fit blocks concurrently (`blmm.core.blocks.Scheduler`).
    ``start``: per factor (v, q_k, q_k) finite PSD D, in the statistics' units, that scoring starts
    from at each voxel (e.g. a nearby model's optimum: `blmm.core.resampling.null_models_D`); default
    D = 0.  It changes the path only: the stopping rule and what is reported at the optimum are the same.
    ``inference=False`` reports the optimum (β, σ², D, llh, labels) where the stopping rule left it,
    snapped to the boundary but not Newton-polished, without what inference needs at it (Cov(β̂), its
    derivatives, the Hessian stay NaN): a model fitted only for its D̂, within the stop tolerance.
    """
    method = check_method(method)
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    own = stats.missing_row_structure  # the structure whose missing-rows objective fits these statistics
    plan = plan_fit(stats.layout, structure, own is not None) if plan is None else plan
    if own is not None and (not plan.missing_rows or plan.structure != own):
        raise ValueError(f"{type(stats).__name__} (missing rows per voxel) fit with the "
                         f"{own!r} structure, not {plan.structure!r}")
    if own is None and plan.missing_rows:
        raise ValueError(f"a plan with missing rows per voxel needs their statistics, not {type(stats).__name__}")
    layout = stats.layout
    p = stats.p
    if start is not None:
        start = check_start(start, stats.n_voxels, layout.q)
    plan.check_memory(p, max_block_bytes)  # refuse before any work, with numbers
    res = FitResult.empty(stats.n_voxels, p, list(layout.q), list(layout.names), reml, method)
    res.n_obs[:] = stats.voxel_n_obs()
    res.status[res.n_obs <= p] = DROPPED_FEW
    scheduler = Scheduler(res, method, tol, max_iter, threads, max_block_bytes, start, inference)
    if plan.missing_rows:  # every voxel against the complete design: the structure's missing-rows objective
        fit_missing_rows(stats.units(plan.objective(stats.XtX, stats.ZtX, stats.ZtZ, stats.n_rows, reml)), scheduler)
    else:
        _fit_patterns(stats, plan, scheduler)
    res.blank_unfitted()
    restore_beta(res.beta, getattr(stats, "centre", None))
    return res


def check_start(start: list, n_voxels: int, q: tuple) -> list[np.ndarray]:
    """fit_stats' start point as float64 arrays, refused (ValueError) unless one finite symmetric
    (v, q_k, q_k) D per factor with non-negative eigenvalues (to rounding)."""
    if len(start) != len(q):
        raise ValueError(f"start: expected one D per random factor ({len(q)}), got {len(start)}")
    out = []
    for k, (Sk, qk) in enumerate(zip(start, q)):
        Sk = np.asarray(Sk, dtype=np.float64)
        if Sk.shape != (n_voxels, qk, qk):
            raise ValueError(f"start: factor {k + 1}'s D has shape {Sk.shape}, expected {(n_voxels, qk, qk)}")
        if not np.all(np.isfinite(Sk)):
            raise ValueError(f"start: factor {k + 1}'s D has non-finite entries")
        if not np.array_equal(Sk, np.swapaxes(Sk, 1, 2)):
            raise ValueError(f"start: factor {k + 1}'s D is not symmetric")
        w = np.linalg.eigvalsh(Sk) if Sk.size else np.zeros((0, qk))
        # rounding of a PSD matrix formed in float64: eigenvalues down to −1e-12 of the largest
        if np.any(w[:, 0] < -1e-12 * np.maximum(np.abs(w[:, -1]), 1e-300)):
            raise ValueError(f"start: factor {k + 1}'s D is not positive semi-definite")
        out.append(Sk)
    return out


def _fit_patterns(stats: SufficientStats, plan: FitPlan, scheduler: Scheduler) -> None:
    """Every presence pattern's voxels with that pattern's objective (the plan's structure)."""
    res, p, reml = scheduler.res, scheduler.p, scheduler.reml

    def run(job) -> None:
        obj, u, n, XtX, idx = job
        scheduler.fit(obj, stats.pattern_data(obj, u, idx), idx, n, XtX, stats.XtY[idx], stats.YtY[idx])

    # patterns are fitted in rounds: a round's objectives hold at most half of max_block_bytes and
    # its voxel blocks' working memory the other half (many patterns: many rounds, never all at once)
    several = np.unique(stats.pattern_of_voxel).size > 1
    round_budget = scheduler.max_block_bytes // 2 if several else 0  # one pattern: one objective, as before
    block_budget = scheduler.max_block_bytes - round_budget
    jobs: list = []
    held = 0
    for u in range(stats.patterns.shape[0]):  # loop over missingness patterns, not voxels
        vox = np.flatnonzero(stats.pattern_of_voxel == u)
        if vox.size == 0:
            continue
        n = int(stats.n_obs[u])
        XtX = stats.XtX[u]
        if n <= p:  # dropped already (DROPPED_FEW)
            continue
        vox = res.screen_pattern(vox, XtX, stats.XtY[vox], stats.YtY[vox], n, stats.centre)
        if vox.size == 0:
            continue
        obj = stats.pattern_objective(plan, u, reml)
        size = obj.held_bytes()
        if jobs and held + size > round_budget:
            scheduler.run(run, jobs)
            jobs, held = [], 0
        held += size
        # voxel blocks bound the memory; threads share the blocks (numpy releases the GIL)
        block = scheduler.block_voxels(scheduler.voxel_bytes(obj), block_budget, vox.size)
        jobs.extend((obj, u, n, XtX, vox[start:start + block]) for start in range(0, vox.size, block))
        del obj
    scheduler.run(run, jobs)

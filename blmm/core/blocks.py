"""The one block scheduler: every path (complete data, missing rows per voxel) fits its voxels here.

A `Scheduler` owns what every path shares: the memory budget per block and per round, the
threads, the "enough blocks to share" rule, fitting one block (score, settle, package) and
storing its rows in the `FitResult`.  A path only says which voxels go together and how a
block's data is formed: core/fit.py for per-pattern objectives; for voxels fitted against the
complete design with their own missing rows, the one driver `fit_missing_rows` here, which asks
each structure's units (`MissingRowUnits`: core/missing_rows.py's `LevelUnits`,
core/nested_missing_rows.py's `FamilyUnits`) only what differs between structures, and fits the
voxels that miss no row with the complete design's own objective, as complete data are fitted.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from blmm.core.boundary import (LLH_NOISE, SettledPoint, boundary_coordinates, free_parameters, settle,
                                snap_to_boundary)
from blmm.core.hessian import variance_hessian
from blmm.core.objective.base import Objective, array_bytes, subset_eval, take_rows
from blmm.core.result import BlockFit, FitResult, residual_mean_square
from blmm.core.scoring import ScoringResult, score
from blmm.core.status import FITTED, NOT_FINITE
from blmm.core.threads import run_blocks, thread_count

MIN_SHARED_BLOCK = 64  # voxels: below this a block's fixed costs outweigh sharing it among threads


def rounds(jobs: list, cost: Callable[[Any], int], budget: int) -> list[list]:
    """Consecutive runs of jobs whose summed cost stays within budget (a costlier job on its own)."""
    out, current, used = [], [], 0
    for job in jobs:
        c = cost(job)
        if current and used + c > budget:
            out.append(current)
            current, used = [], 0
        current.append(job)
        used += c
    if current:
        out.append(current)
    return out


def size_class(k: np.ndarray) -> np.ndarray:
    """0, or the next power of two >= k: the size a count is padded and grouped by, whatever block it is in."""
    k = np.asarray(k, dtype=np.int64)
    return np.where(k > 0, 2 ** np.ceil(np.log2(np.maximum(k, 1))).astype(np.int64), 0)


def inference_bytes(p: int, k: int) -> int:
    """Bytes per voxel of the packaged inference quantities (Cov(β̂), its k derivatives, the Hessian)."""
    return 8 * (k + 6) * p * p


class Scheduler:
    """Blocks of voxels for one `FitResult`: their sizes, threads, fit and storage."""

    def __init__(self, res: FitResult, method: str, tol: float, max_iter: int, threads: int | None,
                 max_block_bytes: int, start: list | None = None, inference: bool = True):
        self.res = res
        self.inference = inference  # False: the optimum only, the inference arrays stay NaN (fit_stats)
        self.start = start  # per factor (v, q_k, q_k) D each of res's voxels starts scoring from; None: D = 0
        self.max_block_bytes = int(max_block_bytes)  # all blocks in flight and what a round holds
        self.method, self.tol, self.max_iter = method, tol, int(max_iter)
        self.threads = thread_count(threads)
        self.qk, self.p, self.reml = list(res.q), res.p, res.reml
        self.k = 1 + sum(q * (q + 1) // 2 for q in self.qk)
        self.held_peak = 0  # most bytes a missing-row round held by the accounting (`fit_missing_rows`)

    def share_cap(self, n_voxels: int) -> int:
        """Voxels per block at most, so that n_voxels make enough blocks to share among the threads."""
        if self.threads > 1:
            return max(MIN_SHARED_BLOCK, -(-int(n_voxels) // (2 * self.threads)))
        return max(int(n_voxels), 1)

    def block_voxels(self, per_voxel: int, budget: int, n_voxels: int, limit: int | None = None) -> int:
        """Voxels per block: each thread's share of budget over per_voxel bytes (at most limit),
        at least one, and small enough that n_voxels make blocks for every thread (`share_cap`)."""
        size = int((budget // self.threads) // max(per_voxel, 1))
        if limit is not None:
            size = min(size, int(limit))
        return min(max(1, size), self.share_cap(n_voxels))

    def voxel_bytes(self, obj: Objective) -> int:
        """Working bytes per voxel of a block fitted with obj: the objective's and the packaged inference's."""
        return obj.per_voxel_bytes() + inference_bytes(self.p, self.k)

    def budget_beside(self, held: int) -> int:
        """Bytes for voxel blocks beside `held` bytes kept through the fit (at least an eighth of the budget)."""
        return max(self.max_block_bytes - int(held), self.max_block_bytes // 8)

    def class_blocks(self, voxels: np.ndarray, sizes: np.ndarray, per_voxel: Callable[[tuple], int], budget: int,
                     limit: Callable[[tuple], int] | None = None) -> list[tuple[np.ndarray, tuple]]:
        """The one grouping rule for voxels fitted with their own missing rows: (block, class) pairs.

        A voxel's class is the powers of two (`size_class`) of its sizes ((v, m) integers: what its
        units' memory grows with, e.g. touched levels and missing rows); voxels are ordered by class
        and each class is cut into blocks sized for its bound: per_voxel(class) bytes in budget, at
        most limit(class) voxels, enough blocks to share (`block_voxels`).  Padding within a block
        stays under 2x, and a block's size does not depend on the other classes.
        """
        classes = size_class(np.asarray(sizes).reshape(np.shape(sizes)[0], -1)[voxels])
        order = np.lexsort(classes.T[::-1])  # by the first size's class, then the next's
        voxels, classes = voxels[order], classes[order]
        cuts = np.flatnonzero(np.any(classes[1:] != classes[:-1], axis=1)) + 1
        out: list = []
        if voxels.size == 0:  # every voxel dropped before the fit
            return out
        for start, stop in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [voxels.size]])):
            key = tuple(int(c) for c in classes[start])
            size = self.block_voxels(per_voxel(key), budget, voxels.size, None if limit is None else limit(key))
            out.extend((voxels[a:min(a + size, stop)], key) for a in range(start, stop, size))
        return out

    def run(self, job: Callable[[Any], None], jobs: list) -> None:
        run_blocks(job, jobs, self.threads)

    def fit(self, obj: Objective, data, idx: np.ndarray, n: int, XtX: np.ndarray, XtY: np.ndarray,
            YtY: np.ndarray) -> None:
        """Fit the voxels idx (their data arranged for obj) and store them, with their e'e/(n - p)
        from X'X (shared or per voxel); n is the objective's row count (data.n where per voxel)."""
        start = None if self.start is None else [Sk[idx] for Sk in self.start]
        out = fit_block(obj, data, self.qk, self.method, self.tol, self.max_iter, self.reml, n, self.p, start,
                        self.inference)
        self.res.store(idx, out)
        self.res.resms[idx] = residual_mean_square(out.beta, XtX, XtY, YtY, self.res.n_obs[idx], self.p)


class MissingRowUnits(Protocol):
    """What `fit_missing_rows` asks of a structure whose objective has the `missing_rows` capability:
    one implementation per structure (`LevelUnits`: one factor; `FamilyUnits`: a nesting tree),
    built by its statistics' ``units(objective)``.

    A voxel that misses no row is fitted with ``objective.base`` (the complete design's objective of
    one presence pattern) on `complete_data`, as complete data are.  Every other voxel's class is the
    powers of two of its `unit_sizes` (`Scheduler.class_blocks`); a block of voxels is prepared (its
    units formed, the voxels screened) into parts, each a dict of arrays with the voxels on the
    leading axis (an ``"XtX"`` entry: X'X_v) and a shape (the parts' padded unit counts); parts of
    one shape are fitted together whatever block they were prepared in.
    """

    objective: Objective  # the complete design's objective (`missing_rows` True; its `base`: without units)
    stats: Any  # the voxels' statistics (`missing_rows.MissingRowCounts`): the complete design's XtX and
    # n_rows, each voxel's XtY, YtY and missing rows (voxel_n_missing), the centre taken out before the sums

    @property
    def nbytes(self) -> int:
        """Bytes of the common design quantities the units draw on (held through the fit)."""

    def unit_sizes(self) -> np.ndarray:
        """(v, m) what each voxel's units grow with (touched levels, missing rows), for its class."""

    def unit_bytes(self, key: tuple) -> int:
        """Working bytes per voxel of preparing and fitting a block of class key, beside the objective's."""

    def prepared_bytes(self, key: tuple) -> int:
        """Bytes per voxel of class key that its prepared parts hold until fitted."""

    def prepare(self, idx: np.ndarray, screen: Callable) -> list[tuple[np.ndarray, dict, tuple]]:
        """(voxels, units, shape) parts of voxels idx, after ``screen(idx, XtX_v, XtY, YtY, n_obs, centre)``
        (`FitResult.screen_voxels`: the mask of voxels to fit) has dropped the others."""

    def fit_bytes(self, shape: tuple) -> int:
        """Working bytes per voxel of fitting a part of this shape, beside the objective's."""

    def block_data(self, idx: np.ndarray, units: dict) -> tuple[Any, np.ndarray, np.ndarray]:
        """(the objective's data, X'Y, Y'Y) of voxels idx with their prepared units (without "XtX")."""

    def complete_data(self, idx: np.ndarray) -> Any:
        """The data of ``objective.base`` (the complete design's objective) for voxels idx, which miss no row."""


def fit_missing_rows(units: MissingRowUnits, scheduler: Scheduler) -> None:
    """Fit every voxel still FITTED in scheduler's result against the complete design with its own
    missing rows (docs/model.md, "Missing rows"), the same way for every structure.

    The voxels that miss no row are fitted first, by the complete design's objective
    (`fit_complete_voxels`).  The others: voxels of one class share a block, sized for the class's
    bound (`Scheduler.class_blocks`), so a voxel's padding stays under 2x and does not depend on
    the other classes.  Blocks are prepared in rounds: half the budget beside the common
    quantities holds a round's prepared parts, the other half the fit blocks' working memory;
    parts of one shape are then fitted together, cut to the block size of their shape.
    `Scheduler.held_peak` records the most bytes held: the common quantities, a round's prepared
    parts and its fit blocks in flight.
    """
    res, obj = scheduler.res, units.objective
    shared = obj.held_bytes() + units.nbytes  # held through the fit, beside the blocks
    budget = scheduler.budget_beside(shared)
    fitted = np.flatnonzero(res.status == FITTED)
    complete = units.stats.voxel_n_missing()[fitted] == 0
    fit_complete_voxels(units, fitted[complete], scheduler, shared)
    base_voxel = scheduler.voxel_bytes(obj)
    round_budget = budget // 2
    block_budget = budget - round_budget
    jobs = scheduler.class_blocks(fitted[~complete], units.unit_sizes(),
                                  lambda key: base_voxel + units.unit_bytes(key), block_budget,
                                  limit=lambda key: round_budget // units.prepared_bytes(key))
    prepared: list = []  # (voxels, units, shape) parts of a round

    def prepare(job) -> None:
        prepared.extend(units.prepare(job[0], res.screen_voxels))  # list.extend is atomic: threads may share it

    def run(job) -> None:
        idx, part = job
        XtX_v = part.pop("XtX")
        data, XtY, YtY = units.block_data(idx, part)
        scheduler.fit(obj, data, idx, obj.n, XtX_v, XtY, YtY)  # data.n per voxel

    for round_jobs in rounds(jobs, lambda job: job[0].size * units.prepared_bytes(job[1]), round_budget):
        scheduler.run(prepare, round_jobs)
        held = shared + sum(array_bytes(part) for _, part, _ in prepared)
        # voxels with the same padded counts are fitted together, whatever block they were prepared
        # in: few distinct shapes, so few (and large) fit blocks
        by_shape: dict[tuple, list] = {}
        for idx, part, shape in prepared:
            by_shape.setdefault(shape, []).append((idx, part))
        prepared.clear()
        n_round = sum(job[0].size for job in round_jobs)
        fit_jobs, in_flight = [], 0
        for shape in sorted(by_shape):
            parts = by_shape.pop(shape)  # the parts go as soon as they are concatenated
            idx = np.concatenate([i for i, _ in parts])
            part = {key: np.concatenate([u[key] for _, u in parts]) for key in parts[0][1]}
            del parts
            per_voxel = base_voxel + units.fit_bytes(shape)
            size = scheduler.block_voxels(per_voxel, block_budget, n_round)
            in_flight = max(in_flight, min(size, idx.size) * per_voxel)
            fit_jobs.extend((idx[a:a + size], {key: arr[a:a + size] for key, arr in part.items()})
                            for a in range(0, idx.size, size))
        scheduler.held_peak = max(scheduler.held_peak, held + min(scheduler.threads, len(fit_jobs)) * in_flight)
        scheduler.run(run, fit_jobs)


def fit_complete_voxels(units: MissingRowUnits, idx: np.ndarray, scheduler: Scheduler, shared: int) -> None:
    """Voxels idx, which miss no row, fitted as complete data are (core/fit.py): the complete
    design's objective (``units.objective.base``) on its own data, one X'X and row count for all,
    in blocks of the whole budget beside the `shared` bytes held (nothing is prepared meanwhile)."""
    if idx.size == 0:
        return
    res, stats, base = scheduler.res, units.stats, units.objective.base
    XtX = stats.XtX
    idx = res.screen_pattern(idx, XtX, stats.XtY[idx], stats.YtY[idx], stats.n_rows, stats.centre)
    if idx.size == 0:
        return
    per_voxel = scheduler.voxel_bytes(base)
    size = scheduler.block_voxels(per_voxel, scheduler.budget_beside(shared), idx.size)
    jobs = [idx[a:a + size] for a in range(0, idx.size, size)]
    scheduler.held_peak = max(scheduler.held_peak, shared + min(scheduler.threads, len(jobs)) * min(size, idx.size)
                              * per_voxel)

    def fit_complete(block) -> None:
        scheduler.fit(base, units.complete_data(block), block, base.n, XtX, stats.XtY[block], stats.YtY[block])

    scheduler.run(fit_complete, jobs)


def fit_block(obj: Objective, data, qk: list, method: str, tol: float, max_iter: int, reml: bool, n: int,
              p: int, start: list | None = None, inference: bool = True) -> BlockFit:
    """Score one voxel block (from ``start``'s D, default 0), snap it to the boundary once, score its
    boundary optima again (`rescore_boundary`), settle the snapped optimum (Newton polish), then package
    it (without ``inference``: the snapped scoring optimum only, no polish, its inference arrays NaN)."""
    scored = score(obj, data, qk, method, tol, max_iter, reml, n, p, start)
    # each voxel's D is snapped once: the snap is not idempotent (docs/model.md, "Convergence")
    scored, D = rescore_boundary(obj, data, qk, method, tol, max_iter, reml, n, p, scored,
                                 snap_to_boundary(obj, data, scored.D))
    if not inference:
        # the polish serves reported parameters and their Hessian; a D-only fit stops at the stop rule's D
        return optimum_only(D, obj.evaluate(D, data, grad=False), scored, qk, p)
    point = settle(obj, data, D, qk, reml, n, p)
    return package(obj, data, point, scored, qk, reml, n, p)


def rescore_boundary(obj: Objective, data, qk: list, method: str, tol: float, max_iter: int, reml: bool,
                     n: int, p: int, scored: ScoringResult, snapped: list) -> tuple[ScoringResult, list]:
    """Score the voxels whose snapped optimum (``snapped``: scored.D after `snap_to_boundary`) is on the
    boundary (some D_k singular) again from lme4's start (every D_k = I, relative to σ²) and keep, per
    voxel, the higher llh (the first unless the second is higher by more than the llh's rounding,
    LLH_NOISE), with the kept scoring's labels.  Returns the kept scoring and its snapped D.

    The likelihood can have a local maximum on the boundary besides an interior one; the D = 0 start
    can fall into the boundary's basin where lme4's falls into the interior's.  Not a global search.
    """
    v = scored.D[0].shape[0]
    rows = np.flatnonzero(~np.all(free_parameters(snapped, qk), axis=1))
    if rows.size == 0:  # every voxel interior: nothing scored again (the common case)
        return scored, snapped
    sub = take_rows(data, rows, v)
    first = obj.evaluate([Dk[rows] for Dk in snapped], sub, grad=False).llh
    identity = [np.broadcast_to(np.eye(q, dtype=scored.D[0].dtype), (rows.size, q, q)) for q in qk]
    again = score(obj, sub, qk, method, tol, max_iter, reml, n, p, identity)
    second_snapped = snap_to_boundary(obj, sub, again.D)
    ev2 = obj.evaluate(second_snapped, sub, grad=False)
    better = np.asarray(ev2.ok) & np.isfinite(ev2.llh) & ~(ev2.llh <= first + LLH_NOISE)
    if not np.any(better):
        return scored, snapped
    kept, take = rows[better], np.flatnonzero(better)
    D = [Dk.copy() for Dk in scored.D]
    for Dk, Ak in zip(D, again.D):
        Dk[kept] = Ak[take]
    snapped = [Sk.copy() for Sk in snapped]
    for Sk, Ak in zip(snapped, second_snapped):
        Sk[kept] = Ak[take]
    out = ScoringResult(D=D, converged=scored.converged.copy(), n_iter=scored.n_iter.copy(),
                        stop=scored.stop.copy(), ok=scored.ok.copy())
    for name in ("converged", "n_iter", "stop", "ok"):
        getattr(out, name)[kept] = getattr(again, name)[take]
    return out, snapped


def optimum_only(D: list, ev, scored: ScoringResult, qk: list, p: int) -> BlockFit:
    """The scored, snapped optimum and its labels as `package` reports them, without the inference
    quantities (NaN): a D-only fit, e.g. a null model's D̂₀."""
    v = D[0].shape[0]
    k = 1 + sum(q * (q + 1) // 2 for q in qk)
    finite = ev.ok & np.isfinite(ev.llh) & np.isfinite(ev.sigma2)
    return BlockFit(
        beta=ev.beta, sigma2=ev.sigma2, D=D, llh=ev.llh, converged=scored.converged & finite,
        n_iter=scored.n_iter, stop=np.where(finite, scored.stop, NOT_FINITE), ok=scored.ok & finite,
        cov_beta=np.full((v, p, p), np.nan), cov_beta_grad=np.full((v, k, p, p), np.nan),
        hessian=np.full((v, k, k), np.nan), free=free_parameters(D, qk),
    )


def package(obj: Objective, data, point: SettledPoint, scored: ScoringResult, qk: list, reml: bool, n: int,
            p: int) -> BlockFit:
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

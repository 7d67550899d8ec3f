"""A run's work, estimated from its plan in seconds on one core: what the engine choice
(``engine.choice``, kind ``auto``) weighs against a dask cluster's start-up.

Rough on purpose: it only has to tell a run of seconds from one of minutes. The constants were
fitted on the reference machine (docs/performance.md: the NIfTI, ABCD design 1 and design 2
benchmarks, each stage timed on one core).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from blmm.config import Config
from blmm.core.design import RandomFactor

#: reading one image file: opening it and parsing its header (a NIfTI header equal to one already
#: parsed: 0.23 ms)
READ_SECONDS_PER_IMAGE = 2.5e-4
#: reading one analysis-mask value of one image and adding it to the partial sums: ABCD design 1's
#: read stage took 3.9 s of CPU for 9,835 x 10,242 values (issue 21; 1.2e-7 before overestimated it 5x)
READ_SECONDS_PER_VALUE = 3.5e-8
#: writing one partial sum of one voxel in one image batch: wide sums (Z'Y of every level with several
#: factors, 9,520 a voxel for the ABCD families) cost ~11 s more per read stage than design 1's 96
READ_SECONDS_PER_SUM = 5e-8
#: fitting and testing one voxel: a fixed part, a part growing with p², and a part per
#: unit of the random factor (a class of levels with identical Z_j'Z_j, or a level of its own)
FIT_SECONDS_PER_VOXEL = 7e-5
FIT_SECONDS_PER_VOXEL_P2 = 1.2e-6
FIT_SECONDS_PER_VOXEL_UNIT_Q2 = 1.6e-6

#: voxel blocks: about this many estimated seconds of fit work each (a task costs ~0.05 s more:
#: dask, reading the block's sums, building Z), at least MIN_BLOCKS of 500+ voxels (workers
#: share a cheap fit), and at most MAX_BLOCK_VOXELS voxels (larger blocks fit no faster per voxel)
FIT_BLOCK_SECONDS = 1.0
MIN_BLOCKS = 8
MAX_BLOCK_VOXELS = 4000


class PlannedRun(Protocol):
    """What the estimate reads of a `pipeline.plan.RunPlan` (plan.py imports this module to size its blocks)."""

    config: Config
    voxels: np.ndarray
    batches: list
    batch_columns: tuple  # per batch, the partial sums per voxel it stores


@dataclass(frozen=True)
class WorkEstimate:
    """Estimated seconds on one core of the read and fit stages."""

    read_seconds: float
    fit_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.read_seconds + self.fit_seconds

    def record(self) -> dict[str, float]:
        return {"read": round(self.read_seconds, 1), "fit": round(self.fit_seconds, 1)}


def estimate_work(plan: PlannedRun) -> WorkEstimate:
    """The read stage: images × analysis voxels and the partial sums written; the fit stage: voxels ×
    the model's cost."""
    config = plan.config
    n, v = config.n, plan.voxels.size
    read = (n * (READ_SECONDS_PER_IMAGE + v * READ_SECONDS_PER_VALUE)
            + v * sum(stored.size for stored in plan.batch_columns) * READ_SECONDS_PER_SUM)
    return WorkEstimate(read, v * fit_seconds_per_voxel(config))


def fit_seconds_per_voxel(config: Config) -> float:
    """Estimated seconds to fit and test one voxel on one core."""
    unit_cost = sum(level_units(f) * f.q ** 2 for f in config.factors)
    return (FIT_SECONDS_PER_VOXEL + FIT_SECONDS_PER_VOXEL_P2 * config.p ** 2
            + FIT_SECONDS_PER_VOXEL_UNIT_Q2 * unit_cost)


def blocks_for_work(config: Config, n_voxels: int) -> int:
    """How many voxel blocks share the fit stage well (plan.py bounds it by maxnvb and memory)."""
    by_work = int(np.ceil(n_voxels * fit_seconds_per_voxel(config) / FIT_BLOCK_SECONDS))
    return max(1, min(MIN_BLOCKS, n_voxels // 500), by_work, -(-n_voxels // MAX_BLOCK_VOXELS))


def level_units(factor: RandomFactor) -> int:
    """How many units the fit sums over per voxel for this factor: each class of levels with
    identical Z_j'Z_j counts once (a random intercept: one per number of visits), a level
    whose Z_j'Z_j is its own (a slope on continuous time) once each."""
    _, codes = factor.codes()
    q = factor.q
    blocks = np.zeros((int(codes.max()) + 1, q, q))
    np.add.at(blocks, codes, factor.design[:, :, None] * factor.design[:, None, :])
    _, counts = np.unique(blocks.reshape(blocks.shape[0], -1).round(12), axis=0, return_counts=True)
    return int(counts.size)

"""Stage 4b, after the fit: corrected inference (docs/corrected.md, "Usage").

1. ``fdr_maps``: −log10 q of every contrast's −log10 p over the fitted voxels (cheap, always
   unless ``fdr: false``).
2. With ``resamples`` B > 0, the restricted wild bootstrap of ``core.resampling`` on the engine:
   ``store_data(plan, b)`` writes image batch b's data again (images x analysis voxels,
   float64, a second read of the images) into the work folder; ``prepare_block(plan, lo, hi, k)``
   prepares the per-block contributions of voxels lo … hi − 1 (of fit block k; the
   fit's blocks cut to a quarter of MAXMEM by ``correction_blocks``) from those rows and the fit's D;
   ``resample_chunk(plan, layout, c, start, stop)`` runs resamples start … stop − 1 over every
   block, one block in memory at a time, and keeps each statistic's maximum (max −log10 p,
   TFCE, cluster extent and mass).  Chunks combine by concatenation of their maxima; every
   chunk's file is kept in the work folder, so a killed run redoes only unfinished chunks.
   ``resample_memory`` plans what a resample task holds (the chunk's maps, one prepared block and
   its products, the maxima's working arrays, the layout, the cache of prepared blocks) within
   MAXMEM less the worker's own memory; it sizes the chunks.  A dask engine's tasks get the plan
   pickled once and the layout as a file in the work folder (``LayoutFile``), so that a task's
   arguments stay small.
3. ``write_corrections`` turns observed maps and null maxima into the maps, the cluster table
   and the null maxima file; ``CorrectionOutcome.record()`` goes into blmm_run.json.

Voxels with their own missing images (n_v < n) are fitted but left out of the bootstrap: their
FWE, TFCE and cluster maps are NaN, and the record counts them (``excluded_voxels``).
"""
from __future__ import annotations

import csv
import io
import os
import pickle
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blmm.config import Config, CorrectionSettings
from blmm.core.design import Contrast
from blmm.core.fdr import fdr_mlog10q
from blmm.core.linalg import unvech
from blmm.core.resampling import (
    GEMM_BATCH,
    ResamplingPrep,
    fwe_mlog10p,
    independent_blocks,
    mlog10p_at_least,
    prepare,
    resampled_stats,
    statistic_maps,
    stats_maxima,
)
from blmm.core.result import FitResult
from blmm.core.status import FITTED
from blmm.core.tail import tail_p
from blmm.errors import InputError
from blmm.geometry import (
    SpatialLayout, cluster_maxima, cluster_maxima_bytes, find_clusters, tfce, tfce_maxima, tfce_maxima_bytes,
)
from blmm.io.images import read_image, write_map
from blmm.io.outdir import (
    CLUSTERS_FILE,
    NULL_MAXIMA_FILE,
    block_file,
    correction_chunk_file,
    correction_layout_file,
    correction_prep_file,
    correction_y_file,
    MAPS,
    corrected_map_stat,
    map_name,
    save_arrays_atomically,
    write_text_atomically,
)
from blmm.io.surfaces import read_layout
from blmm.pipeline.plan import PickledPlan, RunPlan, loaded_plan, shipped_plan

MAX, TFCE, EXTENT, MASS = "max", "tfce", "cluster_extent", "cluster_mass"  # statistics of the null maxima
CHUNKS_TO_SHARE = 8  # resample chunks to aim for: work for several workers, and for a resume to keep
# A worker process's own memory before any task (Python, numpy, scipy, dask, blmm): 0.2-0.45 GiB measured
# between tasks on the 2 mm MNI run; a correction task plans its arrays within MAXMEM less this.
PROCESS_BYTES = 2**29
SMALL_BYTES = 2**25  # a task's Python objects, its plan and small arrays, beyond the arrays it plans
# Float64 (resamples x block voxels) arrays per contrast while a block's statistics are made: the GEMM
# batches' statistics and their concatenation, −log10 p's temporaries and result (tracemalloc, tests)
STATISTIC_COPIES = 6


@dataclass
class CorrectionOutcome:
    """What the correction stage computed, over the analysis-mask voxels (``plan.voxels``)."""

    settings: CorrectionSettings
    contrasts: list[Contrast]
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # map stat -> (V_analysis, contrasts of its kind)
    clusters: list[dict] = field(default_factory=list)  # rows of blmm_clusters.tsv
    null_maxima: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # contrast -> statistic -> (B + 1,)
    over_contrasts: dict[str, np.ndarray] = field(default_factory=dict)  # statistic -> (B + 1,), with corrcon
    blocks_factor: str = ""
    n_blocks: int = 0
    excluded_voxels: int = 0  # fitted, but with their own missing images: not resampled
    tail_accepted: dict[str, bool] = field(default_factory=dict)  # contrast -> GPD fit accepted
    chunks: int = 0

    def record(self) -> dict:
        """The run record's ``correction`` entry."""
        s = self.settings
        out = {"settings": s.to_yaml_dict(), "fdr": s.fdr, "resamples": s.resamples, "seed": s.seed,
               "maps": sorted(self.maps)}
        if s.resamples:
            out.update({
                "blocks": {"factor": self.blocks_factor, "count": self.n_blocks},
                "sigma2": s.sigma2,  # σ² of each resample: fixed (the contrast's share removed) or refit
                "weights": s.weights,  # each block's weight in a resample
                "precision": s.precision,  # of the prepared contributions and the sign GEMM
                "statistics": sorted({k for per in self.null_maxima.values() for k in per}),
                "null_maxima_file": NULL_MAXIMA_FILE, "resample_chunks": self.chunks,
                "excluded_voxels": self.excluded_voxels, "over_contrasts": bool(s.corrcon),
                "tail": {"asked": bool(s.tail), "accepted": self.tail_accepted},
                "null_maxima_summary": {c: {k: [float(np.quantile(v, 0.95)), float(np.max(v))]
                                            for k, v in per.items()} for c, per in self.null_maxima.items()},
            })
        return out


# ---------------------------------------------------------------------------------------------
# Helpers over the fit's block files

def _kind(contrast: Contrast) -> str:
    return "T" if contrast.is_t else "F"


def _contrast_keys(config: Config) -> list[str]:
    """Block-file prefix of each contrast, in config order: T{i} / F{i} counted per kind."""
    counts = {"T": 0, "F": 0}
    keys = []
    for c in config.contrasts:
        keys.append(f"{_kind(c)}{counts[_kind(c)]}")
        counts[_kind(c)] += 1
    return keys


def _gather(plan: RunPlan, key: str) -> np.ndarray:
    """A block-result array over the analysis voxels (NaN where a block has none)."""
    parts = []
    for k, (lo, hi) in enumerate(plan.blocks):
        with np.load(block_file(plan.workdir, k)) as block:
            parts.append(np.asarray(block[key], dtype=np.float64) if key in block.files else np.full(hi - lo, np.nan))
    return np.concatenate(parts)


def fdr_maps(plan: RunPlan, method: str) -> dict[str, np.ndarray]:
    """−log10 q of every contrast over its fitted voxels: map stat -> (V_analysis, contrasts of its kind)."""
    cfg = plan.config
    by_kind: dict[str, list[np.ndarray]] = {"T": [], "F": []}
    for c, key in zip(cfg.contrasts, _contrast_keys(cfg)):
        by_kind[_kind(c)].append(fdr_mlog10q(_gather(plan, f"{key}_mlog10p"), method))
    return {corrected_map_stat(kind, "lp_fdr"): np.stack(cols, axis=1) for kind, cols in by_kind.items() if cols}


# ---------------------------------------------------------------------------------------------
# The bootstrap's pieces on the engine

def correction_layout(plan: RunPlan) -> SpatialLayout | None:
    """Adjacency and extents over the analysis voxels, when clusters or TFCE are asked for."""
    s = plan.config.correction
    if s is None or not (s.resamples > 0 or s.tfce):
        return None
    in_mask = np.zeros(plan.config.space.n_voxels, bool)
    in_mask[plan.voxels] = True
    return read_layout(plan.config.space, in_mask, s.connectivity, s.surface)


def store_data(plan: RunPlan, b: int) -> str:
    """Image batch b's values at the analysis voxels, (images, voxels), rows in plan order.

    A second read of the images (the fit keeps only sums); written row by row, so memory holds one
    image.  float32 when every value is one (images stored as float32, the usual case: half the disk
    and half the reads of the float64 copy, losslessly), float64 otherwise.
    """
    path = correction_y_file(plan.workdir, b)
    if path.exists():
        return str(path)
    start, stop = plan.batches[b]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    try:
        if not _write_rows(plan, start, stop, tmp, np.float32):  # a value float32 cannot hold
            _write_rows(plan, start, stop, tmp, np.float64)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def _write_rows(plan: RunPlan, start: int, stop: int, tmp: Path, dtype) -> bool:
    """Images start … stop − 1 (plan order) at the analysis voxels into ``tmp`` as ``dtype``; False
    (file incomplete) as soon as a value does not survive the conversion."""
    cfg = plan.config
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(stop - start, plan.voxels.size))
    try:
        for i, row in enumerate(plan.order[start:stop]):
            values = read_image(cfg.y_files[row], cfg.space, plan.voxels)
            out[i] = values
            if not np.array_equal(out[i], values, equal_nan=True):
                return False
        out.flush()
        return True
    finally:
        del out


def correction_blocks(plan: RunPlan) -> list[tuple[int, int, int]]:
    """(start, stop, fit block) of each voxel block of the bootstrap: the fit's blocks, cut so that a
    block's prepared arrays (``prepared_bytes_per_voxel``) and its data take at most a quarter of MAXMEM."""
    cfg = plan.config
    size = max(1, int(cfg.maxmem // 4 // (prepared_bytes_per_voxel(cfg) + 8 * cfg.n)))
    return [(a, min(a + size, hi), k) for k, (lo, hi) in enumerate(plan.blocks) for a in range(lo, hi, size)]


def prepared_bytes_per_voxel(config: Config) -> int:
    """Bytes of one prepared voxel (``ResamplingPrep.nbytes``): its contributions (sign blocks x columns
    per contrast, in the precision), under weights other than Rademacher's each block's
    ẽ_c'V_c⁻¹ẽ_c per contrast (float64), and its vectors (ẽ'V⁻¹ẽ and df per contrast, σ̂², index)."""
    n_blocks = int(sign_blocks(config).max()) + 1
    n_contrasts = len(config.contrasts)
    return (prepared_itemsize(config) * n_blocks * contribution_columns(config)
            + 8 * n_blocks * n_contrasts * _per_block_ss(config) + 8 * (2 * n_contrasts + 2))


def contribution_columns(config: Config) -> int:
    """Σk: p per contrast with σ² refitted, else each contrast's rank (its numerator df)."""
    if config.correction.sigma2 == "refit":
        return config.p * len(config.contrasts)
    return sum(int(np.linalg.matrix_rank(c.matrix)) for c in config.contrasts)


def _per_block_ss(config: Config) -> bool:
    """Whether each block's ẽ_c'V_c⁻¹ẽ_c is kept: weights of s_c² ≠ 1 (all but Rademacher's), either σ² mode."""
    return config.correction.weights != "rademacher"


def task_budget(config: Config) -> int:
    """Bytes the correction tasks of one process may take together: MAXMEM less the process's own
    memory (``PROCESS_BYTES``), so that the process stays within MAXMEM; at least a quarter of MAXMEM."""
    return int(max(config.maxmem - PROCESS_BYTES, config.maxmem // 4))


def prepared_itemsize(config: Config) -> int:
    """Bytes per prepared contribution: 4 with ``precision: float32``, else 8."""
    return int(np.dtype(config.correction.precision).itemsize)


def prepared_columns(config: Config) -> int:
    """Columns of prepared contributions per voxel (Σk): p per contrast with σ² refitted, else each
    contrast's rank (its numerator df); and one per contrast for each block's ẽ_c'V_c⁻¹ẽ_c, which
    weights of s_c² ≠ 1 rescale (all but Rademacher's)."""
    return contribution_columns(config) + len(config.contrasts) * _per_block_ss(config)


def correction_space_needed(plan: RunPlan) -> int:
    """Bytes the stage writes, about (an upper bound): the data again (float64), the prepared
    contributions (sign blocks x voxels x columns per contrast, in the precision), the chunk files and the
    corrected maps (float32)."""
    s = plan.config.correction
    if s is None:
        return 0
    cfg, V = plan.config, plan.voxels.size
    maps = 4 * cfg.space.n_voxels * len(cfg.contrasts) * 6 + 4096 * 12
    if s.resamples == 0:
        return maps
    prepared = V * prepared_bytes_per_voxel(cfg)
    chunks = 8 * len(cfg.contrasts) * (4 * (s.resamples + 1) + V) + 4096 * CHUNKS_TO_SHARE
    return 8 * cfg.n * V + prepared + chunks + maps


def _block_fit(plan: RunPlan, lo: int, hi: int, k: int) -> tuple[FitResult, np.ndarray, list[np.ndarray]]:
    """Voxels lo … hi − 1 of fit block k as a FitResult (D and status; what ``prepare`` reads), the
    voxels to resample (fitted with every image present) and each contrast's Satterthwaite df."""
    cfg = plan.config
    rows = slice(lo - plan.blocks[k][0], hi - plan.blocks[k][0])
    with np.load(block_file(plan.workdir, k)) as block:
        reason = np.asarray(block["reason"])[rows]
        n_obs = np.asarray(block["n_obs"])[rows]
        v = reason.size
        if "D" in block.files:
            vechD = np.asarray(block["D"], dtype=np.float64)[rows]
            df = [np.asarray(block[f"{key}_df"], dtype=np.float64)[rows] for key in _contrast_keys(cfg)]
            beta, sigma2 = np.asarray(block["beta"])[rows], np.asarray(block["sigma2"])[rows]
        else:  # nothing fitted in this block
            vechD = np.zeros((v, sum(f.q * (f.q + 1) // 2 for f in cfg.factors)))
            df = [np.full(v, np.nan) for _ in cfg.contrasts]
            beta, sigma2 = np.full((v, cfg.p), np.nan), np.full(v, np.nan)
    D, col = [], 0
    for f in cfg.factors:
        width = f.q * (f.q + 1) // 2
        D.append(unvech(np.nan_to_num(vechD[:, col:col + width]), f.q))
        col += width
    empty = np.zeros((v, 0))
    fit = FitResult(beta=beta, sigma2=sigma2, D=D, llh=np.full(v, np.nan), converged=reason == FITTED,
                    n_iter=np.zeros(v, int), n_obs=n_obs, status=reason, stop=np.zeros(v, int),
                    cov_beta=np.zeros((v, 0, 0)), cov_beta_grad=np.zeros((v, 0, 0, 0)), hessian=np.zeros((v, 0, 0)),
                    free=empty.astype(bool), resms=np.full(v, np.nan), factor_names=[f.name for f in cfg.factors],
                    q=[f.q for f in cfg.factors], reml=cfg.reml, method=cfg.method)
    voxels = np.flatnonzero((reason == FITTED) & (n_obs == cfg.n))
    return fit, voxels, df


def sign_blocks(config: Config) -> np.ndarray:
    """The sign block of each image (config order): components of the chosen factor's levels, or of all factors'."""
    names = None if config.correction.blocks is None else [config.correction.blocks]
    return independent_blocks(config.factors, names)


def blocks_name(config: Config, blocks: np.ndarray) -> str:
    """The factor whose levels' components are the default blocks (the outermost), else a description."""
    for f in config.factors:
        if np.array_equal(independent_blocks(config.factors, [f.name]), blocks):
            return f.name
    return "connected components of all random factors' levels"


def prepare_block(plan: RunPlan, lo: int, hi: int, k: int) -> str:
    """Prepare analysis voxels lo … hi − 1 (of fit block k), images in config order: the signs do
    not depend on the plan's order."""
    path = correction_prep_file(plan.workdir, lo, hi)
    if path.exists():
        return str(path)
    cfg = plan.config
    fit, voxels, df = _block_fit(plan, lo, hi, k)
    ordered = np.concatenate([_read_columns(correction_y_file(plan.workdir, b), lo, hi)
                              for b in range(len(plan.batches))], axis=0)
    Y = np.empty_like(ordered)
    Y[plan.order] = ordered
    try:
        prep = prepare(Y, cfg.X, cfg.factors, fit, cfg.contrasts, voxels=voxels, blocks=sign_blocks(cfg), df=df,
                       two_sided=cfg.two_sided, sigma2=cfg.correction.sigma2,
                       weights=cfg.correction.weights, gemm_dtype=cfg.correction.precision,
                       threads=1)  # the engine parallelises over blocks
    except ValueError as err:
        raise InputError(f"correction: voxels {lo}-{hi - 1} of the analysis: {err}") from None
    _pickle_atomically(path, prep)
    return str(path)


def _read_columns(path: Path, lo: int, hi: int) -> np.ndarray:
    """Columns lo … hi − 1 of a C-order .npy matrix, read row by row (``os.pread``): a memory-mapped
    slice left most of the 2 mm MNI volume's 1.8 GB of batch files resident in the process (1.2 GB
    RSS for a 4,000-voxel block whose arrays take 0.3 GB)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-order matrix, found shape {shape}")
        offset = f.tell()
        out = np.empty((shape[0], hi - lo), dtype=dtype)
        row_bytes, width = shape[1] * dtype.itemsize, (hi - lo) * dtype.itemsize
        view = memoryview(out).cast("B")
        fd = f.fileno()
        for i in range(shape[0]):
            got = os.preadv(fd, [view[i * width:(i + 1) * width]], offset + i * row_bytes + lo * dtype.itemsize)
            if got != width:
                raise OSError(f"{path}: row {i} ends early ({got} of {width} bytes)")
    return out


def _pickle_atomically(path: Path, obj) -> None:
    """``obj`` pickled into ``path`` through a temporary file, streamed (no copy of its arrays as bytes)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            pickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unpickle_file(path: Path) -> object:
    """What ``_pickle_atomically`` wrote; read from the file, so that its arrays are allocated once."""
    with open(path, "rb") as f:
        return pickle.load(f)


class PreparedCache:
    """Prepared voxel blocks kept in this process between resample chunks, within a byte budget.

    Each chunk needs every block's contributions; at ABCD size re-reading them from disk for every
    chunk cost more than the chunk's products.  Blocks are kept while they fit the budget (what
    ``resample_memory`` leaves of the task's budget); beyond it they are read per chunk as before.
    A file is known by its path and modification time, so a resumed run's new file is read again.
    """

    def __init__(self) -> None:
        self.preps: dict[tuple[str, int], ResamplingPrep] = {}
        self.lock = threading.Lock()  # an inline engine's threads share the cache and its budget

    def load(self, path: Path, budget: int) -> ResamplingPrep:
        key = (str(path), path.stat().st_mtime_ns)
        with self.lock:
            if key in self.preps:
                return self.preps[key]
            for stale in [k for k in self.preps if k[0] == key[0]]:  # the file was rewritten
                del self.preps[stale]
        prep: ResamplingPrep = unpickle_file(path)
        with self.lock:
            if key not in self.preps and self.nbytes + prep.nbytes <= budget:
                self.preps[key] = prep
        return prep

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.preps.values())

    def clear(self) -> None:
        self.preps.clear()


PREPARED = PreparedCache()  # per process: an engine worker keeps its blocks across the chunks it runs


@dataclass(frozen=True)
class ResampleMemory:
    """What the resample tasks of one process hold at once (bytes), planned within ``budget``
    (``task_budget``): ``tasks`` chunks, each with its own maps, block and passes, and the process's
    one layout and one cache of prepared blocks, which its tasks share."""

    resamples: int  # of the chunk
    maps: int  # the chunk's statistic maps: float64, every contrast, every analysis voxel
    block: int  # the largest prepared voxel block in use: its arrays, its GEMM batch, its statistics
    rows_per_pass: int  # maps whose maxima (largest value, TFCE, clusters) are computed together
    passes: int  # what one such pass allocates (geometry's bounds)
    layout: int  # the layout with its edge lists
    budget: int
    tasks: int = 1  # tasks one process runs at once (``Engine.tasks_per_process``)

    @property
    def task(self) -> int:
        """One task's own arrays: its maps, its block and its passes."""
        return self.maps + self.block + self.passes + SMALL_BYTES

    @property
    def running(self) -> int:
        """Everything but the cache: every running task's own arrays and the shared layout."""
        return self.tasks * self.task + self.layout

    @property
    def cache(self) -> int:
        """Prepared blocks kept between chunks, shared by the process's tasks: the rest of the budget."""
        return max(0, self.budget - self.running)

    @property
    def planned(self) -> int:
        return self.running + self.cache


def resample_memory(plan: RunPlan, layout: SpatialLayout | None, resamples: int, start: int = 0,
                    tasks: int = 1) -> ResampleMemory:
    """The memory plan of a process running ``tasks`` tasks at once, each of resamples start …
    start + ``resamples`` − 1 (``resample_chunk``)."""
    tasks = max(1, int(tasks))
    cfg = plan.config
    s = cfg.correction
    V, n_contrasts = plan.voxels.size, len(cfg.contrasts)
    budget = task_budget(cfg)
    v = max(hi - lo for lo, hi, _ in correction_blocks(plan))
    # the whole GEMM batches the chunk's resamples lie in (the products are made a batch at a time)
    rows = (-(-(start + resamples) // GEMM_BATCH) - start // GEMM_BATCH) * GEMM_BATCH
    block = (v * prepared_bytes_per_voxel(cfg) + GEMM_BATCH * v * contribution_columns(cfg) * (prepared_itemsize(cfg) + 16)
             + 8 * v * rows * n_contrasts * STATISTIC_COPIES)
    stats = _statistics(s, layout)

    def pass_bytes(r: int) -> int:  # the largest value's copy, then TFCE, then clusters, one after the other
        return max([32 * r * V] + ([tfce_maxima_bytes(layout, r)] if TFCE in stats else [])
                   + ([cluster_maxima_bytes(layout, r)] if EXTENT in stats else []))

    per_pass = 1
    while per_pass < resamples and pass_bytes(2 * per_pass) <= budget // (16 * tasks):  # a few maps
        per_pass *= 2
    per_pass = min(per_pass, max(1, resamples))
    return ResampleMemory(resamples, 8 * n_contrasts * resamples * V, block, per_pass, pass_bytes(per_pass),
                          layout.nbytes if layout is not None else 0, budget, tasks)


def resample_ranges(plan: RunPlan, chunk: int | None = None, layout: SpatialLayout | None = None,
                    tasks: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of each resample chunk over 0 … B (0: the identity), GEMM_BATCH-aligned.

    Default size: the largest multiple of GEMM_BATCH (else of its halves: 64, 32, … 1) whose
    ``tasks`` tasks running at once in one process, without their shared cache of prepared blocks,
    take at most three quarters of the process's budget (``resample_memory``), and at most an eighth
    of the resamples (tasks to share among workers, and finished work a killed run keeps).  Smaller
    than GEMM_BATCH, a chunk's GEMM batch is computed whole and cut: the same values, more products.
    The chunks depend on the engine (its tasks per process), the p-values do not; a run resumed on
    an engine with other chunks redoes the chunks whose ranges changed.
    """
    cfg = plan.config
    total = cfg.correction.resamples + 1
    if chunk is None:
        chunk = resample_chunk_size(plan, layout, tasks)
    return [(a, min(a + chunk, total)) for a in range(0, total, chunk)]


def resample_chunk_size(plan: RunPlan, layout: SpatialLayout | None, tasks: int = 1) -> int:
    """Resamples per task (``resample_ranges``) with ``tasks`` tasks at once in one process; an
    InputError when one resample per task does not fit MAXMEM."""
    cfg = plan.config
    total = cfg.correction.resamples + 1
    most = max(GEMM_BATCH, -(-total // CHUNKS_TO_SHARE) // GEMM_BATCH * GEMM_BATCH)
    sizes = list(range(most, 0, -GEMM_BATCH)) + [GEMM_BATCH >> k for k in range(1, GEMM_BATCH.bit_length())]
    for size in sizes:
        memory = resample_memory(plan, layout, size, tasks=tasks)
        if memory.running <= memory.budget * 3 // 4:
            return size
    at_once = f" in each of the {memory.tasks} tasks one process runs at once" if memory.tasks > 1 else ""
    raise InputError(f"MAXMEM: {cfg.maxmem} bytes is too small for the correction's resamples: one resample of "
                     f"{plan.voxels.size} voxels{at_once} takes {memory.running} bytes (its maps, a prepared "
                     f"voxel block, the layout and the maxima's working arrays), more than three quarters of "
                     f"{memory.budget} (MAXMEM less {PROCESS_BYTES} for the process itself); raise MAXMEM"
                     + (" or run fewer tasks per process (workers)" if memory.tasks > 1 else ""))


class LayoutFile:
    """The layout as a dask engine's resample task is given it: a file in the work folder, read once
    per worker process (inside every task, the 2 mm MNI volume's 16 MiB layout made dask warn of a
    large graph)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)


_LOADED_LAYOUT: list = [None, None]  # [(path, mtime), SpatialLayout] of the last LayoutFile read here


def shipped_layout(plan: RunPlan, layout: SpatialLayout | None, engine) -> SpatialLayout | LayoutFile | None:
    """What resample tasks are given: the layout itself inline, its file in the work folder for dask."""
    if layout is None or getattr(engine, "client", None) is None:
        return layout
    path = correction_layout_file(plan.workdir)
    _pickle_atomically(path, layout)
    return LayoutFile(path)


def loaded_layout(layout: SpatialLayout | LayoutFile | None) -> SpatialLayout | None:
    """The layout a task was given (read from its file on this process's first task)."""
    if not isinstance(layout, LayoutFile):
        return layout
    key = (layout.path, os.stat(layout.path).st_mtime_ns)
    if _LOADED_LAYOUT[0] != key:
        _LOADED_LAYOUT[:] = [None, None]  # the previous one goes before the next is read
        _LOADED_LAYOUT[:] = [key, unpickle_file(Path(layout.path))]
    return _LOADED_LAYOUT[1]


def _statistics(settings: CorrectionSettings, layout: SpatialLayout | None) -> list[str]:
    stats = [MAX]
    if settings.tfce and layout is not None:
        stats.append(TFCE)
    if layout is not None:
        stats += [EXTENT, MASS]
    return stats


def resample_chunk(plan: RunPlan | PickledPlan, layout: SpatialLayout | LayoutFile | None, c: int, start: int,
                   stop: int, tasks: int = 1) -> str:
    """Resamples start … stop − 1 of every contrast over all blocks: each statistic's maxima
    (and for the chunk holding resample 0, the observed maps), within ``resample_memory``'s plan
    for ``tasks`` such tasks at once in this process."""
    plan = loaded_plan(plan)
    path = correction_chunk_file(plan.workdir, c)
    if path.exists():
        with np.load(path) as done:
            if int(done["start"]) == start and int(done["stop"]) == stop:
                return str(path)
    layout = loaded_layout(layout)
    cfg = plan.config
    s = cfg.correction
    V, R = plan.voxels.size, stop - start
    memory = resample_memory(plan, layout, R, start, tasks)
    maps = [np.full((R, V), np.nan) for _ in cfg.contrasts]
    # Without TFCE only the maxima and the clusters' voxels need −log10 p (per-voxel stdtr is the
    # cost of whole maps): the maps hold it at or above the cluster threshold, NaN elsewhere.
    whole = TFCE in _statistics(s, layout)
    largest = np.full((R, len(cfg.contrasts)), np.nan)  # max −log10 p per resample, over voxel blocks
    for lo, hi, _ in correction_blocks(plan):
        prep = PREPARED.load(correction_prep_file(plan.workdir, lo, hi), memory.cache)
        if prep.n_voxels == 0:
            continue
        stats = resampled_stats(prep, s.seed, start, stop)
        if whole:
            block = statistic_maps(prep, stats, signed=True)
        else:
            block = mlog10p_at_least(prep, stats, s.cluster_threshold, signed=True)
            largest = np.fmax(largest, stats_maxima(prep, stats))
            if start == 0:  # the observed maps are kept whole
                for m, row in zip(block, statistic_maps(prep, [t[:1] for t in stats], signed=True)):
                    m[0] = row[0]
        for c, m in enumerate(block):
            maps[c][:, lo + prep.voxels] = m
        del prep
    out = {"start": np.array(start), "stop": np.array(stop)}
    for j in range(len(maps)):
        m, maps[j] = maps[j], None  # each contrast's maps go once its maxima are taken
        maxima = _maxima(m, s, layout, _signed(cfg, cfg.contrasts[j]), memory.rows_per_pass)
        if not whole:
            maxima[MAX] = np.where(np.isnan(largest[:, j]), -np.inf, largest[:, j])
        for name, values in maxima.items():
            out[f"{j}/{name}"] = values
        if start == 0:
            out[f"{j}/observed"] = m[0].copy()
        del m
    save_arrays_atomically(path, out)
    return str(path)


def _signed(config: Config, contrast: Contrast) -> bool:
    """Two-sided T maps carry T's sign: clusters and TFCE are formed on each sign apart."""
    return config.two_sided and _kind(contrast) == "T"


def _maxima(maps: np.ndarray, settings: CorrectionSettings, layout: SpatialLayout | None,
            signed: bool, rows_per_pass: int) -> dict[str, np.ndarray]:
    """Each statistic's maximum of every (R, V) map: |−log10 p|, TFCE, cluster extent and mass
    (on a signed map, positive and negative clusters apart; the maximum over both), for
    ``rows_per_pass`` maps at a time (each map's maxima do not depend on the others')."""
    stats = _statistics(settings, layout)
    out = {k: np.empty(maps.shape[0]) for k in stats}
    for a in range(0, maps.shape[0], rows_per_pass):
        rows, part = slice(a, a + rows_per_pass), maps[a:a + rows_per_pass]
        with np.errstate(invalid="ignore"):
            out[MAX][rows] = np.max(np.where(np.isnan(part), -np.inf, np.abs(part)), axis=1)
        if TFCE in stats:
            out[TFCE][rows] = tfce_maxima(part, layout, two_sided=signed)
        if EXTENT in stats:
            out[EXTENT][rows], out[MASS][rows] = cluster_maxima(part, layout, settings.cluster_threshold,
                                                                two_sided=signed)
    return out


# ---------------------------------------------------------------------------------------------
# The stage

def run_corrections(plan: RunPlan, engine, chunk: int | None = None) -> CorrectionOutcome | None:
    """Stage 4b on the engine (None without a ``correction:`` section); ``chunk``: resamples per task."""
    cfg = plan.config
    s = cfg.correction
    if s is None:
        return None
    outcome = CorrectionOutcome(s, list(cfg.contrasts))
    if s.fdr is not None:
        outcome.maps.update(fdr_maps(plan, s.fdr))
    layout = correction_layout(plan)
    if s.resamples == 0:
        if s.tfce:
            outcome.maps.update(_observed_tfce(plan, layout))
        return outcome
    blocks = sign_blocks(cfg)
    outcome.blocks_factor = s.blocks or blocks_name(cfg, blocks)
    outcome.n_blocks = int(blocks.max()) + 1
    if outcome.n_blocks < 2:
        raise InputError(f"correction: the blocks ({outcome.blocks_factor}) form one block of all "
                         f"{cfg.n} images; the wild bootstrap needs at least 2 independent blocks")
    shipped = shipped_plan(plan, engine)
    engine.map(_store_data_task, [(shipped, b) for b in range(len(plan.batches))], stage="read images for resampling",
               labels=[f"image batch {b}" for b in range(len(plan.batches))])
    pieces = correction_blocks(plan)
    engine.map(_prepare_block_task, [(shipped, lo, hi, k) for lo, hi, k in pieces],
               stage="prepare resampling", labels=[f"voxels {lo}-{hi - 1}" for lo, hi, _ in pieces])
    tasks = engine.tasks_per_process
    ranges = resample_ranges(plan, chunk, layout, tasks)
    outcome.chunks = len(ranges)
    task_layout = shipped_layout(plan, layout, engine)
    try:
        engine.map(_resample_chunk_task, [(shipped, task_layout, c, a, z, tasks) for c, (a, z) in enumerate(ranges)],
                   stage="resample", labels=[f"resamples {a}-{z - 1}" for a, z in ranges])
    finally:
        PREPARED.clear()  # an inline run's blocks; a worker process's go with it
    _combine(plan, layout, ranges, outcome)
    return outcome


def _observed_tfce(plan: RunPlan, layout: SpatialLayout) -> dict[str, np.ndarray]:
    """TFCE of each contrast's fitted −log10 p map (no resamples)."""
    cfg = plan.config
    by_kind: dict[str, list[np.ndarray]] = {"T": [], "F": []}
    for c, key in zip(cfg.contrasts, _contrast_keys(cfg)):
        observed = _gather(plan, f"{key}_mlog10p")
        signed = _signed(cfg, c)
        if signed:
            observed = np.copysign(observed, _gather(plan, f"{key}_t"))
        by_kind[_kind(c)].append(_tfce_map(observed, layout, signed))
    return {corrected_map_stat(kind, "_tfce"): np.stack(cols, axis=1) for kind, cols in by_kind.items() if cols}


def _tfce_map(observed: np.ndarray, layout: SpatialLayout, signed: bool) -> np.ndarray:
    values = tfce(np.nan_to_num(observed, nan=0.0), layout, two_sided=signed)
    return np.where(np.isnan(observed), np.nan, values)


def _combine(plan: RunPlan, layout: SpatialLayout | None, ranges: list, outcome: CorrectionOutcome) -> None:
    """Null maxima from the chunk files, then each contrast's FWE, TFCE and cluster maps and rows."""
    cfg = plan.config
    s = cfg.correction
    stats = _statistics(s, layout)
    chunks = [dict(np.load(correction_chunk_file(plan.workdir, c))) for c in range(len(ranges))]
    observed = [chunks[0][f"{j}/observed"] for j in range(len(cfg.contrasts))]
    for j, c in enumerate(cfg.contrasts):
        outcome.null_maxima[c.name] = {k: np.concatenate([ch[f"{j}/{k}"] for ch in chunks]) for k in stats}
    if s.corrcon:
        outcome.over_contrasts = {k: np.max(np.stack([outcome.null_maxima[c.name][k] for c in cfg.contrasts]), axis=0)
                                  for k in stats}
    outcome.excluded_voxels = int(np.count_nonzero(np.isnan(observed[0]) & ~np.isnan(_gather(plan, "sigma2"))))
    columns: dict[str, list[np.ndarray]] = {}
    for j, c in enumerate(cfg.contrasts):
        null = outcome.over_contrasts if s.corrcon else outcome.null_maxima[c.name]
        obs = observed[j]  # signed on two-sided T contrasts
        signed = _signed(cfg, c)
        fwe = fwe_mlog10p(np.abs(obs), null[MAX])
        if s.tail:
            p, _, fitted = tail_p(np.abs(obs), null[MAX][1:], 10.0 ** -fwe)
            outcome.tail_accepted[c.name] = bool(fitted.accepted)
            with np.errstate(divide="ignore"):
                fwe = np.where(np.isnan(obs), np.nan, -np.log10(p))
        new = {"lp_fwe": fwe}
        if TFCE in stats:
            t = _tfce_map(obs, layout, signed)
            new["_tfce"] = t
            new["lp_tfce_fwe"] = np.where(np.isnan(obs), np.nan, fwe_mlog10p(np.abs(np.nan_to_num(t)), null[TFCE]))
        if EXTENT in stats:
            labels, cluster_fwe = _clusters(plan, layout, c, obs, null, outcome.clusters, signed)
            new["_cluster"] = labels
            new["lp_cluster_fwe"] = np.where(np.isnan(obs), np.nan, cluster_fwe)
        for suffix, values in new.items():
            columns.setdefault(corrected_map_stat(_kind(c), suffix), []).append(values)
    outcome.maps.update({stat: np.stack(cols, axis=1) for stat, cols in columns.items()})


def _clusters(plan: RunPlan, layout: SpatialLayout, contrast: Contrast, observed: np.ndarray,
              null: dict[str, np.ndarray], rows: list[dict], signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Signed cluster index (negative for clusters of negative T) and −log10 FWE p of each element's
    cluster extent; the clusters' table rows."""
    s = plan.config.correction
    table = find_clusters(np.nan_to_num(observed, nan=0.0), layout, s.cluster_threshold, two_sided=signed)
    extent_mlp = fwe_mlog10p(table.extent, null[EXTENT])
    mass_mlp = fwe_mlog10p(np.abs(table.mass), null[MASS])
    per_element = np.concatenate([[0.0], extent_mlp])[table.labels]
    index = np.arange(1, table.n_clusters + 1) * table.sign.astype(np.int64)  # the sign in the index too
    cols = table.columns()
    for i in range(table.n_clusters):
        rows.append({"contrast": contrast.name, **{k: v[i] for k, v in cols.items()}, "cluster": int(index[i]),
                     "peak_voxel": int(plan.voxels[table.peak_index[i]]),
                     "extent_fwe_p": 10.0 ** -extent_mlp[i], "mass_fwe_p": 10.0 ** -mass_mlp[i]})
    return np.concatenate([[0], index])[table.labels].astype(np.float64), per_element


# ---------------------------------------------------------------------------------------------
# Outputs

def write_corrections(plan: RunPlan, outcome: CorrectionOutcome | None) -> list[Path]:
    """The corrected maps in the input's format, blmm_clusters.tsv and the null maxima file."""
    if outcome is None:
        return []
    cfg = plan.config
    out = Path(cfg.outdir)
    names = {k: [c.name for c in cfg.contrasts if _kind(c) == k] for k in ("T", "F")}
    written: list[Path] = []
    try:
        for stat, values in sorted(outcome.maps.items()):
            integer = MAPS[stat].dtype == "int32"
            full = np.full((cfg.space.n_voxels, values.shape[1]), 0 if integer else np.nan)
            full[plan.voxels] = np.nan_to_num(values, nan=0.0) if integer else values
            written.append(write_map(out, map_name(stat), full.astype(np.int32) if integer else full, cfg.space,
                                     dtype="int32" if integer else "float32", volume_names=names[stat[3]]))
        if outcome.null_maxima:
            path = out / NULL_MAXIMA_FILE
            arrays = {f"{c}/{k}": v for c, per in outcome.null_maxima.items() for k, v in per.items()}
            arrays.update({f"over_contrasts/{k}": v for k, v in outcome.over_contrasts.items()})
            save_arrays_atomically(path, arrays)
            written.append(path)
            written.append(write_text_atomically(out / CLUSTERS_FILE, clusters_tsv(outcome.clusters)))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


CLUSTER_COLUMNS = ("contrast", "cluster", "sign", "part", "extent", "extent_unit", "mass", "peak_value",
                   "peak_voxel", "peak_x", "peak_y", "peak_z", "extent_fwe_p", "mass_fwe_p")


def clusters_tsv(rows: list[dict]) -> str:
    """The cluster table as TSV (header even when no cluster was found)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(CLUSTER_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[k]) for k in CLUSTER_COLUMNS])
    return buffer.getvalue()


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value.item() if isinstance(value, np.generic) else value)


def _store_data_task(args) -> str:
    plan, b = args
    return store_data(loaded_plan(plan), b)


def _prepare_block_task(args) -> str:
    plan, *rest = args
    return prepare_block(loaded_plan(plan), *rest)


def _resample_chunk_task(args) -> str:
    return resample_chunk(*args)

"""The pipeline's stages after planning: read the images, fit the blocks, write the maps.

1. `plan_run(config)` -> RunPlan: the analysis mask, image batches and voxel blocks sized
   from MAXMEM, the work folder and the hash of the inputs (for resuming).
2. `read_batch(plan, b)`: reads the images of batch b once (rows in level order, whole
   outer levels per batch) and writes their partial sums and presence bits for every analysis
   voxel (atomically).  One factor, a nesting tree, crossed factors or a nesting tree beside
   dense factors: X'Y (U'Y of the augmented design U = [X, Z_R] where factors stay dense,
   core/schur_sums.py and core/nested_schur_sums.py), Y'Y and per group of levels
   (core/level_groups.py) its class aggregates and the other levels' y_j, plus apart the y_j
   where a missing value touches a big-class level (`sum_columns`); every factor kept dense:
   X'Y, Z'Y, Y'Y.
3. `fit_block(plan, k)`: sums block k's rows of every partial in a fixed order and fits:
   every voxel against the complete design (`blocks.fit_missing_rows`: a voxel that misses no row
   by the complete design's objective); every factor kept dense, per presence pattern.
   Then infers and writes the block's results (atomically).
4. `write_outputs(plan, ...)`: assembles the maps in the input's format.

Batches and blocks run on an engine (`blmm.engine`); a killed run restarts from the
finished batch and block files, which the manifest ties to the inputs' hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from blmm.config import Config
from blmm.core.centre import ResponseCentre, centre_rows, intercept_weights, response_centre
from blmm.core.inference import infer
from blmm.core.level_groups import LevelGroup, chunk_sums, outer_level_places
from blmm.core.missing_rows import LevelSums, MissingRowStats, missing_design, rank_in_runs
from blmm.core.row_block_sums import RowBlocks, row_block_level_sums
from blmm.core.sufficient import (
    FactorLayout,
    accumulate_data_sums,
    presence_patterns,
    random_effects_matrix,
    split_data_sums,
    stats_from_sums,
)
from blmm.core.design import unidentifiable_patterns
from blmm.core.fit import fit_stats
from blmm.core.status import (BELOW_MIN_N, BELOW_MIN_PERCENT, DROPPED_FEW, DROPPED_UNIDENTIFIABLE, FAILED, FITTED,
                              NOT_FITTED, SAFE_MODE, STOP_NAMES, drop_reasons)
from blmm.core.nested_missing_rows import nested_missing_row_stats
from blmm.core.schur_missing_rows import nested_schur_missing_row_stats, schur_missing_row_stats
from blmm.core.structure import plan_fit
from blmm.io import outdir as _outdir
from blmm.io.images import read_image, read_image_rows, read_mask, rows_dtype, write_map
from blmm.errors import DiskFullError, InputError
from blmm.io.outdir import (
    FIT,
    LLH64_FILE,
    PER_F_CONTRAST,
    PER_T_CONTRAST,
    batch_touched_files,
    centre_file,
    disk_full_as_error,
    free_bytes,
    human_bytes,
    map_name,
    maps_written_by,
    save_array_atomically,
    save_arrays_atomically,
    write_text_atomically,
)
from blmm.core.design import covariance_names
from blmm.pipeline.corrections import correction_space_needed
from blmm.pipeline.plan import (RunPlan, block_voxel_bytes, crossed_by_schur, level_groups, one_factor, outer_codes,
                                sums_design)


class _RowFile:
    """A float64 .npy matrix on disk, read and written by row ranges with plain file I/O.

    Not a memmap: mapped pages count in the worker's memory, and a partial can be larger
    than MAXMEM (voxels x (p + q + 1) values).
    """

    def __init__(self, path: Path, n_rows: int, n_cols: int) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n_rows, n_cols))
        self.offset = header.offset
        del header
        self.n_cols = n_cols
        self.fh = open(path, "r+b")

    def read(self, a: int, b: int) -> np.ndarray:
        self.fh.seek(self.offset + 8 * a * self.n_cols)
        return np.fromfile(self.fh, np.float64, (b - a) * self.n_cols).reshape(b - a, self.n_cols)

    def write(self, a: int, rows: np.ndarray) -> None:
        self.fh.seek(self.offset + 8 * a * self.n_cols)
        # file.write, not ndarray.tofile: a full disk then raises ENOSPC (tofile's short write has no errno)
        self.fh.write(memoryview(np.ascontiguousarray(rows, dtype=np.float64)).cast("B"))

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def batch_files(plan: RunPlan, b: int) -> tuple[Path, Path]:
    return _outdir.batch_files(plan.workdir, b)


def block_file(plan: RunPlan, k: int) -> Path:
    return _outdir.block_file(plan.workdir, k)


# why an image value counts as missing (blmm_run.json "missing_values"), in the order they are checked
MISSING_REASONS = {
    "nonfinite": "not finite (NaN or infinite)",
    "data_mask": "outside the image's data mask",
    "data_mask_thresh": "below data_mask_thresh",
    "zero": "zero (zero_is_missing)",
}


def read_batch(plan: RunPlan, b: int, tasks: int = 1) -> str:
    """Read batch b's images once; write its partial sums for every analysis voxel.  ``tasks``: the
    batches one process reads at once (``Engine.tasks_per_process``), which share its MAXMEM."""
    stats_path, present_path = batch_files(plan, b)
    with disk_full_as_error(plan.config.outdir, space_needed(plan)["total"], f"the partial sums of image batch {b}"):
        centre = run_centre(plan)
        if present_path.exists() and batch_centre_hash(plan, b) == centre_hash(centre):
            return str(present_path)  # finished before an interruption, with this centre taken out
        tmp_stats = stats_path.with_name(f".{stats_path.name}.tmp{os.getpid()}.npy")
        try:
            missing = _read_batch(plan, b, tmp_stats, tasks)
            os.replace(tmp_stats, stats_path)
        finally:
            tmp_stats.unlink(missing_ok=True)  # nothing half-written stays behind
        bits = missing.pop("_bits")
        touched = missing.pop("_touched", None)
        if touched is not None:
            values_path, ptr_path = batch_touched_files(plan.workdir, b)
            save_array_atomically(values_path, touched[0])
            save_array_atomically(ptr_path, touched[1])
        missing["_centre"] = centre_hash(centre)  # the sums depend on it: a resumed batch must match
        write_text_atomically(_outdir.batch_counts_file(plan.workdir, b), json.dumps(missing))
        save_array_atomically(present_path, bits)  # written last: marks the batch finished
    return str(present_path)


def run_centre(plan: RunPlan) -> ResponseCentre:
    """The run's per-voxel centre (docs/model.md, "The centre"): read from the work folder, or
    computed once from the images `centre_rows` picks, spread over the rows (their missing values ignored)
    and saved there, so every batch, on any worker and after any restart, takes out the same one."""
    path = centre_file(plan.workdir)
    X = ordered_design(plan)[0]  # the fitting basis the batches' sums are formed in: X w = 1 there
    if path.exists():
        with np.load(path) as saved:
            return ResponseCentre.for_design(saved["value"], X, saved["weights"])
    cfg = plan.config
    picks = centre_rows(cfg.n)
    Y = np.empty((picks.size, plan.voxels.size))
    for i, row in enumerate(plan.order[picks]):
        Y[i] = read_image(cfg.y_files[row], cfg.space, plan.voxels)
        mask = read_mask(cfg.data_mask_files[row], cfg.space, plan.voxels) if cfg.data_mask_files else None
        Y[i, ~missing_value_rules(cfg, Y[i:i + 1], None if mask is None else mask[None])[0][0]] = np.nan
    weights = intercept_weights(X)
    with disk_full_as_error(cfg.outdir, space_needed(plan)["total"], "the per-voxel centre"):
        save_arrays_atomically(path, {"value": response_centre(Y), "weights": weights})  # same inputs, same file
    with np.load(path) as saved:
        return ResponseCentre.for_design(saved["value"], X, saved["weights"])


def centre_hash(centre: ResponseCentre) -> str:
    """What a batch's sums were formed with: a hash of the centre and its weights."""
    return hashlib.sha256(centre.value.tobytes() + centre.weights.tobytes()).hexdigest()[:16]


def batch_centre_hash(plan: RunPlan, b: int) -> str | None:
    """The centre hash recorded by image batch b (None if none)."""
    try:
        return json.loads(_outdir.batch_counts_file(plan.workdir, b).read_text()).get("_centre")
    except (OSError, ValueError):
        return None


def missing_value_rules(cfg: Config, Y: np.ndarray, in_data_mask: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """(present, counts): which values of Y (images x voxels) count as present, and how many were
    treated as missing for each reason, in the order of MISSING_REASONS."""
    missing = dict.fromkeys(MISSING_REASONS, 0)
    ok = np.isfinite(Y)
    missing["nonfinite"] += int(ok.size - np.count_nonzero(ok))
    if in_data_mask is not None:
        missing["data_mask"] += int(np.count_nonzero(ok & ~in_data_mask))
        ok &= in_data_mask
    with np.errstate(invalid="ignore"):  # NaN compares False, and is already missing
        if cfg.data_mask_thresh is not None:
            above = Y >= np.float64(cfg.data_mask_thresh)  # compared in float64 when Y is float32
            missing["data_mask_thresh"] += int(np.count_nonzero(ok & ~above))
            ok &= above
        if cfg.zero_is_missing:
            nonzero = Y != 0
            missing["zero"] += int(np.count_nonzero(ok & ~nonzero))
            ok &= nonzero
    return ok, missing


def ordered_design(plan: RunPlan) -> tuple[np.ndarray, list]:
    """X and the random factors in the run's fitting basis, with rows in the plan's level order."""
    cfg, basis = plan.config, plan.basis
    return (basis.fitting_X(cfg.X[plan.order]),
            [f.subset(plan.order) for f in basis.fitting_factors(cfg.factors)])


_GROUPS: list = [None, None]  # [input hash, groups] of the last run this process served


def sum_groups(plan: RunPlan) -> list[LevelGroup] | None:
    """The run's groups of levels (`plan.level_groups`), built once per process and run."""
    if _GROUPS[0] != plan.input_hash:
        _GROUPS[:] = [plan.input_hash, level_groups(*ordered_design(plan))]
    return _GROUPS[1]


def _chunks(cut: np.ndarray, start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of about `size` rows within [start, stop), ending where `cut` changes
    (a chunk grows to hold a level whole)."""
    out = []
    a = start
    while a < stop:
        b = min(a + size, stop)
        while b < stop and cut[b] == cut[b - 1]:
            b += 1
        out.append((a, b))
        a = b
    return out


def _read_batch(plan: RunPlan, b: int, tmp_stats: Path, tasks: int) -> dict:
    """Batch b's partial sums into ``tmp_stats``; the missing-value counts and presence bits
    (and where the sums are class-aggregated, the touched levels' y_j)."""
    groups = sum_groups(plan)
    if groups is None:  # every factor kept dense: its objectives take every level's Z'Y
        return _read_batch_by_column(plan, b, tmp_stats, tasks)
    return _read_batch_by_class(plan, b, tmp_stats, groups, tasks)


def _image_chunks(plan: RunPlan, ranges: list, missing: dict, bits: list):
    """Per row range: (c0, c1, Y (images x voxels, as read: float32 where every image is a ``.dat``,
    `rows_dtype`), presence).  Each image is read once; missing-value counts add into `missing`, and
    the presence bits are packed into `bits` by whole bytes.  `_centred` forms what the sums take."""
    cfg, voxels = plan.config, plan.voxels
    rows = []
    for c0, c1 in ranges:
        files = [cfg.y_files[row] for row in plan.order[c0:c1]]
        Y = np.empty((c1 - c0, voxels.size), rows_dtype(files, cfg.space))
        read_image_rows(files, cfg.space, voxels, Y)
        present = None
        if cfg.data_mask_files is not None:
            present = np.empty(Y.shape, bool)
            for i, row in enumerate(plan.order[c0:c1]):
                present[i] = read_mask(cfg.data_mask_files[row], cfg.space, voxels)
        # the missing-value rules on the whole chunk at once, counted in the order of MISSING_REASONS
        present, counts = missing_value_rules(cfg, Y, present)
        for key, k in counts.items():
            missing[key] += k
        yield c0, c1, Y, present
        rows.append(present)
        if sum(r.shape[0] for r in rows) % 8 == 0 or c1 == ranges[-1][1]:  # pack whole bytes only
            bits.append(np.packbits(np.concatenate(rows, axis=0), axis=0))
            rows = []


def _centred(Y: np.ndarray, present: np.ndarray, centre: ResponseCentre, X: np.ndarray) -> np.ndarray:
    """Y less the run's centre c X w (X: Y's rows of the fitting design; docs/model.md, "The centre"),
    float64, missing values 0: what the sums take.  A float64 Y is centred in place."""
    out = Y if Y.dtype == np.float64 else np.empty(Y.shape)
    for i, xw in enumerate(X @ centre.weights):  # in float64: the sums keep their precision
        np.subtract(Y[i], xw * centre.value, out=out[i])
    if not present.all():
        out[~present] = 0.0
    return out


def _read_share(plan: RunPlan, tasks: int) -> int:
    """Bytes of one read task's image chunk, and again of its products: a quarter of MAXMEM shared by the
    ``tasks`` batches one process reads at once."""
    return int(plan.config.maxmem // 4 // tasks)


def _chunk_rows(plan: RunPlan, tasks: int) -> int:
    """Images per chunk: Y in float64 plus the presence mask and the missing-value rules' boolean
    temporaries (~14 bytes a value) in the task's `_read_share`, a multiple of 8 so the presence bits
    pack chunk by chunk."""
    return max(8, _read_share(plan, tasks) // (14 * plan.voxels.size) // 8 * 8)


def _voxel_step(plan: RunPlan, n_rows: int, n_products: int, tasks: int) -> int:
    """Voxels per product: bounded memory for large q (the task's `_read_share`); all of them
    (contiguous Y, no copies) when they fit."""
    per_voxel = 8 * plan.n_stat_columns + 8 * n_rows + 8 * n_products
    return max(1, _read_share(plan, tasks) // per_voxel)


def _read_batch_by_column(plan: RunPlan, b: int, tmp_stats: Path, tasks: int) -> dict:
    """Every factor fitted dense: X'Y, Z'Y and Y'Y per voxel."""
    start, stop = plan.batches[b]
    X, factors = ordered_design(plan)
    centre = run_centre(plan)
    layout = FactorLayout.from_factors(factors)
    missing, bits = dict.fromkeys(MISSING_REASONS, 0), []
    images = _chunk_rows(plan, tasks)
    ranges = [(c0, min(c0 + images, stop)) for c0 in range(start, stop, images)]
    out = _RowFile(tmp_stats, plan.voxels.size, plan.n_stat_columns)
    try:
        for c0, c1, Y, present in _image_chunks(plan, ranges, missing, bits):
            Y = _centred(Y, present, centre, X[c0:c1])
            Z = random_effects_matrix([f.subset(slice(c0, c1)) for f in factors], layout)
            step = _voxel_step(plan, c1 - c0, layout.n_columns, tasks)
            for a in range(0, plan.voxels.size, step):
                Yc = Y[:, a:a + step]
                rows = out.read(a, a + Yc.shape[1]) if c0 > start else np.zeros((Yc.shape[1], plan.n_stat_columns))
                out.write(a, accumulate_data_sums(rows, X[c0:c1], Z, Yc))
    except BaseException:
        out.fh.close()  # the caller removes the file
        raise
    out.close()
    missing["_bits"] = np.concatenate(bits, axis=0).T.copy()  # (voxels, bytes)
    return missing


def _read_batch_by_class(plan: RunPlan, b: int, tmp_stats: Path, groups: list[LevelGroup], tasks: int) -> dict:
    """One factor, a nesting tree, crossed factors or a tree beside dense factors: per voxel X'Y (U'Y of
    the augmented design where factors stay dense, `sums_design`), Y'Y and each group's class-aggregated
    sums (`LevelSums`, core/level_groups.py), and apart the y_j of big-class levels a missing value touches.  Chunks
    hold whole outer levels (families), so each level's y_j is complete within one chunk."""
    start, stop = plan.batches[b]
    X, factors = ordered_design(plan)
    U = sums_design(X, factors)
    centre = run_centre(plan)
    layout = FactorLayout.from_factors(factors)
    outer = outer_codes(factors)
    n_outer = int(outer.max()) + 1 if outer.size else 0
    where = outer_level_places(groups, n_outer)  # (group, level in group, big) of each outer level
    missing, bits, touched = dict.fromkeys(MISSING_REASONS, 0), [], []
    width = 2 + max(g.q for g in groups)  # a touched row: [group, level, y_j padded]
    stored = plan.batch_columns[b]  # not the other batches' levels' y_j: zero here
    small_ranges = [g.small_range(int(outer[start]), int(outer[stop - 1]) + 1) for g in groups]
    one = one_factor(plan.config)
    by_blocks = one or crossed_by_schur(layout)  # one group of single levels: the row blocks can form its sums
    block_centre = centre.padded(U.shape[1] - X.shape[1])  # U w = X w: the same centre on U = [X, Z_R]
    out = _RowFile(tmp_stats, plan.voxels.size, stored.size)
    try:
        for c0, c1, Y, present in _image_chunks(plan, _chunks(outer, start, stop, _chunk_rows(plan, tasks)), missing, bits):
            Zc = random_effects_matrix([f.subset(slice(c0, c1)) for f in factors], layout).tocsc()
            f0, f1 = int(outer[c0]), int(outer[c1 - 1]) + 1  # the chunk's outer levels
            spans = [tuple(np.searchsorted(g.outer, (f0, f1))) for g in groups]  # each group's levels here
            keys = _touched_keys(outer[c0:c1], present, n_outer, where[2])
            # one factor or crossed factors, no big-class level touched by a missing value: U'Y, Y'Y and the
            # class sums by blocks of rows in cache, as fit_lmm forms them (no level's y_j is needed beside them)
            blocks = RowBlocks.plan(U[c0:c1], Zc if one else Zc[:, groups[0].columns.ravel()], outer[c0:c1],
                                    groups[0].classes, groups[0].Xl) if by_blocks and keys.size == 0 else None
            Zg = [] if blocks is not None else [Zc[:, g.columns[m0:m1].ravel()] for g, (m0, m1) in zip(groups, spans)]
            # complete rows go to the row blocks as read, which convert and centre them in cache
            in_blocks = blocks is not None and bool(present.all())
            if not in_blocks:
                Y = _centred(Y, present, centre, X[c0:c1])
            step = _voxel_step(plan, c1 - c0, sum((m1 - m0) * g.q for g, (m0, m1) in zip(groups, spans)), tasks)
            for a in range(0, plan.voxels.size, step):
                Yc = Y[:, a:a + step]
                v = Yc.shape[1]
                rows = out.read(a, a + v) if c0 > start else np.zeros((v, stored.size))
                if blocks is not None:
                    rows += row_block_level_sums(Yc, blocks, block_centre if in_blocks else None, threads=1,
                                                 small_range=small_ranges[0]).pack()
                    out.write(a, rows)
                    touched.append((np.zeros(0, np.int64), np.zeros((0, width))))  # none touched here
                    continue
                packed, held = chunk_sums(groups, U[c0:c1], Yc, Zg, [m0 for m0, _ in spans], small_ranges)
                rows += packed  # the batch's columns (`plan.batch_columns[b]`) only
                out.write(a, rows)
                here = keys[(keys // n_outer >= a) & (keys // n_outer < a + v)]
                touched.append(_touched_rows(here // n_outer, here % n_outer, where, held, [m0 for m0, _ in spans],
                                             a, width))
    except BaseException:
        out.fh.close()  # the caller removes the file
        raise
    out.close()
    missing["_bits"] = np.concatenate(bits, axis=0).T.copy()  # (voxels, bytes)
    missing["_touched"] = _merge_by_voxel(touched, plan.voxels.size, width)  # by voxel, then outer level
    return missing


def _touched_keys(outer: np.ndarray, present: np.ndarray, n_outer: int, big: np.ndarray) -> np.ndarray:
    """voxel * n_outer + outer level of every (voxel, big-class outer level) pair a missing value of
    the chunk touches (outer: the chunk's rows' outer levels, adjacent), sorted by voxel then level."""
    if present.all():  # complete data (most chunks) touch nothing
        return np.zeros(0, np.int64)
    # an outer level's rows are adjacent: reduce them to one row first, then list by voxel
    firsts = np.flatnonzero(np.concatenate([[True], outer[1:] != outer[:-1]]))
    touches = np.logical_or.reduceat(~present, firsts, axis=0)  # (outer levels, voxels)
    vm, fm = np.nonzero(np.ascontiguousarray(touches.T))
    keys = vm * n_outer + outer[firsts[fm]]
    return keys[big[keys % n_outer]]


def _touched_rows(voxel: np.ndarray, outer: np.ndarray, where: tuple, held: list, first: list, a: int,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
    """(voxel, rows [group, level in group, y_j padded to width]) of touched pairs, from each group's
    y_j (v, m, b) of the voxels from a, its level first[g] + i at position at[i] (held: `chunk_sums`;
    where: `outer_level_places`)."""
    group, level = where[0][outer], where[1][outer]
    values = np.zeros((voxel.size, width))
    values[:, 0], values[:, 1] = group, level
    for g, ((y, at), m0) in enumerate(zip(held, first)):
        sel = group == g
        values[sel, 2:2 + y.shape[2]] = y[voxel[sel] - a, at[level[sel] - m0]]
    return voxel, values


def missing_value_counts(plan: RunPlan) -> dict[str, int]:
    """Image values treated as missing, summed over the finished batches, by reason (only those > 0)."""
    totals = dict.fromkeys(MISSING_REASONS, 0)
    for b in range(len(plan.batches)):
        try:
            counts = json.loads(_outdir.batch_counts_file(plan.workdir, b).read_text())
        except (OSError, ValueError):
            continue
        for key in totals:
            totals[key] += int(counts.get(key, 0))
    return {MISSING_REASONS[key]: k for key, k in totals.items() if k}


def _block_inputs(plan: RunPlan, lo: int, hi: int):
    """Analysis voxels lo, ..., hi - 1: their summed statistics and presence matrix (n, voxels), summed in
    batch order (rows in the plan's level order); where sums are class-aggregated also the touched levels'
    (group, level, y_j) rows by voxel and their offsets per voxel."""
    sums = np.zeros((hi - lo, plan.n_stat_columns))
    present = []
    touched = []
    for b, (start, stop) in enumerate(plan.batches):
        stats_path, present_path = batch_files(plan, b)
        part = _read_rows(stats_path, lo, hi)
        stored = plan.batch_columns[b]
        if part.shape[1] != stored.size:  # another plan's file (e.g. another blmm's): never summed wrongly
            raise InputError(f"{stats_path}: {part.shape[1]} partial sums per voxel, expected {stored.size}; "
                             "run again with --force to read the images again")
        if stored.size == sums.shape[1]:
            sums += part
        else:  # its own levels' y_j, and the sums every batch adds to
            sums[:, stored] += part
        bits = np.load(present_path, mmap_mode="r")[lo:hi]
        present.append(np.unpackbits(bits, axis=1, count=stop - start).T.astype(bool))
        values_path, ptr_path = batch_touched_files(plan.workdir, b)
        if values_path.exists():
            ptr = np.load(ptr_path, mmap_mode="r")
            values = np.array(np.load(values_path, mmap_mode="r")[ptr[lo]:ptr[hi]])
            touched.append((np.repeat(np.arange(hi - lo), np.diff(np.asarray(ptr[lo:hi + 1]))), values))
    # each level lies in one batch, and batches come in level order: by voxel, then level
    touched = _merge_by_voxel(touched, hi - lo, touched[0][1].shape[1]) if touched else None
    return sums, np.concatenate(present, axis=0), touched


def _merge_by_voxel(pieces: list, n_voxels: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(values sorted by voxel, then piece, then order within piece; offsets per voxel) from
    pieces (voxel ids sorted, values (k, width)): each piece is sorted by voxel then level and
    pieces come in level order, so every value's place follows from counts, with no sort."""
    counts = [np.bincount(vox, minlength=n_voxels) for vox, _ in pieces]
    ptr = np.concatenate([[0], np.cumsum(np.sum(counts, axis=0))]).astype(np.int64)
    out = np.empty((int(ptr[-1]), width))
    fill = ptr[:-1].copy()
    for (vox, values), count in zip(pieces, counts):
        out[fill[vox] + rank_in_runs(vox)] = values
        fill += count
    return out, ptr


def _missing_row_stats(plan: RunPlan, sums: np.ndarray, touched, keep: np.ndarray, patterns: np.ndarray,
                       pattern_of_voxel: np.ndarray) -> MissingRowStats:
    """A one-factor block's statistics: the complete design, each pattern's missing rows and the
    voxels' class-aggregated sums (rows `keep` of the block)."""
    X, factors = ordered_design(plan)
    stats = missing_design(X, factors[0], FactorLayout.from_factors(factors), patterns, pattern_of_voxel)
    stats.sums = group_level_sums(plan, sums, touched, keep)[0]
    return stats


def group_level_sums(plan: RunPlan, sums: np.ndarray, touched, keep: np.ndarray) -> list[LevelSums]:
    """Each group's `LevelSums` at rows `keep` of a block, from its summed partial rows and its
    touched rows ([group, level, y_j padded] by voxel, offsets per voxel)."""
    groups = sum_groups(plan)
    width = max(g.q for g in groups)
    values, ptr = (np.zeros((0, 2 + width)), np.zeros(sums.shape[0] + 1, np.int64)) if touched is None else touched
    where = np.full(sums.shape[0], -1, np.int64)
    where[keep] = np.arange(keep.size)
    vox = where[np.repeat(np.arange(sums.shape[0]), np.diff(ptr))]
    out, col = [], 0
    for i, g in enumerate(groups):
        n_cols = g.packed_width()
        part = LevelSums.unpack(sums[keep, col:col + n_cols], g.Xl.shape[2], g.q, g.classes.n_big,
                                g.classes.small_levels.size)  # Xl's columns: X's, or U's where factors stay dense
        col += n_cols
        mine = (vox >= 0) & (values[:, 0] == i)  # voxels screened out drop
        counts = np.bincount(vox[mine], minlength=keep.size)
        out.append(part.with_touched(np.concatenate([[0], np.cumsum(counts)]), values[mine, 1].astype(np.int64),
                                     values[mine, 2:2 + g.q]))
    return out


def _read_rows(path: Path, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a 2-D .npy file, read without mapping the whole file."""
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        fh.seek(fh.tell() + a * shape[1] * dtype.itemsize)
        return np.fromfile(fh, dtype, (b - a) * shape[1]).reshape(b - a, shape[1])


def fit_block(plan: RunPlan, k: int, tasks: int = 1) -> str:
    """Fit and test every voxel of block k; write the block's results.  ``tasks``: the blocks one process
    fits at once (``Engine.tasks_per_process``), which share its MAXMEM: where the inputs of that many
    blocks would exceed the half of it that one block's may take (`block_voxel_bytes`), the block is read
    and fitted in consecutive parts within their share; the fit's working memory is a quarter of MAXMEM
    shared by the tasks."""
    path = block_file(plan, k)
    if path.exists():
        return str(path)
    lo, hi = plan.blocks[k]
    tasks = max(1, int(tasks))
    inputs = tasks * (hi - lo) * block_voxel_bytes(plan.n_stat_columns, plan.config.n, sum_groups(plan))
    n_parts = min(-(-inputs // max(plan.config.maxmem // 2, 1)), hi - lo)
    bounds = np.linspace(lo, hi, max(1, n_parts) + 1).round().astype(int)
    parts = [_fit_voxels(plan, int(a), int(b), tasks) for a, b in zip(bounds, bounds[1:])]
    results = {key: np.concatenate([part[key] if key in part else _unfitted(key, part["n_obs"].size, parts)
                                    for part in parts])
               for key in dict.fromkeys(key for part in parts for key in part)}
    with disk_full_as_error(plan.config.outdir, space_needed(plan)["total"], f"the results of voxel block {k}"):
        save_arrays_atomically(path, results)
    return str(path)


def result_fill(key: str, dtype) -> float | int:
    """What a block's result array holds at a voxel not fitted: NaN, 0 for flags and counts, NOT_FITTED for stop."""
    if key == "stop":
        return NOT_FITTED
    return 0 if np.issubdtype(dtype, np.integer) else np.nan


def _unfitted(key: str, size: int, parts: list[dict]) -> np.ndarray:
    """Result ``key`` of ``size`` voxels of which none was fitted, shaped as another part's."""
    like = next(part[key] for part in parts if key in part)
    return np.full((size,) + like.shape[1:], result_fill(key, like.dtype), like.dtype)


def _fit_voxels(plan: RunPlan, lo: int, hi: int, tasks: int) -> dict:
    """The results of analysis voxels lo, ..., hi - 1 (part of a block), fitted within MAXMEM / 4 / tasks."""
    cfg = plan.config
    sums, present, touched = _block_inputs(plan, lo, hi)
    n, p = cfg.n, cfg.p
    n_obs = present.sum(axis=0)
    reason = np.full(n_obs.size, FITTED, np.int64)
    if cfg.min_percent is not None:
        reason[(reason == FITTED) & (n_obs < cfg.min_percent * n)] = BELOW_MIN_PERCENT
    if cfg.min_n is not None:
        reason[(reason == FITTED) & (n_obs < cfg.min_n)] = BELOW_MIN_N
    if cfg.safe_mode:
        reason[(reason == FITTED) & (n_obs <= cfg.q)] = SAFE_MODE
        kept = np.flatnonzero(reason == FITTED)  # lme4's checks on the rows present at each voxel left
        patterns, pattern_of_voxel = presence_patterns(present[:, kept])
        reason[kept[unidentifiable_patterns(patterns, ordered_design(plan)[1])[pattern_of_voxel]]] = \
            DROPPED_UNIDENTIFIABLE
    reason[(reason == FITTED) & (n_obs <= p + 1)] = DROPPED_FEW  # a T needs a residual df
    keep = np.flatnonzero(reason == FITTED)
    results: dict[str, np.ndarray] = {"n_obs": n_obs, "reason": reason}
    if keep.size:
        patterns, pattern_of_voxel = presence_patterns(present[:, keep])
        X, factors = ordered_design(plan)
        layout = FactorLayout.from_factors(factors)
        # every voxel against the complete design where the structure can, those missing no row by its own
        # objective (docs/model.md, "Missing rows")
        fit_plan = plan_fit(layout, missing_rows=True)
        if one_factor(cfg):  # the sums come class-aggregated (LevelSums)
            stats = _missing_row_stats(plan, sums, touched, keep, patterns, pattern_of_voxel)
        elif fit_plan.structure == "nested":  # one nesting tree: touched families as units
            stats = nested_missing_row_stats(X, factors, layout, patterns, pattern_of_voxel,
                                             sums=group_level_sums(plan, sums, touched, keep))
        elif sum_groups(plan) is None:  # factors kept dense: one objective per presence pattern, from Z'Y
            fit_plan = plan_fit(layout)
            XtY, ZtY, YtY = split_data_sums(sums[keep], p, layout.n_columns)
            Z = random_effects_matrix(factors, layout)
            stats = stats_from_sums(X, Z, layout, patterns, pattern_of_voxel, XtY=XtY, ZtY=ZtY, YtY=YtY)
        elif fit_plan.eliminates_one_factor:
            # crossed factors: the eliminated factor's touched levels as units on U = [X, Z_R], from the class sums
            stats = schur_missing_row_stats(X, factors, patterns, pattern_of_voxel,
                                            sums=group_level_sums(plan, sums, touched, keep)[0])
        else:  # a nesting tree beside dense factors: its touched families as units on U
            stats = nested_schur_missing_row_stats(X, factors, fit_plan.tree, patterns, pattern_of_voxel,
                                                   sums=group_level_sums(plan, sums, touched, keep))
        stats.centre = run_centre(plan).take(lo + keep)  # the sums were formed without it: β gets it back
        fit = fit_stats(stats, reml=cfg.reml, method=cfg.method, tol=cfg.tol, max_iter=cfg.maxnit, plan=fit_plan,
                        max_block_bytes=max(cfg.maxmem // 4 // max(1, int(tasks)), 2**24),
                        threads=1)  # the engine parallelises
        fit = plan.basis.restore(fit)  # the user's units before inference: contrasts are in them
        inf = infer(fit, cfg.contrasts, two_sided=cfg.two_sided)
        reason[keep] = fit.status
        results.update(_block_results(fit, inf, keep, n_obs.size, cfg))
        results["reason"] = reason
    return results


def _block_results(fit, inf, keep, size, cfg: Config) -> dict:
    """Per-voxel result arrays of a block (`result_fill` where not fitted)."""
    def full(key, values, dtype=np.float64):
        values = np.asarray(values)
        out = np.full((size,) + values.shape[1:], result_fill(key, dtype), dtype=dtype)
        out[keep] = values
        return out

    p = cfg.p
    res = {
        "beta": full("beta", fit.beta), "sigma2": full("sigma2", fit.sigma2), "D": full("D", fit.vech_D()),
        "llh": full("llh", fit.llh),
        "converged": full("converged", fit.converged.astype(np.int32), np.int32),
        "nit": full("nit", fit.n_iter.astype(np.int32), np.int32),
        "boundary": full("boundary", fit.boundary.astype(np.int32), np.int32),
        "stop": full("stop", fit.stop.astype(np.int32), np.int32),
    }
    if cfg.output_covb:
        res["cov"] = full("cov", fit.cov_beta.reshape(-1, p * p))
    if cfg.resms:
        res["resms"] = full("resms", fit.resms)
    for i, t in enumerate(inf.t):
        for name in ("estimate", "se", "t", "df", "mlog10p"):
            res[f"T{i}_{name}"] = full(f"T{i}_{name}", getattr(t, name))
    for i, f in enumerate(inf.f):
        for name in ("F", "df", "mlog10p", "r2"):
            res[f"F{i}_{name}"] = full(f"F{i}_{name}", getattr(f, name))
    return res


# the block results behind each map of io.outdir.MAPS the write stage gathers (a contrast map: one key per
# contrast, "T0_t", "T1_t", ...); n, mask and edf come from the screen instead
RESULT_KEYS = {"beta": "beta", "sigma2": "sigma2", "D": "D", "llh": "llh", "converged": "converged", "nit": "nit",
               "cov": "cov", "resms": "resms", "con": "estimate", "conSE": "se", "conT": "t", "conTlp": "mlog10p",
               "conT_swedf": "df", "conF": "F", "conFlp": "mlog10p", "conF_swedf": "df", "conR2": "r2"}


def _map_specs(cfg: Config) -> list[tuple[str, list[str], str, list[str] | None]]:
    """(file name, block result keys, dtype, volume names) of every map the write stage gathers."""
    t_names = [c.name for c in cfg.contrasts if c.is_t]
    f_names = [c.name for c in cfg.contrasts if not c.is_t]
    names = {"1": None, "p": list(cfg.x_names),
             "q_u": [name for f in cfg.factors for name in covariance_names(f.name, f.column_names)],
             "p²": [f"cov({a},{b})" for a in cfg.x_names for b in cfg.x_names],
             PER_T_CONTRAST: t_names, PER_F_CONTRAST: f_names}
    wanted = {"cov": cfg.output_covb, "resms": bool(cfg.resms)}
    specs = []
    for kind in maps_written_by(FIT):
        if kind.stat not in RESULT_KEYS or not wanted.get(kind.stat, True) or names[kind.volumes] == []:
            continue
        key = RESULT_KEYS[kind.stat]
        prefix = {PER_T_CONTRAST: "T", PER_F_CONTRAST: "F"}.get(kind.volumes)
        keys = [f"{prefix}{i}_{key}" for i in range(len(names[kind.volumes]))] if prefix else [key]
        specs.append((map_name(kind.stat), keys, kind.dtype, names[kind.volumes]))
    return specs


def volume_names(cfg: Config) -> dict[str, list[str]]:
    """Map statistic -> the names of its volumes (coefficients, contrasts, D entries)."""
    return {name[len(map_name("")):]: list(names) for name, _, _, names in _map_specs(cfg) if names}


def space_needed(plan: RunPlan) -> dict[str, int]:
    """Bytes a run writes into outdir, about: partial sums and block results (the work folder,
    deleted at the end) and the maps, which exist together before the work folder goes."""
    cfg = plan.config
    V = plan.voxels.size
    specs = _map_specs(cfg)
    volumes = 3 + sum(len(names) if names else len(keys) for _, keys, _, names in specs)  # + n, mask, edf
    partial = sum(256 + 8 * V * stored.size + V * -(-(b - a) // 8) + 512
                  for (a, b), stored in zip(plan.batches, plan.batch_columns))
    blocks = sum(4096 + 8 * (hi - lo) * (volumes + 8) for lo, hi in plan.blocks)
    n_voxels = cfg.space.n_voxels
    per_map = 4096 + (8 * n_voxels if cfg.space.format == "cifti" else 0)  # headers (CIFTI: its brain models)
    maps = 4 * n_voxels * volumes + per_map * (len(specs) + 3) + 8 * n_voxels + 4096  # + llh_float64, records
    corrections = correction_space_needed(plan)
    return {"partial": partial + blocks, "maps": maps, "corrections": corrections,
            "total": partial + blocks + maps + corrections}


def check_disk_space(plan: RunPlan) -> None:
    """DiskFullError, with the numbers, when outdir's filesystem has less room than the run needs."""
    need = space_needed(plan)
    free = free_bytes(plan.config.outdir)
    if free is None:
        return
    written = sum(f.stat().st_size for f in plan.workdir.glob("*") if f.is_file())  # finished work of a resumed run
    if free + written < need["total"]:
        raise DiskFullError(
            f"outdir {plan.config.outdir}: not enough free space: this run needs about {human_bytes(need['total'])} "
            f"there ({human_bytes(need['partial'])} of partial sums and block results, {human_bytes(need['maps'])} "
            f"of maps, {human_bytes(need['corrections'])} of the corrections stage's work files and maps){f', {human_bytes(written)} of it already written' if written else ''}, and the filesystem "
            f"has {human_bytes(free)} free. Free some space or choose another outdir")


def write_outputs(plan: RunPlan) -> dict:
    """Assemble the block results into maps; returns the counts for the summary.

    All or nothing: when a map cannot be written (a full disk), the maps already written are
    removed again, so outdir never holds half of a run's maps."""
    written: list[Path] = []
    try:
        with disk_full_as_error(plan.config.outdir, space_needed(plan)["total"], "the maps"):
            return _write_outputs(plan, written)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _write_outputs(plan: RunPlan, written: list[Path]) -> dict:
    cfg = plan.config
    space = cfg.space
    out = Path(cfg.outdir)
    blocks = [np.load(block_file(plan, k)) for k in range(len(plan.blocks))]
    V = space.n_voxels
    vox = plan.voxels

    widths = {"beta": (cfg.p,), "D": (sum(f.q * (f.q + 1) // 2 for f in cfg.factors),), "cov": (cfg.p ** 2,)}

    def gather(key, fill, dtype):
        parts = [np.asarray(b[key]) if key in b.files else None for b in blocks]
        width = next((pt.shape[1:] for pt in parts if pt is not None), widths.get(key, ()))
        arr = np.full((V,) + width, fill, dtype=dtype)
        for (lo, hi), pt in zip(plan.blocks, parts):
            if pt is not None:
                arr[vox[lo:hi]] = pt
        return arr

    def write(name, data, dtype, names=None):
        written.append(write_map(out, name, data, space, dtype=dtype, volume_names=names))

    n_obs = gather("n_obs", 0, np.int64)
    reason = gather("reason", -1, np.int64)
    fitted = reason == FITTED
    write(map_name("n"), n_obs.astype(np.int32), "int32")
    write(map_name("mask"), fitted.astype(np.int32), "int32")
    write(map_name("edf"), np.where(fitted, n_obs - cfg.p, 0).astype(np.int32), "int32")
    for name, keys, dtype, names in _map_specs(cfg):
        cols = []
        for key in keys:
            a = gather(key, 0 if dtype == "int32" else np.nan, np.int64 if dtype == "int32" else np.float64)
            cols.append(a.reshape(V, -1))
        data = np.concatenate(cols, axis=1)
        if dtype == "float32":
            data[~fitted] = np.nan
        write(name, data, dtype, names)
    llh = gather("llh", np.nan, np.float64)
    llh[~fitted] = np.nan
    written.append(out / LLH64_FILE)
    save_array_atomically(out / LLH64_FILE, llh)
    converged = gather("converged", 0, np.int64).astype(bool) & fitted
    boundary = gather("boundary", 0, np.int64).astype(bool) & fitted
    in_mask = np.zeros(V, bool)
    in_mask[vox] = True
    stop = gather("stop", NOT_FITTED, np.int64)
    not_converged = fitted & ~converged
    counts = {
        "analysis_mask": int(in_mask.sum()),
        "fitted": int(fitted.sum()),
        "converged": int(converged.sum()),
        "not_converged": int(not_converged.sum()),
        "not_converged_reasons": {why: int((not_converged & (stop == r)).sum())
                                  for r, why in STOP_NAMES.items() if np.any(not_converged & (stop == r))},
        "failed": int((reason == FAILED).sum()),
        "boundary": int(boundary.sum()),
        "dropped": {why: int((reason == r).sum()) for r, why in drop_reasons().items() if np.any(reason == r)},
        "missing_values": missing_value_counts(plan),
    }
    return counts

"""Stage 1: plan a run (mask, batches, blocks, inputs hash) and prepare or resume the outdir."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blmm.version import __version__
from blmm.config import Config
from blmm.core.design import RandomFactor
from blmm.core.design_basis import FittingBasis, fitting_basis
from blmm.core.level_groups import LevelGroup, factor_groups, tree_groups
from blmm.core.missing_rows import MissingRowStats, missing_design
from blmm.core.nested_schur_sums import tree_schur_groups
from blmm.core.objective.nested import NestedObjective, nested_tree, tree_schur_design
from blmm.core.objective.schur import schur_design
from blmm.core.schur_sums import schur_group
from blmm.core.structure import plan_fit
from blmm.core.sufficient import FactorLayout, random_effects_matrix
from blmm.errors import InputError
from blmm.io.images import read_mask
from blmm.io.outdir import (
    MANIFEST_FILE,
    RUN_FILE,
    WORK_DIR,
    batch_counts_file,
    batch_files,
    batch_touched_files,
    block_file,
    holds_maps,
    recorded_hash,
    remove_run_outputs,
    write_text_atomically,
)
from blmm.pipeline.cost import blocks_for_work


@dataclass(frozen=True)
class RunPlan:
    """Everything the stages need; small enough to ship to every worker."""

    config: Config
    workdir: Path
    voxels: np.ndarray  # flat indices of the analysis-mask voxels
    batches: tuple  # (start, stop) positions in `order`, cut at level boundaries
    blocks: tuple  # (start, stop) positions in `voxels`
    input_hash: str
    order: np.ndarray = None  # image rows in level order (`level_order`); every stage reads rows this way
    n_stat_columns: int = 0  # partial sums per voxel, all batches summed (`sum_columns`)
    batch_columns: tuple = ()  # per batch, which of them it stores (`stored_columns`)
    basis: FittingBasis = None  # the run's fitting basis (`design_basis`): every stage's X and Z are in it
    timings: dict = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # short: dask prints task arguments, errors name items
        return (f"RunPlan(outdir={str(self.config.outdir)!r}, {self.config.n} images, {self.voxels.size} voxels, "
                f"{len(self.batches)} batches, {len(self.blocks)} blocks)")


class PickledPlan:
    """A RunPlan pickled once by the driver, for a dask engine's tasks: each worker process unpickles
    it once, not once per task (a plan's image Paths cost ~45 ms a task to unpickle for 7,401 images)."""

    def __init__(self, plan: RunPlan) -> None:
        self.token = uuid.uuid4().hex  # one run's plan: never mistaken for another run's in a worker
        self.data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)

    def load(self) -> RunPlan:
        """The plan, unpickled on this process's first call and kept for its next tasks."""
        token, plan = _LOADED_PLAN
        if token != self.token:
            plan = pickle.loads(self.data)
            _LOADED_PLAN[:] = [self.token, plan]  # the last plan only: a worker serves one run at a time
        return plan


_LOADED_PLAN: list = [None, None]  # [token, RunPlan] of the last PickledPlan loaded in this process


def loaded_plan(plan: RunPlan | PickledPlan) -> RunPlan:
    """The plan a task was given, as a RunPlan (inline engines pass it as is)."""
    return plan.load() if isinstance(plan, PickledPlan) else plan


def shipped_plan(plan: RunPlan, engine) -> RunPlan | PickledPlan:
    """What a stage's tasks are given: the plan itself inline, pickled once for a dask engine."""
    return plan if getattr(engine, "client", None) is None else PickledPlan(plan)


def input_hash(config: Config) -> str:
    """Hash of the resolved inputs and the size/mtime of every input file."""
    h = hashlib.sha256()
    h.update(model_hash(config).encode())
    _hash_files(h, list(config.y_files) + list(config.data_mask_files or []))
    return h.hexdigest()[:16]


def _hash_files(h, files) -> None:
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())


def batch_hashes(config: Config, batches, order: np.ndarray) -> list[str]:
    """Per image batch: a hash of the size/mtime of its images (and data masks), rows in `order`."""
    hashes = []
    masks = config.data_mask_files or []
    for start, stop in batches:
        h = hashlib.sha256()
        rows = order[start:stop]
        _hash_files(h, [config.y_files[i] for i in rows] + [masks[i] for i in rows if masks])
        hashes.append(h.hexdigest()[:16])
    return hashes


def model_hash(config: Config) -> str:
    """Hash of everything but the images: settings, tables, analysis mask (a fixed image may be reread)."""
    h = hashlib.sha256()
    h.update(__version__.encode())
    h.update(json.dumps(config.to_yaml_dict(), sort_keys=True, default=str).encode())
    if config.analysis_mask is not None:
        _hash_files(h, [config.analysis_mask])
    h.update(config.X.tobytes())
    for fac in config.factors:
        h.update(np.asarray(fac.labels).astype(str).tobytes())
        h.update(fac.design.tobytes())
    return h.hexdigest()[:16]


def level_order(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Image rows with each level's images together, and the level of each sorted row at which
    batches may be cut.

    Rows are sorted stably by level code of the factor with most levels; for a nesting tree
    (subjects in families) by the outer level, then the inner ones, and cut only between
    outer levels.  A batch then holds whole levels, so per-class sums add across batches.
    """
    layout = FactorLayout.from_factors(config.factors)
    codes = [np.searchsorted(lv, f.labels) for f, lv in zip(config.factors, layout.levels)]
    tree = nested_tree(layout)
    if tree:
        keys = sorted(tree, key=lambda k: layout.n_levels[k])  # outer (fewer levels) first
    else:
        keys = [int(np.argmax(layout.n_levels))]
    order = np.lexsort([codes[k] for k in reversed(keys)])  # stable; the last key sorts first
    return order.astype(np.int64), codes[keys[0]][order]


def cut_at_levels(cut: np.ndarray, n_batches: int) -> tuple:
    """About n_batches (start, stop) ranges of equal size, each boundary moved to the nearest change of `cut`."""
    n = cut.size
    edges = np.concatenate([[0], np.flatnonzero(np.diff(cut)) + 1, [n]])
    targets = np.linspace(0, n, n_batches + 1)
    at = np.clip(np.searchsorted(edges, targets), 1, edges.size - 1)
    nearest = np.where(targets - edges[at - 1] <= edges[at] - targets, edges[at - 1], edges[at])
    bounds = np.unique(np.concatenate([[0], nearest, [n]]))
    return tuple((int(a), int(b)) for a, b in zip(bounds, bounds[1:]) if b > a)


def plan_run(config: Config, force: bool = False) -> RunPlan:
    """Size the batches and blocks, and prepare (or resume) the work folder."""
    space = config.space
    if config.analysis_mask is not None:
        in_mask = read_mask(config.analysis_mask, space)
    else:
        in_mask = np.ones(space.n_voxels, bool)
    voxels = np.flatnonzero(in_mask)
    if voxels.size == 0:
        raise InputError(f"analysis_mask {config.analysis_mask}: no voxel is inside the mask")
    n, V = config.n, voxels.size
    budget = max(int(config.maxmem), 1)
    # image batches run in parallel and each accumulates one partial file of V x columns
    # sums, so their number follows the workers (and disk), not memory: a batch reads its
    # images in memory-sized chunks (image_chunk)
    # (the layout depends only on the inputs and MAXMEM, so a run resumes on any engine)
    order, cut = level_order(config)
    basis = design_basis(config)  # once per run, before any image is read
    groups = level_groups(basis.fitting_X(config.X[order]), [f.subset(order) for f in basis.fitting_factors(config.factors)])
    columns = sum_columns(config, order, basis, groups)
    partial_bytes = 8 * V * columns
    n_batches = int(max(1, min(4, n // 32, 2 * budget // max(partial_bytes, 1))))
    batches = cut_at_levels(cut, n_batches)
    # voxel blocks: their inputs within half of MAXMEM (`block_voxel_bytes`), the fit's working memory a quarter
    per_block = max(1, min(V, budget // 2 // block_voxel_bytes(columns, n, groups), 20000))
    # blocks run in parallel: about a second of estimated work each, enough to share (cost.py)
    # (upstream's voxelBatching asks for memory-sized blocks run in parallel, which these always are: it
    # adds none, as every upstream file sets it only because upstream crashed without it)
    n_blocks = max(-(-V // per_block), min(config.maxnvb, blocks_for_work(config, V)))
    bounds = np.linspace(0, V, n_blocks + 1).round().astype(int)
    blocks = tuple((int(a), int(b)) for a, b in zip(bounds, bounds[1:]) if b > a)
    plan = RunPlan(config, Path(config.outdir) / WORK_DIR, voxels, batches, blocks, input_hash(config),
                   order=order, n_stat_columns=columns, batch_columns=stored_columns(groups, cut, batches, columns),
                   basis=basis)
    _prepare_outdir(plan, force)
    return plan


def block_voxel_bytes(columns: int, n: int, groups: list[LevelGroup] | None) -> int:
    """What a voxel block holds per voxel before its fit: the summed statistics (three copies), its presence
    bits, patterns and missing rows (at most n each), and where the sums are class-aggregated the touched
    levels' [group, level, y_j] (at most one per outer level); the missing-row units count inside the fit."""
    touched = 0 if groups is None else 8 * (2 + max(g.q for g in groups)) * min(n, sum(g.outer.size for g in groups))
    return 8 * columns * 3 + 11 * n + touched


def design_basis(config: Config) -> FittingBasis:
    """The run's fitting basis, decided once before any image is read (refuses a deficient design)."""
    names = config.x_names if config.x_names and len(config.x_names) == config.p else None
    source = f"X: {config.x_path}" if config.x_path is not None else "formula"
    return fitting_basis(config.X, config.factors, names, source=source)


def one_factor(config: Config) -> bool:
    """Runs whose partial sums are aggregated by classes of levels (one random factor)."""
    return len(config.factors) == 1


def complete_design(X: np.ndarray, factor: RandomFactor) -> MissingRowStats:
    """The complete design of a one-factor run (X and the factor with rows in level order): its sums
    and classes of levels."""
    n = X.shape[0]
    return missing_design(X, factor, FactorLayout.from_factors([factor]), np.ones((1, n), bool),
                          np.zeros(0, np.int64))


def sum_columns(config: Config, order: np.ndarray | None = None, basis: FittingBasis | None = None,
                groups: list[LevelGroup] | None = None) -> int:
    """Partial sums per voxel of one image batch: per group of levels (`level_groups`) X'Y, Y'Y,
    per big class its q q p cross sums and q(q+1)/2 y_j y_j' sums, and q per other level (one
    factor, a nesting tree, crossed factors with U'Y for X'Y); p + q + 1 (factors kept dense).
    The groups are those of the run's fitting basis (`basis`, the plan's; by default the
    config's), unless given (`groups`)."""
    if groups is None:
        order = np.arange(config.n) if order is None else order
        basis = design_basis(config) if basis is None else basis
        groups = level_groups(basis.fitting_X(config.X[order]),
                              [f.subset(order) for f in basis.fitting_factors(config.factors)])
    if groups is None:
        return config.p + config.q + 1
    return sum(g.packed_width() for g in groups)


def stored_columns(groups: list[LevelGroup] | None, cut: np.ndarray, batches: tuple, width: int) -> tuple:
    """Per image batch, the columns of a voxel's partial sums (`sum_columns`, ``width``) that it stores:
    per group X'Y, Y'Y, the class aggregates and the y_j of its own small levels, since the y_j of
    another batch's levels are zero in its sums (`LevelGroup.batch_columns`; ``cut``: each row's outer
    level); every column for factors kept dense."""
    if groups is None:
        return tuple(np.arange(width) for _ in batches)
    offsets = np.cumsum([0] + [g.packed_width() for g in groups])  # each group's first column
    return tuple(np.concatenate([offset + g.batch_columns(int(cut[start]), int(cut[stop - 1]) + 1)
                                 for g, offset in zip(groups, offsets)]) for start, stop in batches)


def level_groups(X: np.ndarray, factors: list[RandomFactor]) -> list[LevelGroup] | None:
    """The groups of levels whose sums reading aggregates by class (core/level_groups.py), for X and
    factors with rows in level order: one factor's levels, a nesting tree's families by block shape,
    crossed factors' factor with most levels on the augmented design (`schur_group`), or a nesting tree's
    families on the augmented design where other factors stay dense beside it (`tree_schur_groups`);
    None where every factor stays dense (Z'Y per level)."""
    layout = FactorLayout.from_factors(factors)
    if len(factors) == 1:
        design = complete_design(X, factors[0])
        return factor_groups(design.classes, design.ZtX)
    if crossed_by_schur(layout):
        group = schur_group(X, factors)
        return None if group is None else [group]
    if (tree := tree_beside_dense(layout)) is not None:
        return tree_schur_groups(X, factors, tree, outer_codes(factors))
    tree = nested_tree(layout)
    if tree is None or len(tree) != len(factors):
        return None
    Z = random_effects_matrix(factors, layout)
    XtX, ZtX, ZtZ = X.T @ X, np.asarray(Z.T @ X), (Z.T @ Z).tocsr()
    obj = NestedObjective(XtX, ZtX, ZtZ, X.shape[0], layout, True, tree)  # the groups do not depend on REML
    return tree_groups(obj, Z, ZtZ, outer_codes(factors))


def crossed_by_schur(layout: FactorLayout) -> bool:
    """Crossed factors that Schur fits by eliminating the one with most levels (no nesting tree)."""
    return plan_fit(layout).eliminates_one_factor


def tree_beside_dense(layout: FactorLayout) -> list | None:
    """The nesting tree that Schur eliminates beside factors it keeps dense, or None."""
    plan = plan_fit(layout)
    return plan.tree if plan.dense_beside_tree else None


def sums_design(X: np.ndarray, factors: list[RandomFactor]) -> np.ndarray:
    """The design whose sums the run's groups (`level_groups`) take: X, or the augmented U = [X, Z_R] for
    crossed factors (`schur_design`) and for a nesting tree beside dense factors (`tree_schur_design`),
    rows as given."""
    layout = FactorLayout.from_factors(factors)
    if crossed_by_schur(layout):
        return schur_design(X, random_effects_matrix(factors, layout), layout)
    if (tree := tree_beside_dense(layout)) is not None:
        return tree_schur_design(X, random_effects_matrix(factors, layout), layout, tree)
    return X


def outer_codes(factors: list[RandomFactor]) -> np.ndarray:
    """Each row's level of the outermost factor (the one batches are cut at, `level_order`)."""
    layout = FactorLayout.from_factors(factors)
    tree = nested_tree(layout) if len(factors) > 1 else None
    k = min(tree, key=lambda k: layout.n_levels[k]) if tree else int(np.argmax(layout.n_levels))
    return np.searchsorted(layout.levels[k], factors[k].labels).astype(np.int64)


class OutdirConflict(InputError):
    """outdir holds another analysis, or results that --force would overwrite."""


def _prepare_outdir(plan: RunPlan, force: bool) -> None:
    out = Path(plan.config.outdir)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    manifest = plan.workdir / MANIFEST_FILE
    if force:  # start clean: no partial result, map or record of an earlier run may survive
        shutil.rmtree(plan.workdir, ignore_errors=True)
        remove_run_outputs(out)
    else:
        if run_file.exists():
            previous = recorded_hash(run_file)
            if previous == plan.input_hash:
                raise OutdirConflict(
                    f"outdir {out} already holds this finished analysis (inputs hash {previous}); "
                    "use --force to run it again")
            raise OutdirConflict(
                f"outdir {out} holds a different analysis (inputs hash {previous}, now {plan.input_hash}); "
                "choose another outdir or use --force to overwrite it")
        if manifest.exists():
            previous = recorded_hash(manifest)
            if previous != plan.input_hash and _only_images_changed(plan, manifest):
                previous = plan.input_hash  # the batches of the changed images were discarded
            if previous != plan.input_hash:
                raise OutdirConflict(
                    f"outdir {out} holds an unfinished run of different inputs (hash {previous}, now "
                    f"{plan.input_hash}); its partial results cannot be mixed with these. "
                    "Use --force to discard them")
            if json.loads(manifest.read_text()).get("layout") != _layout_key(plan):
                shutil.rmtree(plan.workdir, ignore_errors=True)  # same inputs, other MAXMEM: start over
        elif holds_maps(out):
            raise OutdirConflict(f"outdir {out} already holds blmm maps from another run; use --force to overwrite them")
    plan.workdir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(manifest, json.dumps({
        "input_hash": plan.input_hash, "model_hash": model_hash(plan.config),
        "batch_hashes": batch_hashes(plan.config, plan.batches, plan.order), "layout": _layout_key(plan),
        "version": __version__}, indent=1))


def _only_images_changed(plan: RunPlan, manifest: Path) -> bool:
    """When only some images changed since the manifest (say a corrupt one was replaced), with the
    same model and layout: discard the partial sums of their batches and every block result, and
    say True, so the rerun keeps the other batches."""
    recorded = json.loads(manifest.read_text())
    then = recorded.get("batch_hashes")
    if (recorded.get("model_hash") != model_hash(plan.config) or recorded.get("layout") != _layout_key(plan)
            or not isinstance(then, list) or len(then) != len(plan.batches)):
        return False
    now = batch_hashes(plan.config, plan.batches, plan.order)
    for b, (old, new) in enumerate(zip(then, now)):
        if old != new:
            for path in (*batch_files(plan.workdir, b), *batch_touched_files(plan.workdir, b),
                         batch_counts_file(plan.workdir, b)):
                path.unlink(missing_ok=True)
    for k in range(len(plan.blocks)):
        block_file(plan.workdir, k).unlink(missing_ok=True)
    return True


def _layout_key(plan: RunPlan) -> list:
    return [list(map(list, plan.batches)), list(map(list, plan.blocks))]

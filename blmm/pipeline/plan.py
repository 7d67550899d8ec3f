"""Stage 1: plan a run (mask, batches, blocks, inputs hash) and prepare or resume the outdir."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blmm import __version__
from blmm.config import Config
from blmm.errors import InputError
from blmm.io.images import read_mask
from blmm.io.outdir import (
    MANIFEST_FILE,
    RUN_FILE,
    WORK_DIR,
    batch_counts_file,
    batch_files,
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
    batches: tuple  # (start, stop) image rows
    blocks: tuple  # (start, stop) positions in `voxels`
    input_hash: str
    timings: dict = field(default_factory=dict, compare=False)

    @property
    def n_stat_columns(self) -> int:
        return self.config.p + self.config.q + 1

    def __repr__(self) -> str:  # short: dask prints task arguments, errors name items
        return (f"RunPlan(outdir={str(self.config.outdir)!r}, {self.config.n} images, {self.voxels.size} voxels, "
                f"{len(self.batches)} batches, {len(self.blocks)} blocks)")


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


def batch_hashes(config: Config, batches) -> list[str]:
    """Per image batch: a hash of the size/mtime of its images (and data masks)."""
    hashes = []
    for start, stop in batches:
        h = hashlib.sha256()
        _hash_files(h, list(config.y_files[start:stop]) + list((config.data_mask_files or [])[start:stop]))
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
    # image batches run in parallel and each accumulates one partial file of V x (p+q+1)
    # sums, so their number follows the workers (and disk), not memory: a batch reads its
    # images in memory-sized chunks (image_chunk)
    # (the layout depends only on the inputs and MAXMEM, so a run resumes on any engine)
    partial_bytes = 8 * V * (config.p + config.q + 1)
    n_batches = int(max(1, min(4, n // 32, 2 * budget // max(partial_bytes, 1))))
    bounds = np.linspace(0, n, n_batches + 1).round().astype(int)
    batches = tuple((int(a), int(b)) for a, b in zip(bounds, bounds[1:]) if b > a)
    # voxel blocks: the summed statistics of a block plus the fit's working memory
    row_bytes = 8 * (config.p + config.q + 1) * 3 + n // 4
    per_block = max(1, min(V, budget // 2 // row_bytes, 20000))
    # blocks run in parallel: about a second of estimated work each, enough to share (cost.py)
    n_blocks = max(-(-V // per_block), min(config.maxnvb, blocks_for_work(config, V)))
    if config.voxel_batching:
        n_blocks = max(n_blocks, min(config.maxnvb, V))
    bounds = np.linspace(0, V, n_blocks + 1).round().astype(int)
    blocks = tuple((int(a), int(b)) for a, b in zip(bounds, bounds[1:]) if b > a)
    plan = RunPlan(config, Path(config.outdir) / WORK_DIR, voxels, batches, blocks, input_hash(config))
    _prepare_outdir(plan, force)
    return plan


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
        "batch_hashes": batch_hashes(plan.config, plan.batches), "layout": _layout_key(plan),
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
    now = batch_hashes(plan.config, plan.batches)
    for b, (old, new) in enumerate(zip(then, now)):
        if old != new:
            for path in (*batch_files(plan.workdir, b), batch_counts_file(plan.workdir, b)):
                path.unlink(missing_ok=True)
    for k in range(len(plan.blocks)):
        block_file(plan.workdir, k).unlink(missing_ok=True)
    return True


def _layout_key(plan: RunPlan) -> list:
    return [list(map(list, plan.batches)), list(map(list, plan.blocks))]

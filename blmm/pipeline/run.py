"""`blmm inputs.yml`: the stages composed, on an engine."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from blmm.version import __version__
from blmm.config import Config
from blmm.core.inference import sidedness
from blmm.core.varcorr import Spread, VarianceTerm, largest_component, variance_components
from blmm.errors import InputError
from blmm.io.outdir import (
    disk_full_as_error,
    load_map,
    outdir_lock,
    remove_run_outputs,
    unfinished_work,
    write_inputs,
    write_run_record,
)
from blmm.pipeline.corrections import CorrectionOutcome, run_corrections, write_corrections
from blmm.pipeline.cost import estimate_work
from blmm.pipeline.plan import RunPlan, loaded_plan, plan_run, shipped_plan
from blmm.pipeline.stages import (
    check_disk_space,
    fit_block,
    read_batch,
    run_centre,
    space_needed,
    volume_names,
    write_outputs,
)


@dataclass
class RunSummary:
    outdir: Path
    counts: dict
    timings: dict


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message says whether a rerun resumes, and from what."""


def run(config: Config, engine=None, force: bool = False, log=print) -> RunSummary:
    """Run the whole analysis on an engine: an open ``Engine``, or an ``EngineSpec`` opened here
    once the run is planned (kind ``auto``: inline or a local dask cluster, chosen from the
    plan's estimated work), or None (inline).

    One run per outdir: its lock refuses a second run into the same outdir (``OutdirLocked``).
    A run that fits no voxel removes what it wrote (an outdir it created goes too) and raises
    ``NothingFitted``."""
    out = Path(config.outdir)
    created = not out.exists()
    try:
        with outdir_lock(out, log):
            try:
                return _run_locked(config, engine, force, log)
            except KeyboardInterrupt:
                raise RunInterrupted(interrupted_text(out)) from None
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that wrote nothing leaves no empty outdir behind
        raise


def interrupted_text(outdir: Path) -> str:
    """What an interrupted run leaves: finished work a rerun resumes from, or nothing."""
    batches, blocks = unfinished_work(outdir)
    if not batches and not blocks:
        return "no image batch or voxel block had finished, so a rerun starts from the beginning"
    done = [f"{count} finished {what}" for count, what in
            ((batches, "image batch(es)"), (blocks, "voxel block(s)")) if count]
    return f"rerun the same command to resume from the {' and '.join(done)}"


def _run_locked(config: Config, engine, force: bool, log) -> RunSummary:
    """``run`` with outdir's lock held."""
    from blmm.engine import EngineSpec, open_engine
    from blmm.engine.choice import EngineChoice, choose_engine

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    plan = plan_run(config, force=force)
    check_disk_space(plan)
    timings["plan"] = time.perf_counter() - t0
    log(f"blmm: {config.n} images, {plan.voxels.size} voxels in the analysis mask, p = {config.p}, "
        f"{len(plan.batches)} image batch(es), {len(plan.blocks)} voxel block(s)")
    if config.formula is not None:
        log(config.formula.summary_line())
    for note in plan.basis.notes:  # lme4's "very different scales": the fit is exact regardless
        log(f"blmm: note: {note}")
    if engine is None:
        engine = EngineSpec(kind="inline")
    if not isinstance(engine, EngineSpec):  # opened by the caller
        log(EngineChoice(engine.spec, "opened by the caller").line)
        return _run_stages(plan, engine, {"reason": "opened by the caller"}, timings, t0, log)

    work = estimate_work(plan)
    choice = choose_engine(engine, work.total_seconds, tasks=len(plan.batches) + len(plan.blocks))
    log(choice.line)
    t = time.perf_counter()
    with open_engine(choice.spec) as opened:
        timings["engine_start"] = time.perf_counter() - t
        return _run_stages(plan, opened, {"reason": choice.reason, "estimated_work_s": work.record()},
                           timings, t0, log)


def _run_stages(plan: RunPlan, engine, engine_choice: dict, timings: dict, t0: float,
                log) -> RunSummary:
    """Stages 2-5 on an open engine."""
    timed(timings, "read", read_images, plan, engine)
    timed(timings, "fit", fit_blocks, plan, engine)
    counts = timed(timings, "write", write_outputs, plan)
    if counts["fitted"] == 0:  # a failed analysis: no maps, record or report stay behind
        shutil.rmtree(plan.workdir, ignore_errors=True)
        remove_run_outputs(plan.config.outdir)
        raise NothingFitted(nothing_fitted_text(counts))
    correction = timed(timings, "correct", run_corrections, plan, engine)
    timed(timings, "write_corrections", write_corrections, plan, correction)
    timings["total"] = time.perf_counter() - t0
    out = record_run(plan, engine, counts, timings, engine_choice, correction)
    _write_report(out, log)
    config = plan.config
    log(summary_text(counts, timings["total"], config.two_sided if any(c.is_t for c in config.contrasts) else None,
                     largest_variance(config)))
    return RunSummary(out, counts, timings)


def nothing_fitted_text(counts: dict) -> str:
    """Why no voxel of the analysis mask was fitted, reason by reason."""
    reasons = [f"{k} dropped: {why}" for why, k in counts["dropped"].items()]
    reasons += [f"{k} image values treated as missing: {why}" for why, k in counts.get("missing_values", {}).items()]
    return (f"no voxel could be fitted (of {counts['analysis_mask']} in the analysis mask): "
            + "; ".join(reasons) + "; nothing was written to outdir")


def largest_variance(config: Config) -> tuple[VarianceTerm, Spread] | None:
    """The largest variance component of the maps just written (median over fitted voxels);
    None when they cannot be read back (the run itself is finished: only the line goes)."""
    n = config.space.n_voxels
    try:
        D = load_map(config.outdir, "D", n_vertices=n)
        sigma2 = load_map(config.outdir, "sigma2", n_vertices=n)[:, 0]
    except (InputError, OSError, ValueError):
        return None
    variances, _ = variance_components(D, sigma2, [(f.name, list(f.column_names)) for f in config.factors])
    return largest_component(variances)


def timed(timings: dict, name: str, stage, *args):
    """Run one stage and note its wall time under ``name``."""
    t = time.perf_counter()
    result = stage(*args)
    timings[name] = time.perf_counter() - t
    return result


def read_images(plan: RunPlan, engine) -> RunPlan:
    """Stage 2 on the engine: every image batch's partial sums (the per-voxel centre first, once)."""
    run_centre(plan)
    shipped, tasks = shipped_plan(plan, engine), engine.tasks_per_process
    engine.map(_read_batch_task, [(shipped, b, tasks) for b in range(len(plan.batches))], stage="read images",
               labels=[f"image batch {b}: images {a + 1}-{z} of {plan.config.n}" for b, (a, z) in enumerate(plan.batches)])
    return plan


def fit_blocks(plan: RunPlan, engine) -> RunPlan:
    """Stage 3 on the engine: every voxel block fitted and tested."""
    shipped = shipped_plan(plan, engine)
    tasks = engine.tasks_per_process
    engine.map(_fit_block_task, [(shipped, k, tasks) for k in range(len(plan.blocks))], stage="fit and test",
               labels=[f"voxel block {k}: {z - a} voxels" for k, (a, z) in enumerate(plan.blocks)])
    return plan


def record_run(plan: RunPlan, engine, counts: dict, timings: dict, engine_choice: dict | None = None,
               correction: CorrectionOutcome | None = None) -> Path:
    """Stage 5: inputs.yml and blmm_run.json (last: it marks the run finished); the work folder goes."""
    config = plan.config
    out = Path(config.outdir)
    record = {
        "version": __version__,
        "input_hash": plan.input_hash,
        "settings": config.to_yaml_dict(),
        "n": config.n, "p": config.p,
        "factors": [{"name": f.name, "q": f.q, "levels": f.n_levels, "columns": list(f.column_names)}
                    for f in config.factors],
        "x_names": list(config.x_names),
        "contrasts": [{"name": c.name, "kind": "T" if c.is_t else "F"} for c in config.contrasts],
        "volumes": volume_names(config),
        "engine": getattr(engine, "kind", "inline"),
        "engine_workers": getattr(getattr(engine, "spec", None), "workers", None),
        "batches": len(plan.batches), "blocks": len(plan.blocks),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "counts": counts,
    }
    if engine_choice is not None:  # why this engine: asked for, or chosen from the estimated work
        record["engine_choice"] = engine_choice
    if config.formula is not None:
        record["formula"] = config.formula.record()
    if correction is not None:  # corrected inference: seed, B, blocks, tail, null maxima (docs/corrected.md)
        record["correction"] = correction.record()
    with disk_full_as_error(out, space_needed(plan)["total"], "the run record"):
        write_inputs(out, config.to_yaml_dict())
        write_run_record(out, record)
    shutil.rmtree(plan.workdir, ignore_errors=True)  # the maps are complete: partial sums go
    return out


class NothingFitted(InputError):
    """Every voxel was dropped (thresholds, safeMode, rank): a failed analysis, exit non-zero."""


def _write_report(outdir: Path, log) -> None:
    """outdir/report.html; a failure here must not fail an analysis whose maps are written."""
    try:
        from blmm.report import write_report
    except ImportError:
        return
    try:
        write_report(outdir)
    except Exception as exc:  # the report is a convenience; the maps are the results
        log(f"blmm: warning: could not write report.html: {type(exc).__name__}: {exc}")


def summary_text(counts: dict, seconds: float, two_sided: bool | None = None,
                 largest: tuple[VarianceTerm, Spread] | None = None) -> str:
    """The lines printed at the end of a run (docs/outputs.md); ``two_sided`` (None: no T contrast)
    states how the T maps' p were computed."""
    lines = [f"blmm: done in {seconds:.1f} s: {counts['fitted']} of {counts['analysis_mask']} voxels fitted, "
             f"{counts['converged']} converged"]
    if two_sided is not None:
        lines.append(f"  T contrasts: -log10 p {sidedness(two_sided)} (blmm_vox_conTlp); F contrasts: upper tail")
    if largest is not None:
        term, where = largest
        lines.append(f"  largest variance component: {term.label} (median variance {where.median:.4g} over "
                     f"{where.voxels} voxels, range {where.low:.4g} to {where.high:.4g}; report.html lists all)")
    for why, k in counts.get("not_converged_reasons", {}).items():
        lines.append(f"  {k} voxels fitted but not converged: {why} (blmm_vox_converged = 0)")
    if counts["boundary"]:
        lines.append(f"  {counts['boundary']} voxels have a singular random-effects covariance (boundary fit)")
    for why, k in counts["dropped"].items():
        lines.append(f"  {k} voxels dropped: {why}")
    for why, k in counts.get("missing_values", {}).items():
        lines.append(f"  {k} image values treated as missing: {why}")
    return "\n".join(lines)


def _read_batch_task(args) -> str:
    plan, b, tasks = args
    return read_batch(loaded_plan(plan), b, tasks)


def _fit_block_task(args) -> str:
    plan, k, tasks = args
    return fit_block(loaded_plan(plan), k, tasks)

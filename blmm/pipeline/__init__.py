"""`blmm inputs.yml`: images in, one map per statistic out.

Stages, each a function whose output the next one takes (``run`` only composes them):

1. ``plan_run(config)`` -> RunPlan (``plan``): the analysis mask, image batches and voxel
   blocks sized from MAXMEM, the work folder and the hash of the inputs (for resuming).
2. ``read_batch(plan, b)`` (``stages``): reads the images of batch b once and writes their
   partial sums X'Y, Z'Y, Y'Y (``blmm.core.sufficient``) and presence bits (atomically).
3. ``fit_block(plan, k)``: sums block k's rows of every partial in a fixed (batch) order,
   groups voxels by presence pattern, fits, infers, and writes the block's results.
4. ``write_outputs(plan)``: assembles the maps in the input's format; returns the counts.
5. ``run_corrections(plan, engine)`` (``corrections``): with a ``correction:`` section, FDR and
   the wild bootstrap's FWE, TFCE and cluster maps (docs/corrected.md); ``write_corrections``.
6. ``record_run(plan, ...)`` (``run``): inputs.yml and blmm_run.json, written last.

Batches and blocks run on an engine (``blmm.engine``), which ``run`` may open itself once the run
is planned: kind ``auto`` weighs ``estimate_work(plan)`` (``cost``) against a dask cluster's
start-up. A killed run restarts from the
finished batch and block files, which the manifest ties to the inputs' hash.
"""
from blmm.io.outdir import LLH64_FILE, RUN_FILE, WORK_DIR
from blmm.pipeline.cost import WorkEstimate, estimate_work
from blmm.pipeline.plan import OutdirConflict, RunPlan, input_hash, plan_run
from blmm.pipeline.run import NothingFitted, RunInterrupted, RunSummary, fit_blocks, read_images, record_run, run, summary_text
from blmm.pipeline.stages import (
    MISSING_REASONS,
    batch_files,
    check_disk_space,
    block_file,
    fit_block,
    missing_value_counts,
    read_batch,
    space_needed,
    write_outputs,
)

__all__ = [
    "LLH64_FILE", "MISSING_REASONS", "RUN_FILE", "WORK_DIR", "NothingFitted", "OutdirConflict", "RunInterrupted", "RunPlan",
    "RunSummary", "WorkEstimate", "batch_files", "block_file", "check_disk_space", "missing_value_counts", "space_needed", "estimate_work", "fit_block", "fit_blocks", "input_hash",
    "plan_run", "read_batch", "read_images", "record_run", "run", "summary_text", "write_outputs",
]

"""The correction stage's memory plan (``resample_memory``) and what its tasks carry.

A resample task's arrays must stay within the plan that sized its chunk: tracemalloc (which counts
numpy's allocations) measures one task on a volume of 1,200 voxels, against the plan's parts that
apply (its maps, a prepared block and its products, the maxima's passes, the layout, the prepared
blocks it keeps).  A small MAXMEM must pick smaller chunks, and a dask engine's resample tasks must
not carry the layout (dask warned of a 17.9 MiB graph on the 2 mm MNI volume).
"""
from __future__ import annotations

import pickle
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import blmm.pipeline.corrections as corrections
from blmm.core.resampling import GEMM_BATCH
from blmm.engine import EngineSpec, open_engine
from blmm.errors import InputError
from blmm.pipeline.plan import PickledPlan
from tests.core.resampling_simulation import family_design, simulate_Y
from tests.pipeline.test_corrections import fitted_stages, inline_engine, write_tables, write_volume_images

GRID = (12, 10, 10)  # 1,200 voxels: the maps and blocks, not Python's objects, make the task's memory
B = 255  # 256 resamples: two GEMM batches in one chunk
PYTHON_OBJECTS = 2**20  # beyond the planned arrays: the task's dicts, the npz index, numpy's scalars (1 MiB)


def medium_volume(root: Path, resamples: int = B) -> Path:
    rng = np.random.default_rng(11)
    design = family_design(rng, 28)
    n_voxels = int(np.prod(GRID))
    effect = np.zeros(n_voxels)
    effect[: n_voxels // 4] = 1.0
    Y = simulate_Y(rng, design, n_voxels, effect=effect) + 10.0
    write_volume_images(root, Y, GRID, ".nii")
    yml = root / "inputs.yml"
    yml.write_text("Y_files: Y_files.txt\n" + write_tables(root, design)
                   + f"correction:\n  resamples: {resamples}\n  tfce: true\n  seed: 3\n  cluster_threshold: 2\n")
    return yml


def with_maxmem(plan, maxmem: int):
    config = plan.config.__class__(**{**plan.config.__dict__, "maxmem": int(maxmem)})
    return plan.__class__(**{**plan.__dict__, "config": config})


@pytest.fixture(scope="module")
def prepared_stage(tmp_path_factory):
    """The fitted and prepared medium volume, once for this file (its tests remove their chunk files)."""
    plan = fitted_stages(medium_volume(tmp_path_factory.mktemp("medium")))
    for b in range(len(plan.batches)):
        corrections.store_data(plan, b)
    for lo, hi, k in corrections.correction_blocks(plan):
        corrections.prepare_block(plan, lo, hi, k)
    return plan, corrections.correction_layout(plan)


def maxmem_steps(plan, layout, tasks: int = 1) -> tuple[list[int], list[int]]:
    """MAXMEM from 2**31 down by 1% at a time while the stage accepts it, and each one's chunk size."""
    steps, sizes, maxmem = [], [], 2**31
    while True:
        try:
            sizes.append(corrections.resample_chunk_size(with_maxmem(plan, maxmem), layout, tasks))
        except InputError:
            return steps, sizes
        steps.append(maxmem)
        maxmem = maxmem * 99 // 100


def test_resample_task_allocates_within_its_memory_plan(prepared_stage):
    plan, layout = prepared_stage
    prepared = sum(corrections.unpickle_file(corrections.correction_prep_file(plan.workdir, lo, hi)).nbytes
                   for lo, hi, _ in corrections.correction_blocks(plan))
    steps, _ = maxmem_steps(plan, layout)
    for maxmem in (steps[0], steps[-1]):  # every block kept; the smallest MAXMEM accepted (few kept, small chunks)
        small = with_maxmem(plan, maxmem)
        size = corrections.resample_chunk_size(small, layout)
        memory = corrections.resample_memory(small, layout, size)
        corrections.PREPARED.clear()
        tracemalloc.start()
        try:
            corrections.resample_chunk(small, layout, 0, 0, size)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            corrections.correction_chunk_file(plan.workdir, 0).unlink(missing_ok=True)
        kept = corrections.PREPARED.nbytes
        corrections.PREPARED.clear()
        assert kept <= memory.cache and kept <= prepared
        planned = memory.maps + memory.block + memory.passes + memory.layout + min(memory.cache, prepared)
        assert memory.maps <= peak <= planned + PYTHON_OBJECTS, (maxmem, peak, memory)
        assert memory.running <= memory.budget * 3 // 4  # the chunk size the stage chose fits its share


def test_small_maxmem_picks_smaller_chunks_and_too_small_is_refused(prepared_stage):
    plan, layout = prepared_stage
    steps, sizes = maxmem_steps(plan, layout)
    assert sizes[0] == GEMM_BATCH  # 256 resamples, an eighth each at most, at least a GEMM batch
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < GEMM_BATCH, sizes
    for maxmem, size in zip(steps, sizes):
        small = with_maxmem(plan, maxmem)
        memory = corrections.resample_memory(small, layout, size)
        assert memory.running <= memory.budget * 3 // 4
        if size < GEMM_BATCH:  # the next size up would not have fitted
            assert corrections.resample_memory(small, layout, 2 * size).running > memory.budget * 3 // 4
    too_small = steps[-1] * 99 // 100
    with pytest.raises(InputError, match=f"MAXMEM: {too_small} bytes is too small for the correction's resamples"):
        corrections.resample_chunk_size(with_maxmem(plan, too_small), layout)


class PicklingEngine:
    """Runs a stage's tasks here, each item pickled and unpickled as dask sends it, recording its size;
    ``client`` set, so the stage ships its plan and layout as for a dask engine."""

    client = object()
    kind = "recording"
    tasks_per_process = 1

    def __init__(self) -> None:
        self.items: dict[str, list] = {}

    def map(self, fn, items, stage, retries=None, labels=None):
        sent = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self.items[stage] = [pickle.loads(data) for data in sent]
        self.items[stage + " bytes"] = [len(data) for data in sent]
        return [fn(pickle.loads(data)) for data in sent]


def test_dask_tasks_carry_the_plan_pickled_once_and_no_layout(tmp_path):
    plan = fitted_stages(medium_volume(tmp_path, resamples=63))
    with inline_engine() as engine:
        inline = corrections.run_corrections(plan, engine).maps
    for path in plan.workdir.glob("resamples*.npz"):
        path.unlink()
    engine = PicklingEngine()
    shipped = corrections.run_corrections(plan, engine).maps
    for name in inline:  # the maps do not depend on how the tasks got their plan and layout
        np.testing.assert_array_equal(shipped[name], inline[name], err_msg=name)
    plan_bytes = len(PickledPlan(plan).data)
    for stage in ("read images for resampling", "prepare resampling", "resample"):
        for item, size in zip(engine.items[stage], engine.items[stage + " bytes"]):
            assert isinstance(item[0], PickledPlan)
            assert size - plan_bytes < 1024, (stage, size, plan_bytes)  # beyond the plan: indices and a path
    layout_bytes = len(pickle.dumps(corrections.correction_layout(plan)))
    assert layout_bytes > 64 * 1024  # what each resample task carried before
    assert isinstance(engine.items["resample"][0][1], corrections.LayoutFile)


def test_two_tasks_in_one_process_share_its_budget(prepared_stage):
    """An inline engine of two threads runs two resample tasks in one process (the 2 mm MNI run peaked
    at 2.2 GiB under MAXMEM 2 GiB when each planned for the whole process): planned for two, both at
    once allocate within the process's budget, with one shared cache of prepared blocks."""
    plan, layout = prepared_stage
    steps, sizes = maxmem_steps(plan, layout, tasks=2)
    single_steps, single_sizes = maxmem_steps(plan, layout)
    assert single_steps[-1] < steps[-1]  # two tasks need more MAXMEM than one
    i = len(steps) // 2  # a MAXMEM where the chunks differ with the tasks per process
    while sizes[i] == corrections.resample_chunk_size(with_maxmem(plan, steps[i]), layout):
        i += 1
    small, size = with_maxmem(plan, steps[i]), sizes[i]
    memory = corrections.resample_memory(small, layout, size, tasks=2)
    alone = corrections.resample_memory(small, layout, corrections.resample_chunk_size(small, layout))
    assert memory.running <= memory.budget * 3 // 4
    assert 2 * alone.task + alone.layout + alone.cache > alone.budget  # planned for one, two overrun it
    corrections.PREPARED.clear()
    tracemalloc.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda c: corrections.resample_chunk(small, layout, c, c * size, (c + 1) * size, 2),
                          range(2)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        for c in range(2):
            corrections.correction_chunk_file(plan.workdir, c).unlink(missing_ok=True)
    kept = corrections.PREPARED.nbytes
    corrections.PREPARED.clear()
    assert kept <= memory.cache  # the cache is one, within its share, whichever thread filled it
    # the planned parts that apply, as for one task above: each task's maps, block and passes
    planned = 2 * (memory.maps + memory.block + memory.passes) + memory.layout + kept
    assert memory.maps <= peak <= planned + 2 * PYTHON_OBJECTS, (peak, memory)


def test_the_maps_do_not_depend_on_the_tasks_per_process(prepared_stage):
    """Two inline threads plan smaller chunks than one at the same MAXMEM; the maps are the same."""
    plan, layout = prepared_stage
    steps, sizes = maxmem_steps(plan, layout, tasks=2)
    maxmem = next(m for m, size in zip(steps, sizes)
                  if size < corrections.resample_chunk_size(with_maxmem(plan, m), layout))
    small = with_maxmem(plan, maxmem)
    maps, chunks = [], []
    for threads in (1, 2):
        for path in plan.workdir.glob("resamples*.npz"):
            path.unlink()
        with open_engine(EngineSpec(kind="inline", workers=threads)) as engine:
            assert engine.tasks_per_process == threads
            outcome = corrections.run_corrections(small, engine)
        maps.append(outcome.maps)
        chunks.append(outcome.chunks)
    for path in plan.workdir.glob("resamples*.npz"):
        path.unlink()
    assert chunks[1] > chunks[0]
    for name in maps[0]:
        np.testing.assert_array_equal(maps[1][name], maps[0][name], err_msg=name)

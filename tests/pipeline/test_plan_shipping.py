"""A dask engine's tasks get the plan pickled once (PickledPlan): same maps, one unpickling per process."""
from __future__ import annotations

import pickle

import numpy as np

from blmm.config import load_config
from blmm.pipeline import fit_block, plan_run, read_batch, run, write_outputs
from blmm.pipeline.plan import PickledPlan, loaded_plan
from tests.pipeline.test_pipeline import make_analysis
from tests.pipeline.test_resume import read_maps, small_maxmem

QUIET = dict(log=lambda *a: None)


def as_a_worker_receives(shipped: PickledPlan) -> PickledPlan:
    return pickle.loads(pickle.dumps(shipped))


def test_stages_on_a_pickled_plan_write_the_same_maps(tmp_path):
    clean = small_maxmem(make_analysis(tmp_path / "a", fmt="dat"), "out")
    run(load_config(clean), **QUIET)
    yml = small_maxmem(make_analysis(tmp_path / "b", fmt="dat"), "out")
    plan = plan_run(load_config(yml))
    shipped = PickledPlan(plan)
    assert len(plan.batches) > 2 and len(plan.blocks) > 2  # several tasks share one unpickled plan
    for b in range(len(plan.batches)):
        read_batch(loaded_plan(as_a_worker_receives(shipped)), b)
    for k in range(len(plan.blocks)):
        fit_block(loaded_plan(as_a_worker_receives(shipped)), k)
    write_outputs(plan)
    a, b = read_maps(tmp_path / "a" / "out"), read_maps(tmp_path / "b" / "out")
    assert a.keys() == b.keys()
    for name in a:  # the same inputs and arithmetic: byte for byte
        assert a[name] == b[name], name


def test_a_process_unpickles_each_run_plan_once(tmp_path):
    plan = plan_run(load_config(small_maxmem(make_analysis(tmp_path, fmt="dat"), "out")))
    shipped = PickledPlan(plan)
    first = loaded_plan(as_a_worker_receives(shipped))
    assert loaded_plan(as_a_worker_receives(shipped)) is first  # the next task: no unpickling
    assert first.input_hash == plan.input_hash and first.blocks == plan.blocks
    assert np.array_equal(first.voxels, plan.voxels)
    other = loaded_plan(as_a_worker_receives(PickledPlan(plan)))  # another run's plan is its own
    assert other is not first and other.blocks == plan.blocks
    assert loaded_plan(plan) is plan  # inline engines pass the plan itself

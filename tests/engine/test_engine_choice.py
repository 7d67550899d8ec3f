"""Kind ``auto``: inline (a thread per core) unless a local dask cluster is estimated to finish sooner."""
from __future__ import annotations

import pytest

from blmm.engine import EngineSpec
from blmm.engine.choice import (
    GIL_FRACTION,
    LOCAL_CLUSTER_START_SECONDS,
    TASK_SECONDS,
    WORKER_OVERHEAD,
    choose_engine,
    describe,
    finish_seconds,
)
from blmm.host import usable_cpu_count

#: the work (seconds on one core, no tasks) at which 8 threads and 8 worker processes finish together:
#: start / (inline's seconds per second of work - the cluster's)
BREAK_EVEN_8_CORES = LOCAL_CLUSTER_START_SECONDS / (GIL_FRACTION + (1 - GIL_FRACTION) / 8 - (1 + WORKER_OVERHEAD) / 8)


def test_finish_seconds_of_threads_and_of_a_local_cluster():
    seconds = finish_seconds(30.0, cores=2, tasks=10)
    assert seconds["inline"] == pytest.approx(30.0 * (GIL_FRACTION + (1 - GIL_FRACTION) / 2))
    assert seconds["local"] == pytest.approx(LOCAL_CLUSTER_START_SECONDS
                                             + (30.0 * (1 + WORKER_OVERHEAD) + 10 * TASK_SECONDS) / 2)
    assert finish_seconds(30.0, cores=1) == pytest.approx(
        {"inline": 30.0, "local": LOCAL_CLUSTER_START_SECONDS + 30.0 * (1 + WORKER_OVERHEAD)})


def test_a_short_run_goes_inline_on_a_thread_per_core_and_says_why():
    choice = choose_engine(EngineSpec.from_config(), serial_seconds=6.0, cores=2, tasks=12)
    assert choice.spec.kind == "inline" and choice.spec.workers == 2
    # 6 x 0.525 = 3.15 s inline; 4.5 + (6.3 + 0.12) / 2 = 7.71 s on the cluster
    assert choice.line == ("blmm: engine: inline, 2 threads (chosen: ~6 s of work on one core: about 3 s inline "
                           "(5% of it holding the GIL), 8 s on a local dask cluster (its ~4 s start-up, 5% more CPU "
                           "in its workers, 12 tasks); --cluster local to use one anyway)")


def test_design_2_on_two_cores_goes_inline():
    """ABCD design 2 from files (issue 21): ~201 s of estimated work in 64 tasks on 2 cores ran faster inline
    (69.0 s wall, 127.8 s CPU) than on the local cluster the choice used to pick (70.2 s, 133.3 s)."""
    choice = choose_engine(EngineSpec("auto"), serial_seconds=200.8, cores=2, tasks=64)
    assert choice.spec.kind == "inline"
    # 200.8 x 0.525 = 105.4 s inline; 4.5 + (210.84 + 0.64) / 2 = 110.2 s on the cluster
    assert "about 105 s inline" in choice.line and "110 s on a local dask cluster" in choice.line


def test_two_cores_never_pay_for_a_cluster():
    """On 2 cores a worker process's overhead costs what the GIL costs a thread: the start-up decides."""
    for work in (10.0, 1e3, 1e5):
        seconds = finish_seconds(work, cores=2)
        assert seconds["local"] - seconds["inline"] == pytest.approx(
            LOCAL_CLUSTER_START_SECONDS + work * ((1 + WORKER_OVERHEAD) / 2 - GIL_FRACTION - (1 - GIL_FRACTION) / 2))
        assert choose_engine(EngineSpec("auto"), work, cores=2).spec.kind == "inline"


def test_the_choice_turns_at_the_break_even_work():
    assert BREAK_EVEN_8_CORES == pytest.approx(120.0)  # 4.5 / (0.16875 - 0.13125), with the constants measured
    below = choose_engine(EngineSpec("auto"), BREAK_EVEN_8_CORES * 0.95, cores=8)
    above = choose_engine(EngineSpec("auto", retries=4), BREAK_EVEN_8_CORES * 1.05, cores=8)
    assert below.spec.kind == "inline" and below.spec.workers == 8
    assert above.spec.kind == "local" and above.spec.retries == 4 and above.spec.workers is None
    assert describe(above.spec) == f"local dask cluster, {usable_cpu_count()} worker" + (
        "s" if usable_cpu_count() > 1 else "")


def test_many_tasks_make_the_cluster_later():
    """Each task costs the cluster TASK_SECONDS of its CPU: 6,000 tasks on 8 cores move the turn by
    6,000 x 0.01 / 8 / 0.0375 = 200 s of work."""
    work = BREAK_EVEN_8_CORES + 150.0
    assert choose_engine(EngineSpec("auto"), work, cores=8).spec.kind == "local"
    assert choose_engine(EngineSpec("auto"), work, cores=8, tasks=6000).spec.kind == "inline"


def test_one_core_never_pays_for_a_cluster():
    choice = choose_engine(EngineSpec("auto"), serial_seconds=3600.0, cores=1)
    assert choice.spec.kind == "inline" and describe(choice.spec) == "inline, 1 thread"


@pytest.mark.parametrize("kind", ["local", "inline", "slurm"])
def test_an_engine_asked_for_is_kept(kind):
    spec = EngineSpec(kind, workers=3)
    choice = choose_engine(spec, serial_seconds=1.0, cores=2)
    assert choice.spec is spec and choice.reason == "as asked"


def test_without_an_estimate_auto_is_a_local_cluster():
    choice = choose_engine(EngineSpec("auto"))
    assert choice.spec.kind == "local" and "no estimate" in choice.reason


def test_upstream_clustertype_local_is_chosen_like_blmms_own_inputs_and_says_so():
    spec = EngineSpec.from_config("local", None, {}, {})
    short = choose_engine(spec, serial_seconds=6.0, cores=2)
    assert short.spec.kind == "inline" and short.spec.workers == 2
    assert short.line.startswith("blmm: engine: inline, 2 threads (chosen: the inputs file's clusterType: local, "
                                 "read as 'this machine'; ~6 s of work on one core")
    assert choose_engine(spec, serial_seconds=3600.0, cores=8).spec.kind == "local"


def test_auto_with_workers_uses_at_most_that_many():
    choice = choose_engine(EngineSpec("auto", workers=1), serial_seconds=3600.0, cores=8)
    assert choice.spec.kind == "inline" and choice.spec.workers == 1  # one core: never a cluster


def test_usable_cpu_count_is_dasks_count_of_usable_cpus() -> None:
    """Counted without importing dask, the CPUs are those dask counts (affinity, cgroup quota)."""
    from dask.system import CPU_COUNT

    assert usable_cpu_count() == CPU_COUNT

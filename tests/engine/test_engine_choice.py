"""Kind ``auto``: inline (a thread per core) when a local dask cluster's start-up would not pay off."""
from __future__ import annotations

import pytest

from blmm.engine import EngineSpec
from blmm.engine.choice import (
    LOCAL_CLUSTER_START_SECONDS,
    THREAD_EFFICIENCY,
    choose_engine,
    describe,
    finish_seconds,
)
from blmm.host import usable_cpu_count

#: the work (seconds on one core) at which 2 threads and 2 worker processes finish together
BREAK_EVEN_2_CORES = LOCAL_CLUSTER_START_SECONDS / (1 / (1 + THREAD_EFFICIENCY) - 1 / 2)


def test_finish_seconds_of_threads_and_of_a_local_cluster():
    seconds = finish_seconds(30.0, cores=2)
    assert seconds["inline"] == pytest.approx(30.0 / (1 + THREAD_EFFICIENCY))
    assert seconds["local"] == pytest.approx(LOCAL_CLUSTER_START_SECONDS + 15.0)
    assert finish_seconds(30.0, cores=1) == pytest.approx({"inline": 30.0, "local": LOCAL_CLUSTER_START_SECONDS + 30.0})


def test_a_short_run_goes_inline_on_a_thread_per_core_and_says_why():
    choice = choose_engine(EngineSpec.from_config(), serial_seconds=6.0, cores=2)
    assert choice.spec.kind == "inline" and choice.spec.workers == 2
    assert choice.line.startswith("blmm: engine: inline, 2 threads (chosen: ~6 s of work on one core: "
                                  "about 4 s inline, 8 s on a local dask cluster")
    assert choice.line.endswith("--cluster local to use one anyway)")


def test_the_choice_turns_at_the_break_even_work():
    assert 20 < BREAK_EVEN_2_CORES < 60  # a few tens of seconds of work, with the constants measured
    below = choose_engine(EngineSpec("auto"), BREAK_EVEN_2_CORES * 0.95, cores=2)
    above = choose_engine(EngineSpec("auto", retries=4), BREAK_EVEN_2_CORES * 1.05, cores=2)
    assert below.spec.kind == "inline"
    assert above.spec.kind == "local" and above.spec.retries == 4 and above.spec.workers is None
    assert describe(above.spec) == f"local dask cluster, {usable_cpu_count()} worker" + (
        "s" if usable_cpu_count() > 1 else "")


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
    assert choose_engine(spec, serial_seconds=3600.0, cores=2).spec.kind == "local"


def test_auto_with_workers_uses_at_most_that_many():
    choice = choose_engine(EngineSpec("auto", workers=1), serial_seconds=3600.0, cores=2)
    assert choice.spec.kind == "inline" and choice.spec.workers == 1  # one core: never a cluster


def test_usable_cpu_count_is_dasks_count_of_usable_cpus() -> None:
    """Counted without importing dask, the CPUs are those dask counts (affinity, cgroup quota)."""
    from dask.system import CPU_COUNT

    assert usable_cpu_count() == CPU_COUNT

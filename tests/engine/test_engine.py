"""The engine on the inline runner and a local dask cluster (no batch scheduler needed)."""
from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from blmm.engine import (
    Engine,
    EngineError,
    EngineSpec,
    EngineSpecError,
    _Progress,
    _exit_on_signal,
    jobqueue_kwargs,
    open_engine,
)
from blmm.engine.clusters import KEEP_MALLOC_ADAPTIVE, WORKER_PROFILE_OFF
from blmm.errors import BlmmError, InputError

LOCAL = dict(dashboard_address="127.0.0.1:0", progress="off", start_timeout=60)


# ---- task functions (module level: they are pickled to the workers) -------------------

def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("item three is bad")
    return x


def fail_first_time(args: tuple[int, str]) -> int:
    """Raises on the first attempt for each item: a marker file remembers the attempt."""
    x, marker_dir = args
    marker = Path(marker_dir) / f"attempted-{x}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"transient failure of {x}")
    return x * 10


def kill_worker_first_time(args: tuple[int, str]) -> int:
    """Kills its own worker process on the first attempt of item 2."""
    x, marker_dir = args
    marker = Path(marker_dir) / f"killed-{x}"
    if x == 2 and not marker.exists():
        marker.touch()
        os._exit(1)
    return x + 100


def bad_input_counting_attempts(args: tuple[int, str]) -> int:
    """A deterministic input error: a marker file per attempt counts how often it ran."""
    x, marker_dir = args
    if x == 1:
        attempts = len(list(Path(marker_dir).glob("attempt-*")))
        (Path(marker_dir) / f"attempt-{attempts}").touch()
        raise InputError(f"/data/img{x}.nii: truncated")
    return x


def worker_settings(_) -> tuple[bool, str | None]:
    """What a worker runs with: dask's stack-sampling profiler on?, and glibc's trim threshold."""
    import dask

    return dask.config.get("distributed.worker.profile.enabled"), os.environ.get("MALLOC_TRIM_THRESHOLD_")


def kill_worker_always(x: int) -> int:
    if x == 1:
        os._exit(1)
    return x


def blas_threads_after_a_while(x):
    """The BLAS threads this task sees once the other tasks of its process have started and ended."""
    from threadpoolctl import threadpool_info
    time.sleep(0.2 * (x % 3))
    return sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})


# ---- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local2():
    with open_engine(EngineSpec("local", workers=2, retries=1, **LOCAL)) as engine:
        yield engine


@pytest.fixture()
def inline() -> Engine:
    return open_engine(EngineSpec("inline", retries=1, progress="off"))


# ---- inline ------------------------------------------------------------------------------

def test_inline_map_keeps_order(inline):
    assert inline.map(square, range(10), "squares") == [i * i for i in range(10)]
    assert inline.map(square, [], "nothing") == []


def test_inline_error_names_stage_and_item(inline):
    message = r"stage check: item 3 \(3\) failed after 2 attempt"
    with pytest.raises(EngineError, match=message) as err:
        inline.map(fail_on_three, range(6), "check")
    assert err.value.stage == "check" and err.value.item_index == 3
    assert isinstance(err.value.__cause__, ValueError)


def test_inline_retries_a_transient_failure(inline, tmp_path):
    items = [(i, str(tmp_path)) for i in range(4)]
    assert inline.map(fail_first_time, items, "flaky") == [0, 10, 20, 30]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(EngineError, match="stage no-retry: item 0 .* 1 attempt"):
        inline.map(fail_first_time, [(0, str(fresh))], "no-retry", retries=0)


def test_inline_input_error_is_not_retried(inline, tmp_path):
    with pytest.raises(InputError, match=r"^/data/img1.nii: truncated$"):
        inline.map(bad_input_counting_attempts, [(i, str(tmp_path)) for i in range(3)], "read",
                   labels=["a", "b", "c"])
    assert len(list(tmp_path.glob("attempt-*"))) == 1


_pair = threading.Barrier(2, timeout=10)


def meet_another_thread(x: int) -> int:
    """Returns only when two items run at the same time (else the barrier times out)."""
    _pair.wait()
    return x + 1


def test_inline_threads_run_items_at_once_in_order_with_the_same_errors(tmp_path):
    with open_engine(EngineSpec("inline", workers=2, retries=1, progress="off")) as threaded:
        assert threaded.map(meet_another_thread, range(6), "pairs") == [1, 2, 3, 4, 5, 6]
        items = [(i, str(tmp_path)) for i in range(5)]
        assert threaded.map(fail_first_time, items, "flaky") == [0, 10, 20, 30, 40]  # each retried once
        with pytest.raises(EngineError, match=r"stage check: item 3 \(3\) failed after 2 attempt") as err:
            threaded.map(fail_on_three, range(8), "check")
        assert err.value.item_index == 3 and isinstance(err.value.__cause__, ValueError)
        with pytest.raises(InputError, match=r"^/data/img1.nii: truncated$"):
            threaded.map(bad_input_counting_attempts, [(i, str(tmp_path)) for i in range(3)], "read")
    assert len(list(tmp_path.glob("attempt-*"))) == 1  # not retried


def test_inline_progress_says_how_many_threads(monkeypatch):
    import blmm.engine.inline as inline_module
    stream = io.StringIO()
    monkeypatch.setattr(inline_module, "_Progress", lambda *a: _Progress(*a, stream=stream))
    assert inline_module.inline_map(square, list(range(4)), "squares", 0, "lines", threads=2) == [0, 1, 4, 9]
    assert inline_module.inline_map(square, [3], "one", 0, "lines", threads=2) == [9]
    lines = stream.getvalue().splitlines()
    assert lines[0] == "blmm: stage squares: 4 tasks started inline (this process, 2 threads)"
    assert lines[1].startswith("blmm: stage squares: done, 4/4 tasks in ")
    assert lines[2] == "blmm: stage one: 1 tasks started inline (this process)"  # one item: no pool


# ---- local cluster ---------------------------------------------------------------------

def test_local_map_keeps_order(local2):
    assert local2.map(square, range(25), "squares") == [i * i for i in range(25)]
    assert local2.n_workers == 2


def test_local_workers_run_without_the_profiler_and_with_glibcs_adaptive_threshold(local2):
    # the profiler cost 5-7% of a worker's CPU in design 2's fit; dask's trim threshold 1.7x (docs/performance.md)
    assert local2.map(worker_settings, range(4), "settings") == [(False, None)] * 4


def test_a_worker_with_two_threads_runs_each_task_with_one_blas_thread():
    """Two tasks at once per process: each task one BLAS thread (two each would oversubscribe the cores), and
    none sees the limit lifted when another task of its process ends (the limit is process-wide)."""
    with open_engine(EngineSpec("local", workers=1, cores=2, retries=1, **LOCAL)) as engine:
        assert engine.tasks_per_process == 2
        assert engine.map(blas_threads_after_a_while, range(8), "blas") == [[1]] * 8


def test_local_error_names_stage_and_item(local2):
    with pytest.raises(EngineError, match=r"stage validate: item 3 \(3\) failed after 2 attempt"
                       r".*ValueError: item three is bad") as err:
        local2.map(fail_on_three, range(8), "validate")
    assert err.value.item_index == 3
    assert "item three is bad" in err.value.remote_traceback
    assert local2.map(square, range(3), "after-failure") == [0, 1, 4]  # engine still usable


def test_local_retries_a_transient_failure(local2, tmp_path):
    items = [(i, str(tmp_path)) for i in range(6)]
    assert local2.map(fail_first_time, items, "flaky") == [i * 10 for i in range(6)]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(EngineError, match="stage no-retry: item 0 .* 1 attempt"):
        local2.map(fail_first_time, [(0, str(fresh))], "no-retry", retries=0)


def test_local_input_error_is_not_retried_and_raised_as_it_is(local2, tmp_path):
    with pytest.raises(InputError, match=r"^/data/img1.nii: truncated$"):
        local2.map(bad_input_counting_attempts, [(i, str(tmp_path)) for i in range(3)], "read")
    assert len(list(tmp_path.glob("attempt-*"))) == 1
    assert local2.map(square, range(3), "after-refusal") == [0, 1, 4]


def test_labels_name_the_failing_item(local2):
    with pytest.raises(EngineError, match=r"stage validate: item 3 \(batch three\) failed after 2 attempt"):
        local2.map(fail_on_three, range(5), "validate", labels=[f"batch {w}" for w in
                                                                 ("zero", "one", "two", "three", "four")])


def test_local_task_whose_worker_dies_is_rerun(local2, tmp_path):
    items = [(i, str(tmp_path)) for i in range(6)]
    assert local2.map(kill_worker_first_time, items, "dying") == [i + 100 for i in range(6)]
    assert (tmp_path / "killed-2").exists()


def test_local_worker_that_keeps_dying_fails_the_stage(local2):
    with pytest.raises(EngineError, match=r"stage doomed: item 0 \(1\) failed: the worker "
                                          r"running it died 2 times"):
        local2.map(kill_worker_always, [1], "doomed")


def test_exit_closes_the_cluster_on_exception_and_interrupt():
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with open_engine(EngineSpec("local", workers=1, **LOCAL)) as engine:
                raise error
        assert engine.cluster.status.name == "closed"
        assert engine.client.status == "closed"


def test_sigterm_closes_the_cluster():
    before = signal.getsignal(signal.SIGTERM)
    if before not in (signal.SIG_DFL, _exit_on_signal):  # another engine may hold it
        pytest.skip("SIGTERM has a foreign handler in this process")
    with pytest.raises(SystemExit):
        with open_engine(EngineSpec("local", workers=1, **LOCAL)) as engine:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert engine.cluster.status.name == "closed"
    assert signal.getsignal(signal.SIGTERM) is before


# ---- progress ---------------------------------------------------------------------------

def test_progress_lines_when_not_a_tty(capsys):
    with open_engine(EngineSpec("inline", progress="auto")) as engine:
        engine.map(square, range(3), "squares")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("blmm: stage squares: 3 tasks started")
    assert lines[1].startswith("blmm: stage squares: done, 3/3 tasks in")


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty():
    stream = _FakeTTY()
    progress = _Progress("batch", 4, "auto", "on 2 worker(s)", stream=stream)
    progress.start()
    for _ in range(4):
        progress.advance()
    progress.finish(ok=True)
    text = stream.getvalue()
    assert "\rbatch |" in text and "0/4" in text and "4/4 100%" in text
    assert text.rstrip().endswith("tasks in 0.0 s")


# ---- spec ---------------------------------------------------------------------------------

def test_from_config_precedence_cli_over_yaml_over_upstream_keys():
    spec = EngineSpec.from_config(
        "SLURM", 8,
        {"memory": "16GB", "walltime": "02:00:00", "job-extra-directives": ["--exclusive"],
         "queue": "short"},
        {"queue": "long", "workers": None, "retries": 5},
    )
    assert spec.kind == "slurm" and spec.workers == 8
    assert spec.memory == "16GB" and spec.walltime == "02:00:00"
    assert spec.job_extra_directives == ["--exclusive"]
    assert spec.queue == "long" and spec.retries == 5      # CLI wins, None is "not given"
    assert spec.cores is None and spec.account is None     # left to dask's config

    cli = EngineSpec.from_config("slurm", 8, {"workers": 8}, {"cluster": "sge", "workers": "3"})
    assert cli.kind == "sge" and cli.workers == 3
    section = EngineSpec.from_config("slurm", 1, {"workers": 6, "walltime": 90}, {})
    assert section.workers == 6                  # the cluster: section beats numNodes
    assert section.walltime == "01:30:00"        # a number is minutes (SGE would read seconds)
    # nothing says where to run: blmm chooses (auto); a dask setting alone means a local cluster
    assert EngineSpec.from_config().kind == "auto"
    assert EngineSpec.from_config(None, None, {}, {"retries": 3, "progress": "off"}).kind == "auto"
    assert EngineSpec.from_config(None, None, {"workers": 2}, {}).kind == "local"
    # upstream's clusterType: local means "this machine": blmm chooses inline or a local cluster
    upstream_local = EngineSpec.from_config("local", None, {}, {})
    assert upstream_local.kind == "auto" and "clusterType: local" in upstream_local.kind_from
    assert EngineSpec.from_config("local", 2, {}, {}).workers == 2
    assert EngineSpec.from_config("local", None, {}, {"cluster": "local"}).kind == "local"  # --cluster local
    assert EngineSpec.from_config("local", None, {"kind": "local"}, {}).kind == "local"
    assert EngineSpec.from_config("local", None, {"memory": "4GB"}, {}).kind == "local"  # a dask setting


def test_from_config_rejects_bad_settings():
    with pytest.raises(EngineSpecError, match="unknown setting 'cpus' in the YAML 'cluster:'"):
        EngineSpec.from_config("slurm", 2, {"cpus": 4}, {})
    assert issubclass(EngineSpecError, InputError) and issubclass(EngineError, BlmmError)
    with pytest.raises(ValueError, match="unknown cluster kind 'kubernetes'"):
        EngineSpec.from_config("kubernetes", 1, {}, {})
    with pytest.raises(ValueError, match="workers must be an integer"):
        EngineSpec(kind="local", workers="many")
    with pytest.raises(ValueError, match="retries must be >= 0"):
        EngineSpec(kind="local", retries=-1)


def test_only_set_resources_are_passed_so_dask_config_fills_the_rest():
    import dask
    from dask_jobqueue import SLURMCluster

    spec = EngineSpec("sge", cores=2, account="neuro", job_extra_directives="-S /bin/bash")
    assert jobqueue_kwargs(spec) == {"cores": 2, "project": "neuro", "job_extra_directives": ["-S /bin/bash"],
                                     "job_script_prologue": [KEEP_MALLOC_ADAPTIVE, WORKER_PROFILE_OFF]}
    slurm = EngineSpec("slurm", cores=2, memory="2GB", interface="lo", account="neuro")
    with dask.config.set({"jobqueue.slurm.walltime": "01:23:45", "jobqueue.slurm.queue": "gpu",
                          "jobqueue.slurm.job-script-prologue": ["module load python"]}):
        cluster = SLURMCluster(**jobqueue_kwargs(slurm),
                               scheduler_options={"dashboard_address": "127.0.0.1:0"})
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "#SBATCH -t 01:23:45" in script and "#SBATCH -p gpu" in script  # from dask config
    assert "--cpus-per-task=2" in script and "#SBATCH -A neuro" in script   # from the spec
    # glibc's adaptive mmap threshold kept in the workers, after which the config's prologue still runs
    assert script.index(KEEP_MALLOC_ADAPTIVE) < script.index("module load python")
    assert script.index(WORKER_PROFILE_OFF) < script.index("module load python")  # no stack sampling in workers
    with pytest.raises(EngineSpecError, match="queue is not supported for htcondor"):
        jobqueue_kwargs(EngineSpec("htcondor", queue="short"))


@pytest.mark.parametrize("spec, tasks", [
    (EngineSpec(kind="inline"), 1),
    (EngineSpec(kind="inline", workers=2), 2),  # its threads share the process
    (EngineSpec(kind="local", workers=4), 1),  # a worker per core, one thread each
    (EngineSpec(kind="local", workers=2, cores=3), 3),
    (EngineSpec(kind="slurm", cores=8, processes=2, memory="8GB"), 4),  # dask-jobqueue: cores / processes
])
def test_tasks_per_process_is_what_shares_a_process_memory(spec, tasks):
    assert Engine(spec).tasks_per_process == tasks

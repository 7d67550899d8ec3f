"""Engine: runs blmm's per-batch work on a dask cluster (local or a batch scheduler).

* ``spec``: EngineSpec, the engine kinds and the cluster settings, checked once;
* ``clusters``: starting and stopping a LocalCluster or a dask-jobqueue cluster;
* ``runner``: Engine (map on a dask cluster, the wait loop, shutdown) and open_engine;
* ``inline``: the in-process runner (no dask);
* ``signals``: SIGTERM/SIGHUP as SystemExit while an engine is open;
* ``progress``: the progress bar or lines of a stage.
"""
from blmm.engine.clusters import jobqueue_kwargs
from blmm.engine.progress import _Progress
from blmm.engine.runner import Engine, open_engine
from blmm.engine.signals import _exit_on_signal
from blmm.engine.spec import (
    BATCH_KINDS,
    CLUSTER_FIELDS,
    CLUSTER_RULES,
    KINDS,
    PROGRESS_MODES,
    EngineError,
    EngineSpec,
    EngineSpecError,
)

__all__ = [
    "BATCH_KINDS", "CLUSTER_FIELDS", "CLUSTER_RULES", "KINDS", "PROGRESS_MODES", "Engine", "EngineError", "EngineSpec",
    "EngineSpecError", "jobqueue_kwargs", "open_engine", "_Progress", "_exit_on_signal",
]

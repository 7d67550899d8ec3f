"""What engine to run on: ``EngineSpec``, built from the YAML ``cluster:`` section, upstream's
``clusterType``/``numNodes`` and command-line overrides, and checked once, here.

The engine kinds (``KINDS``, ``BATCH_KINDS``) and the settings a ``cluster:`` section may
hold, with the rule each follows (``CLUSTER_RULES``, ``CLUSTER_FIELDS``), are defined here
and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from blmm.errors import BlmmError, InputError

#: Engine kinds: this machine, inline or a local dask cluster, whichever is estimated to finish
#: sooner (``auto``, engine.choice); no dask; a dask LocalCluster; the dask-jobqueue batch schedulers.
BATCH_KINDS = ("slurm", "sge", "pbs", "lsf", "htcondor", "oar", "moab")
KINDS = ("auto", "inline", "local") + BATCH_KINDS
#: settings that say nothing about where to run: given alone, the engine is still chosen (``auto``)
ENGINE_NEUTRAL_FIELDS = ("retries", "progress")

_JOBQUEUE_CLASS_NAMES = {
    "slurm": "SLURMCluster",
    "sge": "SGECluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
    "oar": "OARCluster",
    "moab": "MoabCluster",
}
# The keyword each dask-jobqueue class uses for the accounting project/account (-A / -P).
_ACCOUNT_KWARG = {
    "slurm": "account",
    "pbs": "account",
    "moab": "account",
    "sge": "project",
    "lsf": "project",
    "oar": "project",
}
# Batch settings a scheduler has no keyword for (HTCondor has neither queues nor walltime).
_UNSUPPORTED = {"htcondor": ("queue", "walltime", "account")}

PROGRESS_MODES = ("auto", "bar", "lines", "off")


class EngineError(BlmmError, RuntimeError):
    """A stage could not be run: cluster start-up failed, or an item kept failing."""

    def __init__(self, message: str, *, stage: str | None = None, item_index: int | None = None,
                 remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.item_index = item_index
        self.remote_traceback = remote_traceback


class EngineSpecError(InputError, ValueError):
    """An engine setting (YAML ``cluster:`` section or command line) is unusable."""



@dataclass(frozen=True)
class SettingRule:
    """What one setting of a YAML ``cluster:`` section must be.

    kind: "choice" (one of ``KINDS``), "integer" / "number" (>= ``minimum``, or > it when
    ``strict``), "size" (a non-empty string or a positive number; ``example`` shows one),
    "text" (a non-empty string) or "strings" (a list of strings).
    """

    kind: str
    minimum: float | None = None
    strict: bool = False
    example: str | None = None


_TEXT = SettingRule("text")
_STRINGS = SettingRule("strings")

#: the EngineSpec fields a YAML ``cluster:`` section may set, and the rule each one follows:
#: the one definition of these rules (``config`` reports against them, ``EngineSpec`` enforces them)
CLUSTER_RULES: dict[str, SettingRule] = {
    "kind": SettingRule("choice"),
    "workers": SettingRule("integer", minimum=1),
    "cores": SettingRule("integer", minimum=1),
    "processes": SettingRule("integer", minimum=1),
    # dask-jobqueue spellings: "16GB", "01:30:00"; a bare number is bytes / minutes.
    "memory": SettingRule("size", example="'16GB'"),
    "walltime": SettingRule("size", example="'02:00:00'"),
    "queue": _TEXT,
    "account": _TEXT,
    "job_extra_directives": _STRINGS,
    "job_script_prologue": _STRINGS,
    "job_name": _TEXT,
    "log_directory": _TEXT,
    "local_directory": _TEXT,
    "python": _TEXT,
    "interface": _TEXT,
    "retries": SettingRule("integer", minimum=0),
    "start_timeout": SettingRule("number", minimum=0, strict=True),
}
CLUSTER_FIELDS = tuple(CLUSTER_RULES)


# --------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------

@dataclass
class EngineSpec:
    """What to run on.  ``None`` means "not set": dask's own config then decides.

    kind: one of ``KINDS``; ``auto`` is resolved from the run's estimated work
        (``engine.choice.choose_engine``) before an engine is opened.
    workers: for ``inline``, threads running a stage's items at once (default 1); else
        dask workers to scale to (upstream ``numNodes``: ``cluster.scale(workers)``;
        a batch job holds ``processes`` workers).  ``local`` default: one worker per
        usable CPU; batch default: 1.
    cores, processes, memory, walltime, queue, account, job_extra_directives,
        job_script_prologue, job_name, log_directory, local_directory, python, interface:
        as in dask-jobqueue (``account`` is ``-A`` on SLURM/PBS/Moab and the project
        ``-P`` on SGE/LSF/OAR; a number as ``memory`` is bytes, as ``walltime`` minutes).
        For ``local``, ``cores`` is threads per worker and ``memory`` the memory limit
        per worker; batch-only settings are ignored.
    dashboard_address: e.g. ``"127.0.0.1:0"`` (random free port on loopback).
    retries: how many times an item is re-run after an exception, or after its worker
        or job died, before the stage fails.
    start_timeout: seconds to wait for the first worker (default 120 s local, 3600 s
        batch); also the longest a stage may run with no worker connected.
    progress: "auto" (bar on a TTY, else a line per stage start/end), "bar", "lines", "off".
    cluster_kwargs: extra keyword arguments for the cluster class, passed verbatim
        (they win over the fields above).
    """

    kind: str = "local"
    workers: int | None = None
    cores: int | None = None
    processes: int | None = None
    memory: str | int | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] | None = None
    job_script_prologue: list[str] | None = None
    job_name: str | None = None
    log_directory: str | None = None
    local_directory: str | None = None
    python: str | None = None
    interface: str | None = None
    dashboard_address: str | None = None
    retries: int = 2
    start_timeout: float | None = None
    progress: str = "auto"
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    kind_from: str = ""  # where kind auto came from, when not from nothing (said in the choice's line)

    def __post_init__(self) -> None:
        self.kind = str(self.kind).strip().lower()
        if self.kind not in KINDS:
            raise EngineSpecError(f"unknown cluster kind {self.kind!r}; "
                                  f"expected one of {', '.join(KINDS)}")
        for name in ("workers", "cores", "processes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_int(value, name, minimum=int(CLUSTER_RULES[name].minimum)))
        self.retries = _as_int(self.retries, "retries", minimum=int(CLUSTER_RULES["retries"].minimum))
        if isinstance(self.walltime, (int, float)) and not isinstance(self.walltime, bool):
            self.walltime = _minutes_to_walltime(self.walltime)
        if self.start_timeout is not None:
            self.start_timeout = float(self.start_timeout)
            if not self.start_timeout > CLUSTER_RULES["start_timeout"].minimum:
                raise EngineSpecError(f"start_timeout must be > 0 seconds, "
                                      f"got {self.start_timeout}")
        for name in ("job_extra_directives", "job_script_prologue"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single directive written as a plain YAML string
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, [str(v) for v in value])
        if self.progress not in PROGRESS_MODES:
            raise EngineSpecError(f"progress must be one of {PROGRESS_MODES}, "
                                  f"got {self.progress!r}")
        self.cluster_kwargs = dict(self.cluster_kwargs or {})

    @property
    def is_batch(self) -> bool:
        return self.kind in BATCH_KINDS

    @classmethod
    def from_config(cls, cluster_type: str | None = None, num_nodes: int | None = None,
                    cluster_section: dict[str, Any] | None = None,
                    cli_overrides: dict[str, Any] | None = None) -> "EngineSpec":
        """Merge the engine settings: CLI flags > YAML ``cluster:`` section > the
        upstream top-level keys > dask config.

        ``cluster_type``/``num_nodes`` are the upstream top-level YAML keys
        ``clusterType``/``numNodes``; the more specific ``cluster:`` section may set the
        same things as ``kind``/``workers``.  Keys may be written snake_case or
        dask-style with dashes (``job-extra-directives``); ``None`` values (e.g. CLI
        flags not given) are ignored.  Whatever is still unset is left to dask's config
        (``~/.config/dask/jobqueue.yaml``).
        """
        merged: dict[str, Any] = {}
        if cluster_type is not None:
            merged["kind"] = cluster_type
        if num_nodes is not None:
            merged["workers"] = num_nodes
        section = _normalise_keys(cluster_section or {}, "the YAML 'cluster:' section")
        cli = _normalise_keys(cli_overrides or {}, "the command-line options")
        merged.update(section)
        merged.update(cli)
        if set(merged) <= set(ENGINE_NEUTRAL_FIELDS):  # nobody asked for an engine
            merged["kind"] = "auto"
        elif (str(cluster_type).strip().lower() == "local" and "kind" not in section and "kind" not in cli
              and set(merged) - {"kind", "workers"} <= set(ENGINE_NEUTRAL_FIELDS)):
            # upstream's clusterType: local meant "this machine": inline threads or a local
            # cluster, whichever finishes sooner (--cluster local still forces a cluster)
            merged["kind"] = "auto"
            merged["kind_from"] = "the inputs file's clusterType: local, read as 'this machine'"
        return cls(**merged)


_KEY_ALIASES = {
    "clustertype": "kind", "cluster_type": "kind", "cluster": "kind", "type": "kind",
    "numnodes": "workers", "num_nodes": "workers", "n_workers": "workers", "nodes": "workers",
    "project": "account",
    "job_extra": "job_extra_directives",
    "env_extra": "job_script_prologue", "prologue": "job_script_prologue",
    "name": "job_name",
}


def _normalise_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    valid = {f.name for f in fields(EngineSpec)}
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        if value is None:
            continue
        key = str(raw_key).strip().replace("-", "_")
        key = _KEY_ALIASES.get(key.lower(), _KEY_ALIASES.get(key, key))
        if key not in valid:
            raise EngineSpecError(f"unknown setting {raw_key!r} in {where}; valid settings: "
                                  f"{', '.join(sorted(valid))}")
        out[key] = value
    return out


def _minutes_to_walltime(minutes: float) -> str:
    # dask-jobqueue passes walltime through verbatim, and SGE reads a bare number as seconds
    if not minutes > 0:
        raise EngineSpecError(f"walltime must be positive, got {minutes} minutes")
    seconds = int(round(minutes * 60))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or
                                       (isinstance(value, str) and value.strip().isdigit()) or
                                       (isinstance(value, float) and value.is_integer())):
        raise EngineSpecError(f"{name} must be an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise EngineSpecError(f"{name} must be >= {minimum}, got {number}")
    return number


#: upstream's clusterType values: a local dask cluster or a batch scheduler
CLUSTER_TYPES = ("local",) + tuple(sorted(BATCH_KINDS))
assert set(CLUSTER_FIELDS) <= {f.name for f in fields(EngineSpec)}

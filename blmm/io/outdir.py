"""The output folder: the only module that knows its layout.

Every file name a run or a comparison writes is defined here, and so is every way of
reading them back: the run record (``blmm_run.json``), the resolved inputs
(``inputs.yml``), the map files (``blmm_vox_<stat>.<ext>``), the float64 log-likelihood
and the work folder of an unfinished run.  The pipeline writes through these helpers;
compare, report and viewer read through them.  Writes are atomic (a temporary file and a
rename), so a reader never sees a half-written file.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from blmm.errors import CompareError, DiskFullError, InputError, ViewerError
from blmm.io.images import SUPPORTED_SUFFIXES, ImageSpace, image_space, map_path, read_map

# ------------------------------------------------------------------ file names

WORK_DIR = ".blmm_work"  # partial sums and block results of an unfinished run
MANIFEST_FILE = "manifest.json"  # in WORK_DIR: the inputs hash and batch/block layout
RUN_FILE = "blmm_run.json"  # the run record: written last, marks a finished analysis
INPUTS_FILE = "inputs.yml"  # the resolved inputs, loadable by load_config
LLH64_FILE = "llh_float64.npy"  # the log-likelihood in float64 (for blmm_compare)
COMPARE_FILE = "blmm_compare.json"  # the record of a comparison
REPORT_FILE = "report.html"
LOCK_FILE = ".blmm_lock"  # held by the one run writing into outdir: pid, host, start time
MAP_PREFIX = "blmm_vox_"
# Longest first, so "x.dscalar.nii" is not taken for a plain NIfTI.
MAP_EXTENSIONS = (
    ".dscalar.nii", ".func.gii", ".shape.gii", ".nii.gz", ".nii", ".gii", ".mgh", ".mgz", ".dat",
)


CLUSTERS_FILE = "blmm_clusters.tsv"  # corrected inference: one row per cluster of every contrast
NULL_MAXIMA_FILE = "blmm_null_maxima.npz"  # corrected inference: each statistic's null maxima per contrast
# Corrected inference (docs/corrected.md): per contrast kind, suffix -> one-line meaning.  The map of a
# T contrast is "conT" + suffix, of an F contrast "conF" + suffix, one volume per contrast of that kind.
CORRECTED_MAPS = {
    "lp_fdr": "−log10 q, Benjamini–Hochberg (or –Yekutieli) FDR over the fitted voxels",
    "lp_fwe": "−log10 FWE p of the maximum statistic (wild bootstrap, −log10 p maps)",
    "_tfce": "TFCE of the −log10 p map (H = 2, E = 0.5 volumes; E = 1 surfaces, area-weighted)",
    "lp_tfce_fwe": "−log10 FWE p of TFCE (its maximum over the analysis)",
    "_cluster": "cluster index at −log10 p ≥ cluster_threshold (row of blmm_clusters.tsv; 0 outside; negative: T < 0)",
    "lp_cluster_fwe": "−log10 FWE p of the voxel's cluster extent (voxels or mm²; 0 outside clusters)",
}
CORRECTED_INT32_SUFFIXES = frozenset({"_cluster"})

# who writes a map: the run's write stage, its corrections stage, or blmm_compare
FIT, CORRECTION, COMPARE = "fit", "correction", "compare"
# volumes of a map with one per contrast of a kind
PER_T_CONTRAST, PER_F_CONTRAST = "n_T", "n_F"


@dataclass(frozen=True)
class MapKind:
    """One kind of output map, ``blmm_vox_<stat>``: every writer, reader and docs/outputs.md go by `MAPS`."""

    stat: str
    volumes: str  # how many: "1", "p" (X columns), "q_u" (D entries), "p²", "n_T" or "n_F" (contrasts)
    dtype: str  # "float32" or "int32" (also how a raw .dat map is read back)
    meaning: str  # one line: viewer titles, report captions
    written_by: tuple[str, ...]  # FIT, CORRECTION and/or COMPARE


def _registry(*kinds: MapKind) -> dict[str, MapKind]:
    return {kind.stat: kind for kind in kinds}


#: Every output map, in the order a run writes them (docs/outputs.md's map table, docs/compare.md's).
MAPS: dict[str, MapKind] = _registry(
    MapKind("n", "1", "int32", "number of observations", (FIT,)),
    MapKind("mask", "1", "int32", "analysis mask", (FIT, COMPARE)),
    MapKind("edf", "1", "int32", "effective degrees of freedom", (FIT,)),
    MapKind("beta", "p", "float32", "fixed-effects estimate", (FIT,)),
    MapKind("sigma2", "1", "float32", "residual variance", (FIT,)),
    MapKind("D", "q_u", "float32", "random-effects covariance", (FIT,)),
    MapKind("llh", "1", "float32", "log-likelihood", (FIT,)),
    MapKind("converged", "1", "int32", "1 where the scoring converged", (FIT,)),
    MapKind("nit", "1", "int32", "scoring iterations", (FIT,)),
    MapKind("cov", "p²", "float32", "covariance of the fixed-effects estimate", (FIT,)),
    MapKind("resms", "1", "float32", "residual mean square", (FIT,)),
    MapKind("con", PER_T_CONTRAST, "float32", "T contrast estimate", (FIT,)),
    MapKind("conSE", PER_T_CONTRAST, "float32", "T contrast standard error", (FIT,)),
    MapKind("conT", PER_T_CONTRAST, "float32", "T statistic", (FIT,)),
    MapKind("conTlp", PER_T_CONTRAST, "float32", "T contrast -log10 p", (FIT,)),
    MapKind("conT_swedf", PER_T_CONTRAST, "float32", "T contrast Satterthwaite df", (FIT,)),
    MapKind("conF", PER_F_CONTRAST, "float32", "F statistic", (FIT,)),
    MapKind("conFlp", PER_F_CONTRAST, "float32", "F contrast -log10 p", (FIT,)),
    MapKind("conF_swedf", PER_F_CONTRAST, "float32", "F contrast Satterthwaite df", (FIT,)),
    MapKind("conR2", PER_F_CONTRAST, "float32", "partial R\u00b2", (FIT,)),
    *(MapKind(f"con{kind}{suffix}", volumes, "int32" if suffix in CORRECTED_INT32_SUFFIXES else "float32",
              f"{kind} contrast {meaning}", (CORRECTION,))
      for kind, volumes in (("T", PER_T_CONTRAST), ("F", PER_F_CONTRAST)) for suffix, meaning in CORRECTED_MAPS.items()),
    MapKind("Chi2", "1", "float32", "likelihood-ratio \u03c7\u00b2", (COMPARE,)),
    MapKind("Chi2lp", "1", "float32", "likelihood-ratio -log10 p", (COMPARE,)),
    MapKind("Chi2lp_fdr", "1", "float32", "likelihood-ratio -log10 q (FDR)", (COMPARE,)),
)
# Raw .dat maps of counts are int32 (upstream's n, mask, edf; blmm's converged, nit, cluster indices);
# all others float32.
INT32_DAT_MAPS = frozenset(stat for stat, kind in MAPS.items() if kind.dtype == "int32")


def maps_written_by(writer: str) -> list[MapKind]:
    """The maps a writer (FIT, CORRECTION or COMPARE) may write, in `MAPS` order."""
    return [kind for kind in MAPS.values() if writer in kind.written_by]


def contrast_test_maps(kind: str) -> tuple[str, str, str]:
    """A contrast kind's ("T" or "F") statistic, −log10 p and Satterthwaite df maps: conT, conTlp, conT_swedf."""
    stats = (f"con{kind}", f"con{kind}lp", f"con{kind}_swedf")
    if kind not in ("T", "F") or any(stat not in MAPS for stat in stats):
        raise ValueError(f"contrast kind {kind!r}: expected 'T' or 'F'")
    return stats


def per_contrast_maps(kind: str) -> frozenset[str]:
    """The maps with one volume per contrast of ``kind`` ("T" or "F")."""
    volumes = {"T": PER_T_CONTRAST, "F": PER_F_CONTRAST}[kind]
    return frozenset(stat for stat, map_kind in MAPS.items() if map_kind.volumes == volumes)


def corrected_map_stat(kind: str, suffix: str) -> str:
    """``conTlp_fwe`` for ("T", "lp_fwe"): the statistic name of a corrected map."""
    return f"con{kind}{suffix}"


def map_name(stat: str) -> str:
    """``blmm_vox_<stat>``: the file name of a map, without its extension."""
    return f"{MAP_PREFIX}{stat}"


def batch_files(workdir: Path, b: int) -> tuple[Path, Path]:
    """Partial sums and presence bits of image batch b."""
    return workdir / f"batch{b:05d}.stats.npy", workdir / f"batch{b:05d}.present.npy"


def batch_touched_files(workdir: Path, b: int) -> tuple[Path, Path]:
    """Image batch b's y_j of the (voxel, level) pairs its missing values touch, and their offsets per voxel."""
    return workdir / f"batch{b:05d}.touched.npy", workdir / f"batch{b:05d}.touched_ptr.npy"


def batch_counts_file(workdir: Path, b: int) -> Path:
    """How many values of image batch b were treated as missing, by reason (JSON)."""
    return workdir / f"batch{b:05d}.missing.json"


def centre_file(workdir: Path) -> Path:
    """The per-voxel centre taken out of Y before every batch's sums (value, weights; .npz)."""
    return workdir / "centre.npz"


def block_file(workdir: Path, k: int) -> Path:
    """Results of voxel block k."""
    return workdir / f"block{k:05d}.npz"


def correction_y_file(workdir: Path, b: int) -> Path:
    """Image batch b's data (images x analysis voxels, float64, rows in the plan's order), for resampling."""
    return workdir / f"batch{b:05d}.Y.npy"


def correction_prep_file(workdir: Path, lo: int, hi: int) -> Path:
    """Analysis voxels lo … hi − 1's prepared wild-bootstrap contributions (``core.resampling.ResamplingPrep``,
    pickled); named by the range, so another MAXMEM's cut never reads them."""
    return workdir / f"voxels{lo:08d}-{hi:08d}.resampling.pkl"


def correction_layout_file(workdir: Path) -> Path:
    """The analysis' SpatialLayout (pickled) that a dask engine's resample tasks read, once per worker."""
    return workdir / "layout.pkl"


def correction_chunk_file(workdir: Path, c: int) -> Path:
    """Resample chunk c's maxima of every statistic and contrast."""
    return workdir / f"resamples{c:05d}.npz"


# ------------------------------------------------------------------ atomic writes


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        # mkstemp makes the file private; an output should get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def save_array_atomically(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename (the temporary goes if it fails)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_arrays_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` through a temporary file and a rename (the temporary goes if it fails)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ disk space

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(size: float) -> str:
    """1536 -> '1.5 kB' (powers of 1000, as df -H)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space on the filesystem of ``folder`` (None when it cannot be asked)."""
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is 'no space left' or 'quota exceeded'."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


@contextmanager
def disk_full_as_error(outdir: str | os.PathLike, needed: int, writing: str):
    """Turn a full disk while writing into outdir into one DiskFullError naming outdir and the space needed."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        free = free_bytes(outdir)
        free_text = "" if free is None else f", {human_bytes(free)} free now"
        raise DiskFullError(
            f"outdir {outdir}: the disk is full (no space left while writing {writing}); this run needs about "
            f"{human_bytes(needed)} there{free_text}. Free some space and rerun the same command: "
            "it resumes from the finished work") from None


# ------------------------------------------------------------------ one run per outdir


class OutdirLocked(InputError):
    """Another run (alive, or on another host) is writing into the same outdir."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds an outdir's lock, as its lock file says."""

    pid: int | None
    host: str
    started: str  # UTC, ISO 8601 (2026-12-06T10:47:12Z)

    def describe(self) -> str:
        return f"pid {self.pid if self.pid is not None else '?'} on host {self.host or '?'}, started {self.started or '?'}"


def _lock_holder(path: Path) -> LockHolder:
    """The holder a lock names; empty fields when it cannot be read."""
    try:
        fields = dict(item.split("=", 1) for item in os.readlink(path).split() if "=" in item)
    except OSError:
        fields = {}
    pid = fields.get("pid", "")
    return LockHolder(int(pid) if pid.isdigit() else None, fields.get("host", ""), fields.get("started", ""))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, from /proc); None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holder_gone(holder: LockHolder) -> bool:
    """The lock's process has ended, or its pid now belongs to a process started after the lock."""
    if holder.pid is None or not _process_alive(holder.pid):
        return holder.pid is not None
    started = _process_start(holder.pid)
    try:
        locked = datetime.datetime.strptime(holder.started, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return False
    return started is not None and started > locked + 2  # a reused pid (2 s: the lock's whole-second time)


def _try_create_lock(path: Path, holder: LockHolder) -> bool:
    """Create the lock atomically; False when it already exists.  The lock is a symbolic link
    whose target names the holder: created in one step, and it needs no free data block
    (the disk-space check that follows must be able to report a full disk)."""
    try:
        os.symlink(f"pid={holder.pid} host={holder.host} started={holder.started}", path)
    except FileExistsError:
        return False
    return True


@contextmanager
def outdir_lock(outdir: str | os.PathLike, log=print):
    """Hold ``outdir``'s lock while a run writes there: a second run into the same outdir is
    refused (``OutdirLocked``, naming the holder); a lock left by a dead process on this host
    is taken over, with a note through ``log``.  The lock goes when the block ends."""
    folder = Path(outdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = LockHolder(os.getpid(), socket.gethostname(),
                    datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    while not _try_create_lock(path, me):
        if not os.path.lexists(path):  # released between our try and our look: try again
            continue
        holder = _lock_holder(path)
        stale = holder.host == me.host and _holder_gone(holder)
        if not stale:
            raise OutdirLocked(
                f"outdir {folder} is in use by another blmm run ({holder.describe()}); wait for it to finish "
                f"or choose another outdir. If that run is gone, delete {path}")
        log(f"blmm: note: taking over the lock of outdir {folder} from a run that no longer exists "
            f"({holder.describe()})")
        path.unlink(missing_ok=True)
    try:
        yield path
    finally:
        if _lock_holder(path).pid == me.pid:  # never remove a lock someone else took over
            path.unlink(missing_ok=True)


def unfinished_work(outdir: str | os.PathLike) -> tuple[int, int]:
    """(finished image batches, finished voxel blocks) that a rerun of an unfinished run resumes from."""
    work = Path(outdir) / WORK_DIR
    if not work.is_dir():
        return 0, 0
    batches = sum(1 for _ in work.glob("batch*.present.npy"))
    blocks = sum(1 for _ in work.glob("block*.npz"))
    return batches, blocks


# ------------------------------------------------------------------ the run record


def write_inputs(outdir: Path, settings: dict) -> None:
    """``inputs.yml``: the resolved inputs, in upstream's format."""
    write_text_atomically(Path(outdir) / INPUTS_FILE, yaml.safe_dump(settings, sort_keys=False))


def write_run_record(outdir: Path, record: dict) -> None:
    """``blmm_run.json``; written last, it marks the analysis finished."""
    write_text_atomically(Path(outdir) / RUN_FILE, json.dumps(record, indent=1, default=str))


def recorded_hash(path: Path) -> str | None:
    """The ``input_hash`` of a run record or work-folder manifest."""
    return json.loads(Path(path).read_text()).get("input_hash")


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_run_record(outdir: str | os.PathLike) -> dict:
    """``blmm_run.json`` of a finished run; {} when missing or unreadable."""
    return _read_json(Path(outdir) / RUN_FILE)


def recorded_volume_names(outdir: str | os.PathLike, stat: str) -> list[str] | None:
    """Names of the volumes of map ``stat`` as ``blmm_run.json`` records them; None if unrecorded.

    A formula run's coefficient names are also accepted in R's spelling (``sexM``); they are
    returned as a second list under the record's ``formula`` entry, see ``volume_aliases``.
    """
    names = (read_run_record(outdir).get("volumes") or {}).get(stat)
    return [str(name) for name in names] if isinstance(names, list) else None


def volume_aliases(outdir: str | os.PathLike, stat: str) -> list[str]:
    """R's spellings of the beta volumes of a formula run (``(Intercept)``, ``sexM``); [] otherwise."""
    formula = read_run_record(outdir).get("formula") or {}
    names = formula.get("r_coefficients") if stat == "beta" else None
    return [str(name) for name in names] if isinstance(names, list) else []


def read_compare_record(outdir: str | os.PathLike) -> dict:
    """``blmm_compare.json`` of a comparison; {} when missing or unreadable."""
    return _read_json(Path(outdir) / COMPARE_FILE)


def read_settings(outdir: str | os.PathLike, record: dict | None = None) -> dict:
    """The resolved inputs of a run: the record's ``settings``, else ``inputs.yml``; {} if neither."""
    if record is None:
        record = read_run_record(outdir)
    if record.get("settings"):
        return record["settings"]
    try:
        loaded = yaml.safe_load((Path(outdir) / INPUTS_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def settings_entries(value: Any) -> list[tuple[str, dict]]:
    """[(key, body)] from upstream's list of one-key mappings (``- c1: {...}``) in the settings."""
    found = []
    for position, entry in enumerate(value if isinstance(value, list) else [], start=1):
        if isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry.values())), dict):
            key, body = next(iter(entry.items()))
            found.append((str(key), body))
        elif isinstance(entry, dict):
            found.append((f"c{position}", entry))
    return found


def _vector(vector: Any) -> list | None:
    if isinstance(vector, str):
        try:
            vector = yaml.safe_load(vector)
        except yaml.YAMLError:
            return None
    if isinstance(vector, (int, float)):
        return [vector]
    return vector if isinstance(vector, list) and vector else None


@dataclass(frozen=True)
class ContrastEntry:
    """One contrast of the settings; ``index`` is its volume in the conT or conF maps."""

    label: str
    name: str
    kind: str  # "T" or "F"
    index: int
    vector: list


def contrast_entries(settings: dict) -> list[ContrastEntry]:
    """The contrasts of a run's settings, in order (a flat vector is T, a matrix F)."""
    found = []
    counters = {"T": 0, "F": 0}
    for key, body in settings_entries(settings.get("contrasts")):
        vector = _vector(body.get("vector"))
        if vector is None:
            continue
        kind = "F" if any(isinstance(row, list) for row in vector) else "T"
        found.append(ContrastEntry(key, str(body.get("name", key)), kind, counters[kind], vector))
        counters[kind] += 1
    return found


# ------------------------------------------------------------------ maps


def map_stat_and_extension(file_name: str) -> tuple[str, str] | None:
    """("conT", ".nii.gz") for "blmm_vox_conT.nii.gz"; None for anything else."""
    if not file_name.startswith(MAP_PREFIX):
        return None
    for extension in MAP_EXTENSIONS:
        if file_name.endswith(extension):
            stat = file_name[len(MAP_PREFIX):-len(extension)]
            return (stat, extension) if stat and "." not in stat else None
    return None


def map_stat_name(path: str | os.PathLike) -> str | None:
    """The statistic a map file holds ("conT"), or None when the name is not blmm's."""
    parsed = map_stat_and_extension(Path(path).name)
    return parsed[0] if parsed else None


def strip_prefix(name: str) -> str:
    """The statistic of a map name or file name ("beta" for "blmm_vox_beta.nii")."""
    name = name[len(MAP_PREFIX):] if name.startswith(MAP_PREFIX) else name
    parsed = map_stat_and_extension(MAP_PREFIX + name)
    return parsed[0] if parsed else name


def available_maps(outdir: str | os.PathLike) -> dict[str, list[Path]]:
    """Every ``blmm_vox_*`` map in ``outdir``, by statistic name (sorted)."""
    folder = Path(outdir)
    if not folder.is_dir():
        raise ViewerError(f"{folder}: not a folder (expected a blmm output folder)")
    maps: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        parsed = map_stat_and_extension(path.name)
        if parsed and path.is_file():
            maps.setdefault(parsed[0], []).append(path)
    return dict(sorted(maps.items()))


def find_map(outdir: str | os.PathLike, name: str) -> Path:
    """The file of map ``name`` (``beta`` or ``blmm_vox_beta``) in ``outdir``."""
    stat = strip_prefix(name)
    maps = available_maps(outdir)
    candidates = maps.get(stat)
    if candidates is None:
        # Statistic names are case-sensitive, but an unambiguous case slip is forgiven.
        folded = [key for key in maps if key.lower() == stat.lower()]
        candidates = maps[folded[0]] if len(folded) == 1 else None
    listing = ", ".join(maps) if maps else "none"
    if not candidates:
        raise ViewerError(f"no map {MAP_PREFIX}{stat}.* in {outdir}; available maps: {listing}")
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise ViewerError(f"map {MAP_PREFIX}{stat} is ambiguous in {outdir}: {names}; pass the file path instead")
    return candidates[0]


def holds_maps(outdir: Path, stat_prefix: str = "") -> bool:
    """Whether ``outdir`` holds any ``blmm_vox_<stat_prefix>*`` file."""
    return any(Path(outdir).glob(f"{MAP_PREFIX}{stat_prefix}*"))


def remove_run_outputs(outdir: str | os.PathLike) -> list[Path]:
    """Delete what a previous run left in ``outdir``: its maps, record, inputs copy, float64
    log-likelihood and report, and temporaries of those; only files named here. Returns them."""
    folder = Path(outdir)
    owned = {RUN_FILE, INPUTS_FILE, LLH64_FILE, REPORT_FILE, CLUSTERS_FILE, NULL_MAXIMA_FILE}
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        name = path.name
        temporary = name.startswith(".") and ".tmp" in name and (
            name[1:].startswith(MAP_PREFIX) or any(name[1:].startswith(f"{own}.") for own in owned))
        if (name in owned or map_stat_and_extension(name) is not None or temporary) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_stale_maps(outdir: Path, stats: tuple[str, ...], keep: list[str]) -> None:
    """Delete maps of ``stats`` in any format except the file names in ``keep``."""
    for stat in stats:
        for suffix in SUPPORTED_SUFFIXES:
            stale = Path(outdir) / f"{map_name(stat)}{suffix}"
            if stale.name not in keep:
                stale.unlink(missing_ok=True)


@contextmanager
def staging_folder(target: Path):
    """A fresh hidden folder beside ``target`` to write a result set into; removed afterwards in any case."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_staged(staging: Path, outdir: Path, names: list[str], record_name: str, stats: tuple[str, ...]) -> None:
    """Move the finished files ``names`` from ``staging`` into ``outdir``: a rename when outdir is new; else
    the old record goes first, maps of ``stats`` not in ``names`` (another format) are removed, and the
    record ``record_name`` is moved last, so it only ever marks a complete set."""
    try:
        os.rename(staging, outdir)  # fails if outdir exists (even empty on some systems)
        return
    except OSError:
        if not outdir.is_dir():
            raise
    record = outdir / record_name
    record.unlink(missing_ok=True)
    remove_stale_maps(outdir, stats, keep=names)
    for name in names:
        if name != record_name:
            os.replace(staging / name, outdir / name)
    os.replace(staging / record_name, record)
    staging.rmdir()


# ------------------------------------------------------------------ a finished analysis


@dataclass(frozen=True, eq=False)
class Analysis:
    """A finished blmm output folder: its reloaded inputs, run record and map locations."""

    outdir: Path
    label: str  # how messages name it, e.g. "model 1 (/data/out1)"
    config: Any  # blmm.config.Config
    run: dict
    mask_path: Path
    space: ImageSpace

    @property
    def reml(self) -> bool:
        return bool(self.config.reml)

    @property
    def p(self) -> int:
        return self.config.p

    @property
    def X(self) -> np.ndarray:
        return self.config.X

    @property
    def x_names(self) -> list[str]:
        return list(self.config.x_names)

    @property
    def factors(self) -> list:
        return list(self.config.factors)

    @property
    def n_params(self) -> int:
        """Fixed effects + unique entries of every D_k + σ²."""
        return self.p + sum(f.q * (f.q + 1) // 2 for f in self.factors) + 1

    def describe(self) -> str:
        factors = ", ".join(f"{f.name}: q={f.q}" for f in self.factors)
        return f"p={self.p}, {factors}"

    def summary(self) -> dict[str, Any]:
        return {
            "outdir": str(self.outdir),
            "p": self.p,
            "x_columns": list(self.config.x_names),
            "factors": [{"name": f.name, "q": f.q, "levels": f.n_levels} for f in self.factors],
            "n_params": self.n_params,
            **({"formula": self.config.formula.formula} if getattr(self.config, "formula", None) else {}),
        }

    def read_vector(self, stat: str, dtype: Any) -> np.ndarray:
        """The first volume of map ``stat`` (``mask`` or ``blmm_vox_mask``) as an (n_voxels,) array."""
        path = map_path(self.outdir, map_name(strip_prefix(stat)), self.space)
        if not path.is_file():
            raise CompareError(f"{self.label} has no {path.name}: the analysis is incomplete or was not made by blmm")
        return read_map(path, n_voxels=self.space.n_voxels, dtype=dtype)[:, 0]

    def llh(self) -> np.ndarray:
        path = self.outdir / LLH64_FILE
        if not path.is_file():
            raise CompareError(
                f"{self.label} has no {LLH64_FILE} (the float64 log-likelihood map); rerun the analysis "
                "with this version of blmm")
        values = np.load(path, allow_pickle=False)
        if values.shape != (self.space.n_voxels,):
            raise CompareError(
                f"{self.label}: {LLH64_FILE} holds {values.shape} values, expected ({self.space.n_voxels},)")
        return values.astype(np.float64, copy=False)


def _find_mask(outdir: Path, label: str) -> Path:
    mask = map_name("mask")
    found = [outdir / f"{mask}{suffix}" for suffix in SUPPORTED_SUFFIXES if (outdir / f"{mask}{suffix}").is_file()]
    if not found:
        raise CompareError(f"{label} has no {mask} map: not a finished blmm output folder")
    if len(found) > 1:
        raise CompareError(f"{label} has several {mask} maps ({', '.join(p.name for p in found)}); "
                           "remove the stale one")
    return found[0]


def read_finished_outdir(outdir: str | os.PathLike, label: str = "model") -> tuple[Path, str, dict]:
    """A finished blmm output folder (inputs.yml and blmm_run.json present): its absolute path, the label
    messages name it by ("model 1 (/data/out1)") and its run record. Loading its inputs.yml is the caller's
    (config/ sits above io/)."""
    folder = Path(os.path.abspath(os.path.expanduser(str(outdir))))
    label = f"{label} ({folder})"
    if not folder.is_dir():
        raise CompareError(f"{label}: no such folder")
    for required in (INPUTS_FILE, RUN_FILE):
        if not (folder / required).is_file():
            raise CompareError(
                f"{label} has no {required}: not a finished blmm output folder (a run writes it at the end)")
    try:
        run = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CompareError(f"{label}: {RUN_FILE} cannot be read ({err})") from None
    return folder, label, run


def finished_analysis(folder: Path, label: str, config: Any, run: dict) -> Analysis:
    """An `Analysis` of a folder read by `read_finished_outdir`, given its reloaded inputs."""
    recorded = (run.get("settings") or {}).get("REML")
    if recorded is not None and bool(recorded) != bool(config.reml):
        raise CompareError(f"{label}: {RUN_FILE} says REML={recorded} but {INPUTS_FILE} says REML={config.reml}")
    mask_path = _find_mask(folder, label)
    return Analysis(folder, label, config, run, mask_path, image_space(mask_path))


def load_map(
    path_or_outdir: str | os.PathLike,
    name: str | None = None,
    n_vertices: int | None = None,
) -> np.ndarray:
    """Map values as (n_voxels_or_vertices, n_volumes).

    ``path_or_outdir`` is a map file, or an output folder with ``name`` given.
    Raw ``.dat`` maps have no header, so they need ``n_vertices``.
    """
    path = Path(path_or_outdir)
    if path.is_dir():
        if name is None:
            raise ViewerError(f"{path} is a folder: say which map to load (e.g. name='beta')")
        path = find_map(path, name)
    elif not path.exists():
        raise ViewerError(f"{path}: file not found")
    if path.name.endswith(".dat") and n_vertices is None:
        raise ViewerError(
            f"{path}: a .dat map has no header; pass n_vertices "
            f"({10242} for one fsaverage5 hemisphere)")
    dtype = np.int32 if path.name.endswith(".dat") and map_stat_name(path) in INT32_DAT_MAPS \
        else None
    values = np.asarray(read_map(path, n_voxels=n_vertices, dtype=dtype))
    if values.ndim == 1:
        values = values[:, None]
    if n_vertices is not None and values.shape[0] != n_vertices:
        raise ViewerError(
            f"{path}: map has {values.shape[0]} vertices but {n_vertices} were expected")
    return values


def read_null_maxima(outdir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Corrected inference's null maxima: contrast (or "over_contrasts") -> statistic -> (B + 1,); {} if none."""
    path = Path(outdir) / NULL_MAXIMA_FILE
    if not path.is_file():
        return {}
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as arrays:
        for key in arrays.files:
            owner, statistic = key.rsplit("/", 1)
            out.setdefault(owner, {})[statistic] = np.asarray(arrays[key])
    return out


def read_cluster_table(outdir: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """blmm_clusters.tsv as (header, rows of text cells); ([], []) if there is none."""
    path = Path(outdir) / CLUSTERS_FILE
    if not path.is_file():
        return [], []
    lines = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line]
    return (lines[0], lines[1:]) if lines else ([], [])

"""The checks of each section of the inputs YAML; every problem is collected, not raised."""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from blmm.core.design import Contrast, RandomFactor
from blmm.engine.spec import CLUSTER_FIELDS, KINDS
from blmm.errors import ImageError, InputError
from blmm.io.images import SUPPORTED_SUFFIXES, ImageSpace, image_space, mismatch_reason, read_image
from blmm.io.tables import read_labels, read_matrix, read_path_list, resolve_path

from blmm.config.readers import _listing, _shorten, _suggest, _vector_from_yaml, parse_number
from blmm.config.schema import (
    _CONTRAST_FIELDS,
    _FACTOR_FIELDS,
    _IGNORED_KEYS,
    _MISSINGNESS_FIELDS,
    _REQUIRED_KEYS,
    KNOWN_KEYS,
)

class _Checker:
    """Parses one raw YAML dict, collecting every problem and warning."""

    def __init__(self, raw: dict, yaml_dir: Path, override_keys: set[str]) -> None:
        self.raw = raw
        self.yaml_dir = yaml_dir
        self.override_keys = override_keys
        self.problems: list[str] = []
        self.warnings: list[str] = []

    # -- small typed readers ------------------------------------------------

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def entry_fields(self, label: str, body: Any, fields: tuple[str, ...], expected: str) -> bool:
        """A Z or contrasts entry must be a mapping of known fields; report what is not."""
        if not isinstance(body, dict):
            self.problem(f"{label}: expected a mapping with {expected}, found {_shorten(body)}")
            return False
        for field_name in body:
            if field_name not in fields:
                self.problem(f"{label}: unknown field {str(field_name)!r}{_suggest(field_name, fields)}")
        return True
    def base_dir(self, key: str) -> Path:
        # Paths given as overrides (e.g. on the command line) are relative to the cwd.
        return Path.cwd() if key in self.override_keys else self.yaml_dir

    def present(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def number(self, label: str, value: Any, *, integer: bool = False,
               minimum: float | None = None, maximum: float | None = None,
               strict_minimum: bool = False) -> int | float | None:
        kind = "an integer" if integer else "a number"
        if minimum is not None:
            kind += f" {'>' if strict_minimum else '>='} {minimum:g}"
        if maximum is not None:
            kind += f" and <= {maximum:g}" if minimum is not None else f" <= {maximum:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.problem(f"{label}: expected {kind}, found {_shorten(value)}")
            return None
        if isinstance(value, str):
            try:
                parsed: int | float = parse_number(value)
            except ValueError as err:
                self.problem(f"{label}: expected {kind}, found {value!r} ({err})")
                return None
        else:
            parsed = value
        if isinstance(parsed, float) and not math.isfinite(parsed):
            self.problem(f"{label}: expected {kind}, found {_shorten(value)}")
            return None
        if integer:
            if isinstance(parsed, float):
                if not parsed.is_integer():
                    self.problem(f"{label}: expected {kind}, found {_shorten(value)}")
                    return None
                parsed = int(parsed)
        else:
            parsed = float(parsed)
        too_small = minimum is not None and (parsed <= minimum if strict_minimum else parsed < minimum)
        if too_small or (maximum is not None and parsed > maximum):
            self.problem(f"{label}: expected {kind}, found {_shorten(value)}")
            return None
        return parsed

    def option_number(self, key: str, default: Any, **limits: Any) -> Any:
        if not self.present(key):
            return default
        parsed = self.number(key, self.raw[key], **limits)
        return default if parsed is None else parsed

    def flag(self, key: str, default: bool) -> bool:
        if not self.present(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            folded = value.strip().lower()
            if folded in ("true", "yes", "on", "1"):
                return True
            if folded in ("false", "no", "off", "0"):
                return False
        self.problem(f"{key}: expected true/false (or 1/0), found {_shorten(value)}")
        return default

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        if not self.present(key):
            return default
        value = self.raw[key]
        if isinstance(value, str):
            for candidate in choices:
                if candidate.lower() == value.strip().lower():
                    return candidate
        self.problem(f"{key}: expected one of {', '.join(choices)}; found {_shorten(value)}")
        return default

    def path(self, key: str, value: Any, label: str | None = None, base: Path | None = None,
             must_exist: bool = True) -> Path | None:
        label = label or key
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            self.problem(f"{label}: expected a file path, found {_shorten(value)}")
            return None
        resolved = resolve_path(str(value).strip(), base or self.base_dir(key))
        if must_exist and not resolved.exists():
            self.problem(f"{label}: file not found: {resolved}")
            return None
        if must_exist and resolved.is_dir():
            self.problem(f"{label}: {resolved} is a folder, expected a file")
            return None
        return resolved

    # -- keys ---------------------------------------------------------------

    def unknown_keys(self) -> None:
        for key in self.raw:
            if key not in KNOWN_KEYS:
                self.problem(f"unknown key {str(key)!r}{_suggest(key, KNOWN_KEYS)}")
            elif key in _IGNORED_KEYS and self.raw[key] is not None:
                self.warnings.append(f"{key}: ignored ({_IGNORED_KEYS[key]})")
        for key in _REQUIRED_KEYS:
            if self.raw.get(key) is None:
                self.problem(f"{key}: required key is missing")

    def file_list(self, key: str) -> tuple[list[Path] | None, Path | None]:
        """A list of files given as a text file (upstream) or a YAML list."""
        value = self.raw[key]
        if isinstance(value, list):
            if not value:
                self.problem(f"{key}: the list of files is empty")
                return None, None
            files = [self.path(key, entry, label=f"{key} entry {i + 1}", must_exist=False)
                     for i, entry in enumerate(value)]
            return (None, None) if any(f is None for f in files) else (files, None)
        list_path = self.path(key, value)
        if list_path is None:
            return None, None
        if list_path.name.lower().endswith(SUPPORTED_SUFFIXES):
            self.problem(
                f"{key}: {list_path} is an image; {key} must be a text file listing "
                "one image path per line"
            )
            return None, None
        try:
            return read_path_list(list_path), list_path
        except InputError as err:
            self.problem(f"{key}: {err}")
            return None, None

    def missing_files(self, key: str, files: list[Path]) -> bool:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            self.problem(f"{key}: {len(missing)} of {len(files)} listed files not found: {_listing(missing)}")
        return bool(missing)

    def y_files(self) -> tuple[list[Path] | None, Path | None, ImageSpace | None]:
        files, list_path = self.file_list("Y_files")
        if files is None or self.missing_files("Y_files", files):
            return files, list_path, None
        try:
            space = image_space(files[0])
        except ImageError as err:
            self.problem(f"Y_files: {err}")
            return files, list_path, None
        mismatched, unreadable, multi_volume = [], [], []
        if space.n_volumes != 1:
            multi_volume.append(f"{files[0]} ({space.n_volumes} volumes)")
        for path in files[1:]:
            try:
                found = image_space(path)
            except ImageError as err:
                unreadable.append(str(err))
                continue
            reason = mismatch_reason(found, space)
            if reason is not None:
                mismatched.append(f"{path}: {reason}")
            elif found.n_volumes != 1:
                multi_volume.append(f"{path} ({found.n_volumes} volumes)")
        source = f"the first image {files[0]}"
        if mismatched:
            self.problem(
                f"Y_files: {len(mismatched)} images do not match the shape of {source} "
                f"({space.describe()}): {_listing(mismatched)}"
            )
        if unreadable:
            self.problem(f"Y_files: {len(unreadable)} images cannot be read: {_listing(unreadable)}")
        if multi_volume:
            self.problem(
                f"Y_files: {len(multi_volume)} files hold more than one image (blmm needs one "
                f"image per file): {_listing(multi_volume)}"
            )
        duplicates = len(files) - len(set(files))
        if duplicates:
            self.warnings.append(f"Y_files: {duplicates} image paths are listed more than once")
        return files, list_path, space

    def design_matrix(self) -> tuple[np.ndarray | None, list[str] | None, Path | None]:
        x_path = self.path("X", self.raw["X"])
        if x_path is None:
            return None, None, None
        try:
            X, names = read_matrix(x_path)
        except InputError as err:
            self.problem(f"X: {err}")
            return None, None, x_path
        if not self._finite_table("X", x_path, X, names):
            return None, names, x_path
        n, p = X.shape
        if n <= p:
            self.problem(f"X: {x_path} has {n} rows and {p} columns; need more images than columns")
        singular_values, right_vectors = np.linalg.svd(X, full_matrices=False)[1:]
        threshold = singular_values.max(initial=0.0) * max(n, p) * np.finfo(np.float64).eps
        rank = int(np.sum(singular_values > threshold))
        if rank < p:
            column_names = names or [f"column {j + 1}" for j in range(p)]
            null_vector = right_vectors[-1]
            weights = np.abs(null_vector)
            involved = [column_names[j] for j in np.flatnonzero(weights > 1e-8 * weights.max())]
            self.problem(
                f"X: {x_path} is rank deficient (rank {rank}, {p} columns); fixed effects are not "
                f"estimable. Linearly dependent columns include: {', '.join(involved)}"
            )
        return X, names, x_path

    def _finite_table(self, label: str, path: Path, table: np.ndarray, names: list[str] | None) -> bool:
        bad_rows, bad_columns = np.nonzero(~np.isfinite(table))
        if bad_rows.size == 0:
            return True
        cells = [
            f"data row {r + 1}, column {c + 1}" + (f" ({names[c]})" if names else "")
            for r, c in zip(bad_rows.tolist(), bad_columns.tolist())
        ]
        self.problem(
            f"{label}: {path} has {len(cells)} empty, NaN or infinite cells (expected finite "
            f"numbers): {_listing(cells)}"
        )
        return False

    @staticmethod
    def _entries(value: Any, prefix: str) -> list[tuple[str, Any]] | None:
        """Upstream's list of one-key dicts (- f1: {...}), or a mapping {f1: {...}}."""
        if isinstance(value, dict):
            def order(item: tuple[Any, Any]) -> tuple[int, str]:
                match = re.fullmatch(rf"{prefix}(\d+)", str(item[0]))
                return (int(match.group(1)) if match else 1 << 30, str(item[0]))
            return [(str(k), v) for k, v in sorted(value.items(), key=order)]
        if isinstance(value, list):
            entries = []
            for index, item in enumerate(value):
                keyed = isinstance(item, dict) and len(item) == 1 and (
                    isinstance(next(iter(item.values())), dict)
                    or re.fullmatch(rf"{prefix}\d+", str(next(iter(item)))) is not None)
                if keyed:
                    key, body = next(iter(item.items()))
                    entries.append((str(key), body))
                else:
                    entries.append((f"{prefix}{index + 1}", item))  # a bare {name, ...} entry
            return entries
        return None

    def random_factors(self, n: int | None, n_source: str) -> tuple[list[RandomFactor], list[tuple[Path, Path]]]:
        entries = self._entries(self.raw["Z"], "f")
        if not entries:
            self.problem(
                "Z: expected a list of random factors (- f1: {name: ..., factor: file, "
                f"design: file}}), found {_shorten(self.raw['Z'])}"
            )
            return [], []
        factors, paths = [], []
        for key, body in entries:
            label = f"Z {key}"
            if not self.entry_fields(label, body, _FACTOR_FIELDS, "factor and design"):
                continue
            name = str(body.get("name") or key)
            label = f"Z {key} ({name})" if name != key else label
            missing = [f for f in ("factor", "design") if body.get(f) is None]
            for field_name in missing:
                self.problem(f"{label}: {field_name} file is missing")
            if missing:
                continue
            factor_path = self.path("Z", body["factor"], label=f"{label} factor")
            design_path = self.path("Z", body["design"], label=f"{label} design")
            labels = design = None
            if factor_path is not None:
                try:
                    labels = read_labels(factor_path, n_rows=n)
                except InputError as err:
                    self.problem(f"{label} factor: {err}")
            if design_path is not None:
                try:
                    design, design_names = read_matrix(design_path)
                    if not self._finite_table(f"{label} design", design_path, design, design_names):
                        design = None
                except InputError as err:
                    self.problem(f"{label} design: {err}")
            if labels is not None:
                if n is not None and labels.shape[0] != n:
                    self.problem(f"{label} factor: {factor_path} has {labels.shape[0]} rows, expected {n} ({n_source})")
                    labels = None
                elif labels.dtype.kind == "U" and np.count_nonzero(labels == labels[0]) == 1:
                    # An all-text file one row short keeps its header as a level.
                    self.warnings.append(
                        f"{label} factor: first label {labels[0]!s} occurs only once; if it is a "
                        f"header, {factor_path.name} is missing a row"
                    )
                if labels is not None and np.unique(labels).size < 2:
                    self.problem(
                        f"{label} factor: {factor_path} has a single level ({labels[:1].tolist()[0]!r}); a "
                        "random factor needs at least two levels"
                    )
                    labels = None
            if design is not None and n is not None and design.shape[0] != n:
                self.problem(f"{label} design: {design_path} has {design.shape[0]} rows, expected {n} ({n_source})")
                design = None
            if labels is not None and design is not None:
                if labels.shape[0] != design.shape[0]:
                    self.problem(
                        f"{label}: factor file has {labels.shape[0]} rows but design file has "
                        f"{design.shape[0]}"
                    )
                    continue
                factors.append(RandomFactor(name, labels, design))
                paths.append((factor_path, design_path))
        return factors, paths

    def contrasts(self, p: int | None) -> list[Contrast]:
        entries = self._entries(self.raw["contrasts"], "c")
        if not entries:
            self.problem(
                "contrasts: expected a list of contrasts (- c1: {name: ..., vector: [...]}), "
                f"found {_shorten(self.raw['contrasts'])}"
            )
            return []
        contrasts = []
        for key, body in entries:
            label = f"contrasts {key}"
            if not self.entry_fields(label, body, _CONTRAST_FIELDS, "name and vector"):
                continue
            name = str(body.get("name") or key)
            label = f"{label} ({name})" if name != key else label
            if body.get("vector") is None:
                self.problem(f"{label}: vector is missing")
                continue
            try:
                vector = _vector_from_yaml(body["vector"])
                array = np.array(vector, dtype=np.float64)
            except (ValueError, TypeError) as err:
                self.problem(
                    f"{label}: vector must be a list of numbers (T) or a list of rows (F), "
                    f"found {_shorten(body['vector'])} ({err})"
                )
                continue
            if array.size == 0 or array.ndim not in (1, 2):
                self.problem(f"{label}: vector must be a flat list (T) or a list of rows (F), found {_shorten(body['vector'])}")
                continue
            contrast = Contrast.from_vector(name, array)
            L = contrast.matrix
            kind = "T" if contrast.is_t else "F"
            if p is not None and L.shape[1] != p:
                self.problem(f"{label}: {kind} contrast has {L.shape[1]} entries per row, expected {p} (the columns of X)")
                continue
            rank = int(np.linalg.matrix_rank(L))
            if rank == 0:
                self.problem(f"{label}: {kind} contrast is all zeros")
                continue
            if rank < L.shape[0]:
                self.problem(
                    f"{label}: F contrast has {L.shape[0]} rows but rank {rank}; its rows must be "
                    "linearly independent"
                )
                continue
            contrasts.append(contrast)
        return contrasts

    def outdir(self) -> Path | None:
        value = self.raw["outdir"]
        outdir = self.path("outdir", value, must_exist=False)
        if outdir is None:
            return None
        if outdir.exists():
            if not outdir.is_dir():
                self.problem(f"outdir: {outdir} exists and is not a folder")
            elif not _writable(outdir):
                self.problem(f"outdir: {outdir} is not writable")
            return outdir
        parent = outdir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            self.problem(f"outdir: {outdir} cannot be created because {parent} is a file, not a folder")
        elif not _writable(parent):
            self.problem(f"outdir: {outdir} cannot be created because {parent} is not writable")
        return outdir

    def analysis_mask(self, space: ImageSpace | None) -> Path | None:
        if not self.present("analysis_mask"):
            return None
        mask_path = self.path("analysis_mask", self.raw["analysis_mask"])
        if mask_path is None or space is None:
            return mask_path
        try:
            values = read_image(mask_path, space)
        except ImageError as err:
            self.problem(f"analysis_mask: {err}")
            return mask_path
        finite = np.isfinite(values)
        if not np.any(finite & (values != 0)):
            self.problem(f"analysis_mask: {mask_path} is empty (no non-zero voxel); nothing would be analysed")
        elif not np.all((values[finite] == 0) | (values[finite] == 1)):
            self.warnings.append(
                f"analysis_mask: {mask_path} is not binary; every non-zero voxel counts as inside"
            )
        return mask_path

    def data_masks(self, y_count: int | None, space: ImageSpace | None) -> tuple[list[Path] | None, Path | None]:
        if not self.present("data_mask_files"):
            return None, None
        files, list_path = self.file_list("data_mask_files")
        if files is None:
            return None, list_path
        if y_count is not None and len(files) != y_count:
            self.problem(
                f"data_mask_files: lists {len(files)} masks, expected one per image ({y_count} in Y_files)"
            )
        if self.missing_files("data_mask_files", files) or space is None:
            return files, list_path
        mismatched = []
        for path in files:
            try:
                reason = mismatch_reason(image_space(path), space)
            except ImageError as err:
                reason = str(err)
            if reason is not None:
                mismatched.append(f"{path}: {reason}")
        if mismatched:
            self.problem(f"data_mask_files: {len(mismatched)} masks do not match the images: {_listing(mismatched)}")
        return files, list_path

    def missingness(self, n: int | None) -> tuple[float | None, int | None]:
        value = self.raw.get("Missingness")
        if value is None:
            return None, None
        if not isinstance(value, dict):
            self.problem(f"Missingness: expected a mapping with MinPercent and/or MinN, found {_shorten(value)}")
            return None, None
        min_percent = min_n = None
        for key, entry in value.items():
            canonical = _MISSINGNESS_FIELDS.get(str(key).lower())
            if canonical is None:
                self.problem(f"Missingness: unknown field {str(key)!r}{_suggest(key, tuple(_MISSINGNESS_FIELDS.values()))}")
            elif entry is None:
                continue
            elif canonical == "MinPercent":
                min_percent = self._min_percent(entry)
            else:
                min_n = self.number("Missingness MinN", entry, integer=True, minimum=0)
                if min_n is not None and n is not None and min_n > n:
                    self.problem(f"Missingness MinN: {min_n} is more than the {n} images; every voxel would be dropped")
        return min_percent, min_n

    def _min_percent(self, entry: Any) -> float | None:
        label = "Missingness MinPercent"
        if isinstance(entry, str) and entry.strip().endswith("%"):
            parsed = self.number(label, entry.strip()[:-1], minimum=0, maximum=100)
            return None if parsed is None else parsed / 100.0
        if isinstance(entry, (int, float, str)) and not isinstance(entry, bool):
            try:
                number = float(parse_number(entry)) if isinstance(entry, str) else float(entry)
            except ValueError:
                number = None
            if number is not None and 1 < number <= 100:
                self.problem(
                    f"{label}: expected a fraction in [0, 1] or a percentage string like "
                    f"'{number:g}%', found {_shorten(entry)}"
                )
                return None
        return self.number(label, entry, minimum=0, maximum=1)

    def cluster(self) -> dict[str, Any]:
        value = self.raw.get("cluster")
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(f"cluster: expected a mapping of engine resources, found {_shorten(value)}")
            return {}
        resources: dict[str, Any] = {}
        for key, entry in value.items():
            label = f"cluster {key}"
            if key not in CLUSTER_FIELDS:
                self.problem(f"cluster: unknown field {str(key)!r}{_suggest(key, CLUSTER_FIELDS)}")
                continue
            if entry is None:
                continue
            if key in ("workers", "cores", "processes"):
                parsed = self.number(label, entry, integer=True, minimum=1)
            elif key == "start_timeout":
                parsed = self.number(label, entry, minimum=0)
            elif key == "kind":
                parsed = str(entry).lower() if str(entry).lower() in KINDS else None
                if parsed is None:
                    self.problem(f"{label}: expected one of {', '.join(KINDS)}, found {_shorten(entry)}")
            elif key == "retries":
                parsed = self.number(label, entry, integer=True, minimum=0)
            elif key in ("memory", "walltime"):
                # dask-jobqueue spellings: "16GB", "01:30:00"; a bare number is bytes / minutes.
                ok = (isinstance(entry, str) and entry.strip()) or (
                    isinstance(entry, (int, float)) and not isinstance(entry, bool) and entry > 0)
                parsed = entry if ok else None
                if not ok:
                    example = "'16GB'" if key == "memory" else "'02:00:00'"
                    self.problem(f"{label}: expected a string such as {example} or a positive number, found {_shorten(entry)}")
            elif key in ("queue", "account", "job_name", "log_directory", "local_directory", "python", "interface"):
                parsed = entry if isinstance(entry, str) and entry.strip() else None
                if parsed is None:
                    self.problem(f"{label}: expected a non-empty string, found {_shorten(entry)}")
            else:  # job_extra_directives, job_script_prologue
                ok = isinstance(entry, list) and all(isinstance(item, str) for item in entry)
                parsed = list(entry) if ok else None
                if not ok:
                    self.problem(f"{label}: expected a list of strings, found {_shorten(entry)}")
            if parsed is not None:
                resources[key] = parsed
        return resources


def _writable(folder: Path) -> bool:
    """True if a file can be created in folder (probes; os.access misleads for root / ACLs)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True



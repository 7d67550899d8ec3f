"""The checks of the inputs YAML: one function per section or rule, each reporting its own
problems into the shared ``_Found`` (collected, not raised) and returning what it read."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from blmm.core.design import Contrast, RandomFactor, identifiability_problems
from blmm.core.design_basis import dependent_columns
from blmm.core.fdr import FDR_METHODS
from blmm.core.resampling import (DEFAULT_SIGMA2, DEFAULT_WEIGHTS, PRECISIONS, SIGMA2_MODES, WEIGHTS,
                                    check_blocks, independent_blocks)
from blmm.core.scoring import METHODS
from blmm.engine.spec import CLUSTER_RULES, CLUSTER_TYPES, KINDS
from blmm.errors import ImageError, InputError
from blmm.geometry.layout import VOLUME_CONNECTIVITIES
from blmm.io.images import ImageSpace, all_laid_out_as, image_space, mismatch_reason, read_image
from blmm.io.surfaces import TEMPLATE_MESHES, read_layout
from blmm.io.tables import read_labels, read_matrix

from blmm.config.readers import (
    _Found,
    _listing,
    _shorten,
    _suggest,
    _vector_from_yaml,
    finite_table,
    missing_files,
    parse_number,
    read_choice,
    read_entries,
    read_entry_fields,
    read_file_list,
    read_flag,
    read_number,
    read_option_number,
    read_path,
)
from blmm.config.schema import (
    _CONTRAST_FIELDS,
    _FACTOR_FIELDS,
    _IGNORED_KEYS,
    _MISSINGNESS_FIELDS,
    _NO_EFFECT_KEYS,
    _REQUIRED_KEYS,
    DEFAULT_MAXMEM,
    CorrectionSettings,
    DEFAULT_MINLOG,
    KNOWN_KEYS,
)

#: the true/false keys and their defaults (two_sided: see _check_options)
_FLAGS = (
    ("OutputCovB", True), ("resms", False), ("voxelBatching", False), ("safeMode", True),
    ("REML", True), ("two_sided", False), ("zero_is_missing", True),
)


def _check_keys(found: _Found) -> None:
    """Unknown keys (with a suggestion), ignored upstream keys, missing required keys."""
    for key in found.raw:
        if key not in KNOWN_KEYS:
            found.problem(f"unknown key {str(key)!r}{_suggest(key, KNOWN_KEYS)}")
        elif key in _IGNORED_KEYS and found.raw[key] is not None:
            found.warnings.append(f"{key}: ignored ({_IGNORED_KEYS[key]})")
        elif key in _NO_EFFECT_KEYS and found.raw[key] is not None:
            found.warnings.append(f"{key}: accepted but has no effect ({_NO_EFFECT_KEYS[key]})")
    for key in _REQUIRED_KEYS:
        if found.raw.get(key) is None:
            found.problem(f"{key}: required key is missing")


def _check_options(found: _Found, formula_run: bool = False) -> dict[str, Any]:
    """The scalar options: numbers, method, clusterType and the true/false flags.

    two_sided defaults to true for a formula run (lmerTest's p, what lme4 users expect) and to
    false for upstream's X/Z YAMLs (upstream's one-sided default, kept for compatibility).
    """
    options: dict[str, Any] = {
        "MAXMEM": read_option_number(found, "MAXMEM", DEFAULT_MAXMEM, integer=True, minimum=1),
        "tol": read_option_number(found, "tol", 1e-6, minimum=0, strict_minimum=True),
        "maxnit": read_option_number(found, "maxnit", 10000, integer=True, minimum=1),
        "maxnvb": read_option_number(found, "maxnvb", 60, integer=True, minimum=1),
        "numNodes": read_option_number(found, "numNodes", 1, integer=True, minimum=1),
        "minlog": read_option_number(found, "minlog", DEFAULT_MINLOG),
        "report_threshold": read_option_number(found, "report_threshold", 3.0, minimum=0),
        "data_mask_thresh": read_option_number(found, "data_mask_thresh", None),
        "method": read_choice(found, "method", METHODS, "pSFS"),
        "clusterType": read_choice(found, "clusterType", CLUSTER_TYPES, None),  # None: blmm chooses
    }
    options.update((key, read_flag(found, key, formula_run if key == "two_sided" else default))
                   for key, default in _FLAGS)
    return options


def _check_cluster(found: _Found) -> dict[str, Any]:
    """The ``cluster:`` section, against the rules ``engine.spec.CLUSTER_RULES`` defines."""
    value = found.raw.get("cluster")
    if value is None:
        return {}
    if not isinstance(value, dict):
        found.problem(f"cluster: expected a mapping of engine resources, found {_shorten(value)}")
        return {}
    resources: dict[str, Any] = {}
    for key, entry in value.items():
        rule = CLUSTER_RULES.get(key)
        if rule is None:
            found.problem(f"cluster: unknown field {str(key)!r}{_suggest(key, tuple(CLUSTER_RULES))}")
            continue
        if entry is None:
            continue
        parsed = _cluster_setting(found, f"cluster {key}", entry, rule)
        if parsed is not None:
            resources[key] = parsed
    return resources


def _cluster_setting(found: _Found, label: str, entry: Any, rule: Any) -> Any:
    """One ``cluster:`` setting read by its rule; None (and a problem) if it breaks it."""
    if rule.kind in ("integer", "number"):
        return read_number(found, label, entry, integer=rule.kind == "integer", minimum=rule.minimum,
                           strict_minimum=rule.strict)
    if rule.kind == "choice":
        parsed = str(entry).lower() if str(entry).lower() in KINDS else None
        if parsed is None:
            found.problem(f"{label}: expected one of {', '.join(KINDS)}, found {_shorten(entry)}")
        return parsed
    if rule.kind == "size":
        ok = (isinstance(entry, str) and entry.strip()) or (
            isinstance(entry, (int, float)) and not isinstance(entry, bool) and entry > 0)
        if not ok:
            found.problem(f"{label}: expected a string such as {rule.example} or a positive number, "
                          f"found {_shorten(entry)}")
        return entry if ok else None
    if rule.kind == "text":
        parsed = entry if isinstance(entry, str) and entry.strip() else None
        if parsed is None:
            found.problem(f"{label}: expected a non-empty string, found {_shorten(entry)}")
        return parsed
    ok = isinstance(entry, list) and all(isinstance(item, str) for item in entry)  # "strings"
    if not ok:
        found.problem(f"{label}: expected a list of strings, found {_shorten(entry)}")
    return list(entry) if ok else None


def _check_outdir(found: _Found) -> Path | None:
    """``outdir``: a writable folder, or one that can be created."""
    if not found.present("outdir"):
        return None
    outdir = read_path(found, "outdir", found.raw["outdir"], must_exist=False)
    if outdir is None:
        return None
    if outdir.exists():
        if not outdir.is_dir():
            found.problem(f"outdir: {outdir} exists and is not a folder")
        elif not _writable(outdir):
            found.problem(f"outdir: {outdir} is not writable")
        return outdir
    parent = outdir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        found.problem(f"outdir: {outdir} cannot be created because {parent} is a file, not a folder")
    elif not _writable(parent):
        found.problem(f"outdir: {outdir} cannot be created because {parent} is not writable")
    return outdir


def _all_dat_of_size(files: list[Path], size: int) -> bool:
    """Every file a regular ``.dat`` of ``size`` bytes: for 10,000 surface images ~0.03 s of os.stat
    instead of ~0.15 s of an ImageSpace each (issue 21); any other case takes the checks that name
    each problem."""
    try:
        return all(os.fspath(f).lower().endswith(".dat") and _regular_of_size(os.stat(f), size) for f in files)
    except OSError:
        return False


def _regular_of_size(st: os.stat_result, size: int) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _check_inputs(found: _Found) -> tuple[list[Path] | None, Path | None, ImageSpace | None]:
    """``Y_files``: every listed image exists, is one image and matches the first one's grid."""
    if not found.present("Y_files"):
        return None, None, None
    files, list_path = read_file_list(found, "Y_files")
    if files is None:
        return files, list_path, None
    space = None
    if files[0].is_file():  # one look at each file where all are laid out as the first
        try:
            space = image_space(files[0])
        except ImageError:
            pass  # said below
        alike = space is not None and (_all_dat_of_size(files[1:], 4 * space.n_voxels) if space.format == "dat"
                                       else all_laid_out_as(files[1:], files[0]))
        if alike:
            _warn_duplicates(found, files)
            return files, list_path, space  # the checks below, by name, size and header bytes only
    if missing_files(found, "Y_files", files):
        return files, list_path, None
    if space is None:
        try:
            space = image_space(files[0])
        except ImageError as err:
            found.problem(f"Y_files: {err}")
            return files, list_path, None
    mismatched, unreadable, multi_volume = [], [], []
    if space.n_volumes != 1:
        multi_volume.append(f"{files[0]} ({space.n_volumes} volumes)")
    for path in files[1:]:
        try:
            found_space = image_space(path)
        except ImageError as err:
            unreadable.append(str(err))
            continue
        reason = mismatch_reason(found_space, space)
        if reason is not None:
            mismatched.append(f"{path}: {reason}")
        elif found_space.n_volumes != 1:
            multi_volume.append(f"{path} ({found_space.n_volumes} volumes)")
    source = f"the first image {files[0]}"
    if mismatched:
        found.problem(
            f"Y_files: {len(mismatched)} images do not match the shape of {source} "
            f"({space.describe()}): {_listing(mismatched)}"
        )
    if unreadable:
        found.problem(f"Y_files: {len(unreadable)} images cannot be read: {_listing(unreadable)}")
    if multi_volume:
        found.problem(
            f"Y_files: {len(multi_volume)} files hold more than one image (blmm needs one "
            f"image per file): {_listing(multi_volume)}"
        )
    _warn_duplicates(found, files)
    return files, list_path, space


def _warn_duplicates(found: _Found, files: list[Path]) -> None:
    duplicates = len(files) - len(set(files))
    if duplicates:
        found.warnings.append(f"Y_files: {duplicates} image paths are listed more than once")


def _check_design(found: _Found) -> tuple[np.ndarray | None, list[str] | None, Path | None]:
    """``X``: a finite table with more rows than columns, of full column rank."""
    if not found.present("X"):
        return None, None, None
    x_path = read_path(found, "X", found.raw["X"])
    if x_path is None:
        return None, None, None
    try:
        X, names = read_matrix(x_path)
    except InputError as err:
        found.problem(f"X: {err}")
        return None, None, x_path
    if not finite_table(found, "X", x_path, X, names):
        return None, names, x_path
    n, p = X.shape
    if n <= p:
        found.problem(f"X: {x_path} has {n} rows and {p} columns; need more images than columns")
    dependent = dependent_columns(X)  # lme4's rule on equilibrated columns (core/design_basis.py)
    if dependent:
        column_names = names or [f"column {j + 1}" for j in range(p)]
        involved = sorted({j for j, deps in dependent} | {i for _, deps in dependent for i in deps})
        found.problem(
            f"X: {x_path} is rank deficient (rank {p - len(dependent)}, {p} columns); fixed effects are not "
            f"estimable. Linearly dependent columns include: {', '.join(column_names[j] for j in involved)}"
        )
    return X, names, x_path


def _check_design_rows(found: _Found, X: np.ndarray | None, x_path: Path | None,
                       y_files: list[Path] | None) -> None:
    """One row of X per image."""
    if X is not None and y_files is not None and X.shape[0] != len(y_files):
        found.problem(f"X: {x_path} has {X.shape[0]} rows but Y_files lists {len(y_files)} images "
                      "(one row per image)")


def _read_entries_or_report(found: _Found, key: str, prefix: str, example: str) -> list[tuple[str, Any]]:
    """The entries of ``Z`` or ``contrasts``, or [] and a problem if they are not a list of them."""
    entries = read_entries(found.raw[key], prefix)
    if not entries:
        found.problem(f"{key}: expected a list of {example}, found {_shorten(found.raw[key])}")
        return []
    return entries


def _entry_label(found: _Found, label: str, key: str, body: Any, fields: tuple[str, ...],
                 expected: str) -> tuple[str, str] | None:
    """An entry's name and its label in messages; None if its body is not a mapping."""
    if not read_entry_fields(found, label, body, fields, expected):
        return None
    name = str(body.get("name") or key)
    return name, (f"{label} ({name})" if name != key else label)


def _check_factors(found: _Found, n: int | None, n_source: str) -> tuple[list[RandomFactor], list[tuple[Path, Path]]]:
    """``Z``: each random factor's labels and design, with one row per image."""
    if not found.present("Z"):
        return [], []
    factors, paths = [], []
    entries = _read_entries_or_report(
        found, "Z", "f", "random factors (- f1: {name: ..., factor: file, design: file})")
    for key, body in entries:
        named = _entry_label(found, f"Z {key}", key, body, _FACTOR_FIELDS, "factor and design")
        if named is None:
            continue
        name, label = named
        missing = [f for f in ("factor", "design") if body.get(f) is None]
        for field_name in missing:
            found.problem(f"{label}: {field_name} file is missing")
        if missing:
            continue
        factor_path = read_path(found, "Z", body["factor"], label=f"{label} factor")
        design_path = read_path(found, "Z", body["design"], label=f"{label} design")
        labels = _read_factor_labels(found, label, factor_path, n)
        design, design_names = _read_factor_design(found, label, design_path)
        labels = _check_factor_labels(found, label, labels, factor_path, n, n_source)
        design = _check_factor_rows(found, label, design, design_path, n, n_source)
        if labels is not None and design is not None:
            if labels.shape[0] != design.shape[0]:
                found.problem(
                    f"{label}: factor file has {labels.shape[0]} rows but design file has "
                    f"{design.shape[0]}"
                )
                continue
            columns = tuple(design_names) if design_names and len(design_names) == design.shape[1] else ()
            factors.append(RandomFactor(name, labels, design, columns))
            paths.append((factor_path, design_path))
    return factors, paths


def _read_factor_labels(found: _Found, label: str, factor_path: Path | None,
                        n: int | None) -> np.ndarray | None:
    if factor_path is None:
        return None
    try:
        return read_labels(factor_path, n_rows=n)
    except InputError as err:
        found.problem(f"{label} factor: {err}")
        return None


def _read_factor_design(found: _Found, label: str,
                        design_path: Path | None) -> tuple[np.ndarray | None, list[str] | None]:
    """A factor's design and its header's column names (None without a header)."""
    if design_path is None:
        return None, None
    try:
        design, design_names = read_matrix(design_path)
    except InputError as err:
        found.problem(f"{label} design: {err}")
        return None, None
    if not finite_table(found, f"{label} design", design_path, design, design_names):
        return None, None
    return design, design_names


def _check_factor_labels(found: _Found, label: str, labels: np.ndarray | None, factor_path: Path | None,
                         n: int | None, n_source: str) -> np.ndarray | None:
    """A factor's labels: one per image (their levels: _check_identifiable, in safe mode)."""
    if labels is None:
        return None
    if n is not None and labels.shape[0] != n:
        found.problem(f"{label} factor: {factor_path} has {labels.shape[0]} rows, expected {n} ({n_source})")
        return None
    if labels.dtype.kind == "U" and np.count_nonzero(labels == labels[0]) == 1:
        # An all-text file one row short keeps its header as a level.
        found.warnings.append(
            f"{label} factor: first label {labels[0]!s} occurs only once; if it is a "
            f"header, {factor_path.name} is missing a row"
        )
    return labels


def _check_factor_rows(found: _Found, label: str, design: np.ndarray | None, design_path: Path | None,
                       n: int | None, n_source: str) -> np.ndarray | None:
    """A factor's design: one row per image."""
    if design is not None and n is not None and design.shape[0] != n:
        found.problem(f"{label} design: {design_path} has {design.shape[0]} rows, expected {n} ({n_source})")
        return None
    return design


def _check_contrasts(found: _Found, p: int | None) -> list[Contrast]:
    """``contrasts``: T vectors or F matrices of full row rank, one entry per column of X."""
    if not found.present("contrasts"):
        return []
    contrasts = []
    entries = _read_entries_or_report(found, "contrasts", "c", "contrasts (- c1: {name: ..., vector: [...]})")
    for key, body in entries:
        named = _entry_label(found, f"contrasts {key}", key, body, _CONTRAST_FIELDS, "name and vector")
        if named is None:
            continue
        name, label = named
        if body.get("vector") is None:
            found.problem(f"{label}: vector is missing")
            continue
        contrast = _contrast(found, label, name, body["vector"], p)
        if contrast is not None:
            contrasts.append(contrast)
    return contrasts


def _contrast(found: _Found, label: str, name: str, vector: Any, p: int | None) -> Contrast | None:
    """One contrast vector or matrix, or None (and a problem)."""
    try:
        array = np.array(_vector_from_yaml(vector), dtype=np.float64)
    except (ValueError, TypeError) as err:
        found.problem(
            f"{label}: vector must be a list of numbers (T) or a list of rows (F), "
            f"found {_shorten(vector)} ({err})"
        )
        return None
    if array.size == 0 or array.ndim not in (1, 2):
        found.problem(f"{label}: vector must be a flat list (T) or a list of rows (F), found {_shorten(vector)}")
        return None
    contrast = Contrast.from_vector(name, array)
    L = contrast.matrix
    kind = "T" if contrast.is_t else "F"
    if p is not None and L.shape[1] != p:
        found.problem(f"{label}: {kind} contrast has {L.shape[1]} entries per row, expected {p} (the columns of X)")
        return None
    rank = int(np.linalg.matrix_rank(L))
    if rank == 0:
        found.problem(f"{label}: {kind} contrast is all zeros")
        return None
    if rank < L.shape[0]:
        found.problem(
            f"{label}: F contrast has {L.shape[0]} rows but rank {rank}; its rows must be "
            "linearly independent"
        )
        return None
    return contrast


def _check_mask(found: _Found, space: ImageSpace | None) -> Path | None:
    """``analysis_mask``: an image on the data's grid with at least one voxel inside."""
    if not found.present("analysis_mask"):
        return None
    mask_path = read_path(found, "analysis_mask", found.raw["analysis_mask"])
    if mask_path is None or space is None:
        return mask_path
    try:
        values = read_image(mask_path, space)
    except ImageError as err:
        found.problem(f"analysis_mask: {err}")
        return mask_path
    finite = np.isfinite(values)
    if not np.any(finite & (values != 0)):
        found.problem(f"analysis_mask: {mask_path} is empty (no non-zero voxel); nothing would be analysed")
    elif not np.all((values[finite] == 0) | (values[finite] == 1)):
        found.warnings.append(
            f"analysis_mask: {mask_path} is not binary; every non-zero voxel counts as inside"
        )
    return mask_path


def _check_data_masks(found: _Found, y_count: int | None,
                      space: ImageSpace | None) -> tuple[list[Path] | None, Path | None]:
    """``data_mask_files``: one mask per image, each on the images' grid."""
    if not found.present("data_mask_files"):
        return None, None
    files, list_path = read_file_list(found, "data_mask_files")
    if files is None:
        return None, list_path
    if y_count is not None and len(files) != y_count:
        found.problem(
            f"data_mask_files: lists {len(files)} masks, expected one per image ({y_count} in Y_files)"
        )
    if missing_files(found, "data_mask_files", files) or space is None:
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
        found.problem(f"data_mask_files: {len(mismatched)} masks do not match the images: {_listing(mismatched)}")
    return files, list_path


_SAFE_MODE_FIX = ("fit it anyway with --no-safe-mode (safeMode: false in a YAML), or use a simpler term, "
                  "e.g. (1 | subject) instead of (1 + time | subject)")


def _check_identifiable(found: _Found, key: str, factors: list[RandomFactor], safe_mode: bool,
                        terms: dict[str, str]) -> None:
    """Safe mode: refuse, before any image is read, a design lme4 refuses (its default checks), or one
    whose every voxel upstream's safeMode would drop (n <= q, all factors' random effects together).

    ``key`` is where the model was given (formula or Z); ``terms`` names each factor's term as
    written, e.g. ``(1 + time | subject)``, or its factor file.
    """
    if not safe_mode or not factors:
        return
    problems = identifiability_problems(factors)
    for problem in problems:
        found.problem(f"{key}: {problem.message(terms.get(problem.factor))}; {_SAFE_MODE_FIX}")
    n, q = factors[0].n, sum(factor.q * factor.n_levels for factor in factors)
    if not problems and n <= q:
        parts = " + ".join(f"{factor.name} {factor.n_levels:,} x {factor.q}" for factor in factors)
        found.problem(f"{key}: the random effects of all terms together: {n:,} observations against {q:,} random effects "
                      f"({parts}); safe mode (upstream BLMM's safeMode) drops every voxel with no more "
                      f"observations than random effects, so none would be fitted; {_SAFE_MODE_FIX}")


def _check_missingness(found: _Found, n: int | None) -> tuple[float | None, int | None]:
    """``Missingness``: MinPercent (a fraction or 'NN%') and MinN (at most the number of images)."""
    value = found.raw.get("Missingness")
    if value is None:
        return None, None
    if not isinstance(value, dict):
        found.problem(f"Missingness: expected a mapping with MinPercent and/or MinN, found {_shorten(value)}")
        return None, None
    min_percent = min_n = None
    for key, entry in value.items():
        canonical = _MISSINGNESS_FIELDS.get(str(key).lower())
        if canonical is None:
            found.problem(f"Missingness: unknown field {str(key)!r}{_suggest(key, tuple(_MISSINGNESS_FIELDS.values()))}")
        elif entry is None:
            continue
        elif canonical == "MinPercent":
            min_percent = _min_percent(found, entry)
        else:
            min_n = read_number(found, "Missingness MinN", entry, integer=True, minimum=0)
            if min_n is not None and n is not None and min_n > n:
                found.problem(f"Missingness MinN: {min_n} is more than the {n} images; every voxel would be dropped")
    return min_percent, min_n


def _min_percent(found: _Found, entry: Any) -> float | None:
    label = "Missingness MinPercent"
    if isinstance(entry, str) and entry.strip().endswith("%"):
        parsed = read_number(found, label, entry.strip()[:-1], minimum=0, maximum=100)
        return None if parsed is None else parsed / 100.0
    if isinstance(entry, (int, float, str)) and not isinstance(entry, bool):
        try:
            number = float(parse_number(entry)) if isinstance(entry, str) else float(entry)
        except ValueError:
            number = None
        if number is not None and 1 < number <= 100:
            found.problem(
                f"{label}: expected a fraction in [0, 1] or a percentage string like "
                f"'{number:g}%', found {_shorten(entry)}"
            )
            return None
    return read_number(found, label, entry, minimum=0, maximum=1)


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


#: the ``correction:`` fields, in the order they are checked
CORRECTION_FIELDS = ("fdr", "resamples", "tfce", "cluster_threshold", "connectivity", "surface",
                     "blocks", "seed", "tail", "corrcon", "sigma2", "weights", "precision")


def _check_correction(found: _Found, space: ImageSpace | None,
                      factors: list[RandomFactor]) -> CorrectionSettings | None:
    """The ``correction:`` section (docs/corrected.md): every field's type and range, the blocks'
    factor, and for surface data with resamples or TFCE a mesh of the data's vertex count."""
    value = found.raw.get("correction")
    if value is None:
        return None
    if not read_entry_fields(found, "correction", value, CORRECTION_FIELDS, ", ".join(CORRECTION_FIELDS)):
        return None
    sub = _Found(value, found.base_dir("correction"), set())
    fdr = sub.raw.get("fdr", "bh")
    if fdr is False or (isinstance(fdr, str) and fdr.strip().lower() in ("false", "no", "off", "none")):
        fdr = None
    elif not (isinstance(fdr, str) and fdr.strip().lower() in FDR_METHODS):
        sub.problem(f"fdr: expected one of {', '.join(FDR_METHODS)} or false, found {_shorten(fdr)}")
        fdr = "bh"
    else:
        fdr = fdr.strip().lower()
    resamples = read_option_number(sub, "resamples", 0, integer=True, minimum=0)
    threshold = read_option_number(sub, "cluster_threshold", 3.0, minimum=0, strict_minimum=True)
    connectivity = read_option_number(sub, "connectivity", 6, integer=True)
    if sub.present("connectivity") and connectivity not in VOLUME_CONNECTIVITIES:
        sub.problem(f"connectivity: expected one of {', '.join(map(str, VOLUME_CONNECTIVITIES))}, "
                    f"found {_shorten(sub.raw['connectivity'])}")
        connectivity = 6
    seed = read_option_number(sub, "seed", 0, integer=True, minimum=0)
    flags = {key: read_flag(sub, key, False) for key in ("tfce", "tail", "corrcon")}
    sigma2 = sub.raw.get("sigma2", DEFAULT_SIGMA2)
    if sigma2 not in SIGMA2_MODES:
        sub.problem(f"sigma2: expected one of {', '.join(SIGMA2_MODES)}, found {_shorten(sigma2)}")
        sigma2 = DEFAULT_SIGMA2
    weights = sub.raw.get("weights", DEFAULT_WEIGHTS)
    if weights not in WEIGHTS:
        sub.problem(f"weights: expected one of {', '.join(WEIGHTS)}, found {_shorten(weights)}")
        weights = DEFAULT_WEIGHTS
    precision = sub.raw.get("precision", "float64")
    if precision not in PRECISIONS:
        sub.problem(f"precision: expected one of {', '.join(PRECISIONS)}, found {_shorten(precision)}")
        precision = "float64"
    blocks = _correction_blocks(sub, factors)
    surface = _correction_surface(sub)
    if resamples == 0 and flags["tail"]:
        sub.problem("tail: the tail approximation needs resamples > 0, found resamples 0")
    if space is not None and (resamples > 0 or flags["tfce"]):
        _check_correction_geometry(sub, space, surface)
    found.problems.extend(f"correction {text}" for text in sub.problems)
    return CorrectionSettings(fdr=fdr, resamples=int(resamples), tfce=flags["tfce"],
                              cluster_threshold=float(threshold), connectivity=int(connectivity),
                              surface=surface, blocks=blocks, seed=int(seed), tail=flags["tail"],
                              corrcon=flags["corrcon"], sigma2=sigma2, weights=weights, precision=precision)


def _correction_blocks(sub: _Found, factors: list[RandomFactor]) -> str | None:
    """``blocks``: a random factor whose levels' connected components hold whole components of
    every factor's levels (flipping signs inside a family is invalid)."""
    if not sub.present("blocks"):
        return None
    name = sub.raw["blocks"]
    names = [f.name for f in factors]
    if not isinstance(name, str) or name not in names:
        sub.problem(f"blocks: expected the name of a random factor ({', '.join(names) or 'none given'}), "
                    f"found {_shorten(name)}")
        return None
    split = check_blocks(independent_blocks(factors, [name]), independent_blocks(factors))
    if split.size:
        sub.problem(f"blocks: {name} splits {split.size} group(s) of images linked by the other random "
                    f"factors (e.g. one family's subjects); expected a factor that holds them whole, "
                    f"such as the outermost one (leave blocks out for the connected components)")
        return None
    return name


def _correction_surface(sub: _Found) -> str | dict[str, str] | None:
    """``surface``: a template name, a mesh file (relative to the YAML), or {left:, right:} for CIFTI."""
    if not sub.present("surface"):
        return None
    value = sub.raw["surface"]
    entries = value if isinstance(value, dict) else {None: value}
    out: dict[Any, str] = {}
    for hemi, spec in entries.items():
        label = "surface" if hemi is None else f"surface {hemi}"
        if isinstance(spec, str) and spec.strip() in TEMPLATE_MESHES:
            out[hemi] = spec.strip()
            continue
        path = read_path(sub, "surface", spec, label=label)
        if path is not None:
            out[hemi] = str(path)
    if len(out) != len(entries):
        return None
    return out if isinstance(value, dict) else out[None]


def _check_correction_geometry(sub: _Found, space: ImageSpace,
                               surface: str | dict[str, str] | None) -> None:
    """Clusters and TFCE need adjacency: surface data need a mesh with the data's vertex count."""
    one_dimensional = sum(size > 1 for size in space.shape) <= 1
    needs_mesh = space.format in ("gifti", "dat", "cifti") or one_dimensional
    if not needs_mesh:
        return
    if surface is None and sub.present("surface"):
        return  # already reported
    if surface is None and space.format != "cifti":  # a CIFTI of volume parts only needs none
        sub.problem(f"surface: {space.describe()} data need a mesh for clusters and TFCE: expected a "
                    f"GIfTI or FreeSurfer mesh file or one of {', '.join(TEMPLATE_MESHES)}, found none")
        return
    if isinstance(surface, str) and space.format == "cifti":
        sub.problem(f"surface: a CIFTI needs a mesh per hemisphere: expected {{left: ..., right: ...}}, "
                    f"found {_shorten(surface)}")
        return
    if isinstance(surface, str) and surface in TEMPLATE_MESHES:
        if TEMPLATE_MESHES[surface] != space.n_voxels:  # no need to read the template to know
            sub.problem(f"surface: mesh {surface} has {TEMPLATE_MESHES[surface]} vertices but the data "
                        f"({space.describe()}) have {space.n_voxels}: name the mesh the data were sampled on")
        return
    try:
        read_layout(space, np.ones(space.n_voxels, bool), surface=surface)
    except InputError as err:
        sub.problem("surface: " + str(err).removeprefix("surface: "))

"""``load_config``: read the inputs YAML, check every section, build a ``Config``.

``load_config`` only composes the stages: read the YAML (``readers._read_yaml``), apply the
overrides, run every section's check (``sections._check_*``, each collecting its problems in
one ``_Found``), raise one ``ConfigError`` listing them all, build the ``Config``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from blmm.errors import ConfigError

from blmm.config.formula import check_formula, check_model_keys
from blmm.config.readers import _Found, _read_yaml
from blmm.config.schema import Config
from blmm.config.sections import (
    _check_cluster,
    _check_contrasts,
    _check_correction,
    _check_data_masks,
    _check_design,
    _check_design_rows,
    _check_factors,
    _check_identifiable,
    _check_inputs,
    _check_keys,
    _check_mask,
    _check_missingness,
    _check_options,
    _check_outdir,
)

log = logging.getLogger("blmm.config")


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the inputs YAML; raise ConfigError listing every problem found.

    ``overrides`` replaces top-level keys (a value of None removes the key); relative
    paths in overrides resolve against the current directory, those in the YAML
    against the YAML's folder.  With ``path`` None the overrides are the whole input
    (``blmm --data ... --formula ...`` without a YAML).
    """
    yaml_path = None if path is None else Path(os.path.abspath(os.path.expanduser(str(path))))
    raw, override_keys = _apply_overrides({} if yaml_path is None else _read_yaml(yaml_path), overrides or {})
    found = _Found(raw, Path.cwd() if yaml_path is None else yaml_path.parent, override_keys)
    checked = _check_sections(found)
    if found.problems:
        raise ConfigError(found.problems,
                          source="the command-line arguments" if yaml_path is None else str(yaml_path))
    for warning in found.warnings:
        log.warning("%s: %s", "command line" if yaml_path is None else yaml_path.name, warning)
    return _build_config(yaml_path, checked, tuple(found.warnings))


def _apply_overrides(raw: dict, overrides: dict[str, Any]) -> tuple[dict, set[str]]:
    """Top-level keys replaced (None: removed) by ``overrides``; the keys they name."""
    raw = dict(raw)
    keys = set(overrides)
    for key, value in overrides.items():
        if value is None:
            raw.pop(key, None)
        elif key == "correction" and isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}  # flags replace single fields; their paths are absolute
            keys.discard(key)
        else:
            raw[key] = value
    return raw, keys


def _check_sections(found: _Found) -> dict[str, Any]:
    """Every check, in the order its problems are reported; what each read, by name."""
    _check_keys(found)
    formula_run = check_model_keys(found)
    checked: dict[str, Any] = {"options": _check_options(found, formula_run), "cluster": _check_cluster(found),
                               "outdir": _check_outdir(found)}
    y_files, y_list_path, space = _check_inputs(found)
    X, x_names, x_path = _check_design(found)
    _check_design_rows(found, X, x_path, y_files)
    if X is not None:
        n, n_source = int(X.shape[0]), f"the rows of X, {x_path.name}"
    elif y_files is not None:
        n, n_source = len(y_files), "the number of images in Y_files"
    else:
        n, n_source = None, ""
    factors, factor_paths = _check_factors(found, n, n_source)
    contrasts = [] if formula_run else _check_contrasts(found, None if X is None else int(X.shape[1]))
    formula = check_formula(found) if formula_run else None
    if formula is not None:  # the table and formula give the images, X, the factors and contrasts
        y_files, space, X, x_names, factors, contrasts = (
            formula.y_files, formula.space, formula.X, formula.x_names, formula.factors, formula.contrasts)
        n = int(X.shape[0])
    if formula is not None:
        terms = {t.name: t.source for t in formula.inputs.design.random_terms}
    else:
        terms = {f.name: f"{f.name} ({labels.name})" for f, (labels, _) in zip(factors, factor_paths)}
    _check_identifiable(found, "Z" if formula is None else "formula", factors, checked["options"]["safeMode"],
                        terms)
    checked.update(
        y_files=y_files, y_list_path=y_list_path, space=space, X=X, x_names=x_names, x_path=x_path,
        factors=factors, factor_paths=factor_paths, contrasts=contrasts,
        analysis_mask=_check_mask(found, space),
        formula=None if formula is None else formula.inputs,
    )
    checked["data_mask_files"], checked["data_mask_list_path"] = _check_data_masks(
        found, None if y_files is None else len(y_files), space)
    checked["min_percent"], checked["min_n"] = _check_missingness(found, n)
    checked["correction"] = _check_correction(found, space, factors)
    return checked


def _build_config(yaml_path: Path | None, checked: dict[str, Any], warnings: tuple[str, ...]) -> Config:
    """The typed ``Config`` of a YAML whose checks found no problem."""
    options, X = checked["options"], checked["X"]
    assert checked["outdir"] is not None and checked["y_files"] is not None
    assert checked["space"] is not None and X is not None
    return Config(
        yaml_path=yaml_path,
        outdir=checked["outdir"],
        y_files=checked["y_files"],
        space=checked["space"],
        X=X,
        x_names=checked["x_names"] or [f"x{j + 1}" for j in range(X.shape[1])],
        factors=checked["factors"],
        contrasts=checked["contrasts"],
        analysis_mask=checked["analysis_mask"],
        data_mask_files=checked["data_mask_files"],
        data_mask_thresh=options["data_mask_thresh"],
        min_percent=checked["min_percent"],
        min_n=checked["min_n"],
        maxmem=int(options["MAXMEM"]),
        output_covb=options["OutputCovB"],
        resms=options["resms"],
        minlog=float(options["minlog"]),
        method=options["method"],
        tol=float(options["tol"]),
        maxnit=int(options["maxnit"]),
        voxel_batching=options["voxelBatching"],
        maxnvb=int(options["maxnvb"]),
        safe_mode=options["safeMode"],
        cluster_type=options["clusterType"],
        num_nodes=int(options["numNodes"]),
        reml=options["REML"],
        two_sided=options["two_sided"],
        zero_is_missing=options["zero_is_missing"],
        cluster=checked["cluster"],
        report_threshold=float(options["report_threshold"]),
        correction=checked["correction"],
        x_path=checked["x_path"],
        y_list_path=checked["y_list_path"],
        data_mask_list_path=checked["data_mask_list_path"],
        factor_paths=tuple(checked["factor_paths"]),
        warnings=warnings,
        formula=checked["formula"],
    )

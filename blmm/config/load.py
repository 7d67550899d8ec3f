"""``load_config``: read the inputs YAML, check every section, build a ``Config``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


from blmm.core.design import RandomFactor
from blmm.engine.spec import CLUSTER_TYPES
from blmm.errors import ConfigError
from blmm.core.fit import METHODS

from blmm.config.readers import _read_yaml
from blmm.config.formula import check_formula, check_model_keys
from blmm.config.schema import DEFAULT_MAXMEM, DEFAULT_MINLOG, Config
from blmm.config.sections import _Checker

log = logging.getLogger("blmm.config")

def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the inputs YAML; raise ConfigError listing every problem found.

    ``overrides`` replaces top-level keys (a value of None removes the key); relative
    paths in overrides resolve against the current directory, those in the YAML
    against the YAML's folder.  With ``path`` None the overrides are the whole input
    (``blmm --data ... --formula ...`` without a YAML).
    """
    if path is None:
        yaml_path, raw = None, {}
    else:
        yaml_path = Path(os.path.abspath(os.path.expanduser(str(path))))
        raw = dict(_read_yaml(yaml_path))
    override_keys: set[str] = set()
    for key, value in (overrides or {}).items():
        override_keys.add(key)
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value

    check = _Checker(raw, Path.cwd() if yaml_path is None else yaml_path.parent, override_keys)
    check.unknown_keys()
    formula_run = check_model_keys(check)

    maxmem = check.option_number("MAXMEM", DEFAULT_MAXMEM, integer=True, minimum=1)
    tol = check.option_number("tol", 1e-6, minimum=0, strict_minimum=True)
    maxnit = check.option_number("maxnit", 10000, integer=True, minimum=1)
    maxnvb = check.option_number("maxnvb", 60, integer=True, minimum=1)
    num_nodes = check.option_number("numNodes", 1, integer=True, minimum=1)
    minlog = check.option_number("minlog", DEFAULT_MINLOG)
    report_threshold = check.option_number("report_threshold", 3.0, minimum=0)
    data_mask_thresh = check.option_number("data_mask_thresh", None)
    method = check.choice("method", METHODS, "pSFS")
    cluster_type = check.choice("clusterType", CLUSTER_TYPES, "local")
    flags = {key: check.flag(key, default) for key, default in (
        ("OutputCovB", True), ("resms", False), ("voxelBatching", False), ("safeMode", True),
        ("REML", True), ("two_sided", False), ("zero_is_missing", True),
    )}
    cluster = check.cluster()

    outdir = check.outdir() if check.present("outdir") else None
    y_files = y_list_path = space = None
    if check.present("Y_files"):
        y_files, y_list_path, space = check.y_files()
    X = x_names = x_path = None
    if check.present("X"):
        X, x_names, x_path = check.design_matrix()
        if X is not None and y_files is not None and X.shape[0] != len(y_files):
            check.problem(f"X: {x_path} has {X.shape[0]} rows but Y_files lists {len(y_files)} images (one row per image)")
    if X is not None:
        n, n_source = int(X.shape[0]), f"the rows of X, {x_path.name}"
    elif y_files is not None:
        n, n_source = len(y_files), "the number of images in Y_files"
    else:
        n, n_source = None, ""
    factors: list[RandomFactor] = []
    factor_paths: list[tuple[Path, Path]] = []
    if check.present("Z"):
        factors, factor_paths = check.random_factors(n, n_source)
    contrasts = check.contrasts(None if X is None else int(X.shape[1])) \
        if check.present("contrasts") and not formula_run else []
    formula = check_formula(check) if formula_run else None
    if formula is not None:
        y_files, space, X, x_names, factors, contrasts = (
            formula.y_files, formula.space, formula.X, formula.x_names, formula.factors, formula.contrasts)
        n = X.shape[0]
    analysis_mask = check.analysis_mask(space)
    data_mask_files, data_mask_list_path = check.data_masks(
        None if y_files is None else len(y_files), space)
    min_percent, min_n = check.missingness(n)

    if check.problems:
        raise ConfigError(check.problems, source="the command-line arguments" if yaml_path is None else str(yaml_path))
    for warning in check.warnings:
        log.warning("%s: %s", "command line" if yaml_path is None else yaml_path.name, warning)
    assert outdir is not None and y_files is not None and space is not None and X is not None
    return Config(
        yaml_path=yaml_path,
        outdir=outdir,
        y_files=y_files,
        space=space,
        X=X,
        x_names=x_names or [f"x{j + 1}" for j in range(X.shape[1])],
        factors=factors,
        contrasts=contrasts,
        analysis_mask=analysis_mask,
        data_mask_files=data_mask_files,
        data_mask_thresh=data_mask_thresh,
        min_percent=min_percent,
        min_n=min_n,
        maxmem=int(maxmem),
        output_covb=flags["OutputCovB"],
        resms=flags["resms"],
        minlog=float(minlog),
        method=method,
        tol=float(tol),
        maxnit=int(maxnit),
        voxel_batching=flags["voxelBatching"],
        maxnvb=int(maxnvb),
        safe_mode=flags["safeMode"],
        cluster_type=cluster_type,
        num_nodes=int(num_nodes),
        reml=flags["REML"],
        two_sided=flags["two_sided"],
        zero_is_missing=flags["zero_is_missing"],
        cluster=cluster,
        report_threshold=float(report_threshold),
        x_path=x_path,
        y_list_path=y_list_path,
        data_mask_list_path=data_mask_list_path,
        factor_paths=tuple(factor_paths),
        warnings=tuple(check.warnings),
        formula=None if formula is None else formula.inputs,
    )


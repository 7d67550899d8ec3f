"""The formula section of the inputs YAML: a participants table and an lme4 formula.

    data: participants.tsv        # one row per image (.tsv tab-separated, else CSV)
    images: image_file            # the column naming each row's image (relative to the table)
    formula: "~ age + sex + (1 + time | subject)"
    na_action: omit               # or error
    contrasts:
      - age: "age"                # name: coefficient, term or linear combination
      - site: "site"

resolves to the same ``Config`` fields as upstream's ``Y_files`` / ``X`` / ``Z`` / contrast
vectors (images, X, x_names, factors, contrasts), so the pipeline needs nothing else.  Every
problem is collected on the shared checker, named by its key.  See docs/inputs.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blmm.config.readers import _listing, _shorten, _vector_from_yaml, read_choice, read_path
from blmm.core.design import Contrast, RandomFactor
from blmm.io.images import ImageSpace

FORMULA_KEYS = ("data", "images", "formula", "na_action")
UPSTREAM_MODEL_KEYS = ("Y_files", "X", "Z")
NA_ACTIONS = ("omit", "error")
_CONTRAST_FIELDS = ("name", "spec", "vector", "statType")
_MAX_RECORDED_DROPS = 200  # dropped rows listed one by one in blmm_run.json


@dataclass(frozen=True, eq=False)
class FormulaInputs:
    """Where a formula run's model came from, and the design it resolved to."""

    data: Path
    images: str  # the images column
    formula: str
    na_action: str
    design: Any = field(repr=False)  # blmm.formula.ModelDesign
    contrast_specs: tuple[tuple[str, Any], ...] = ()  # (name, spec text or vector) per contrast

    @property
    def dropped(self) -> list:
        return list(self.design.dropped)

    def summary_line(self) -> str:
        """One line for the run log: rows used and dropped (R's na.omit)."""
        d = self.design
        line = f"blmm: formula {self.formula}: {d.n} of {d.n_table} table rows used"
        if d.dropped:
            reasons: dict[str, int] = {}
            for row in d.dropped:
                reasons[row.reason] = reasons.get(row.reason, 0) + 1
            why = "; ".join(f"{k} row{'s' if k != 1 else ''}: {why}" for why, k in reasons.items())
            line += f", {len(d.dropped)} dropped for missing values (na.omit; {why})"
        return line

    def yaml_keys(self, contrasts: list[Contrast]) -> dict[str, Any]:
        """The model keys of the resolved inputs.yml: data, images, formula, na_action, contrasts.

        Each contrast keeps its spec and also its vector (so tools that read only vectors work).
        """
        entries = []
        specs = dict(self.contrast_specs)
        for index, contrast in enumerate(contrasts):
            vector = contrast.matrix[0].tolist() if contrast.is_t else contrast.matrix.tolist()
            body: dict[str, Any] = {"name": contrast.name}
            spec = specs.get(contrast.name)
            if isinstance(spec, str):
                body["spec"] = spec
            body["vector"] = vector
            entries.append({f"c{index + 1}": body})
        return {"data": str(self.data), "images": self.images, "formula": self.formula,
                "na_action": self.na_action, "contrasts": entries}

    def record(self) -> dict[str, Any]:
        """The ``formula`` entry of blmm_run.json: names, terms, rows used and dropped."""
        d = self.design
        return {
            "formula": self.formula,
            "data": str(self.data),
            "images": self.images,
            "na_action": self.na_action,
            "rows_in_table": int(d.n_table),
            "rows_used": int(d.n),
            "rows_dropped": len(d.dropped),
            "dropped": [{"row": int(r.row) + 1, "index": str(r.index), "reason": r.reason}
                        for r in d.dropped[:_MAX_RECORDED_DROPS]],
            "coefficients": list(d.columns),
            "r_coefficients": list(d.r_columns),
            "fixed_terms": {t: [d.columns[j] for j in cols] for t, cols in d.terms.items()},
            "random_terms": [{"name": t.name, "group": t.group, "source": t.source,
                              "columns": list(t.columns), "r_columns": list(t.r_columns),
                              "levels": len(t.levels)} for t in d.random_terms],
        }


@dataclass
class FormulaModel:
    """What the formula section resolves to: the Config fields it fills."""

    inputs: FormulaInputs
    y_files: list[Path]
    space: ImageSpace | None
    X: np.ndarray
    x_names: list[str]
    factors: list[RandomFactor]
    contrasts: list[Contrast]


def uses_formula(raw: dict) -> bool:
    """True when the YAML describes its model with the formula keys."""
    return any(raw.get(key) is not None for key in FORMULA_KEYS)


def check_model_keys(check) -> bool:
    """Which way the model is given; reports mixed or missing keys.  True for a formula run."""
    formula_keys = [k for k in FORMULA_KEYS if check.present(k)]
    upstream_keys = [k for k in UPSTREAM_MODEL_KEYS if check.present(k)]
    if formula_keys:
        if upstream_keys:
            check.problem(
                f"{', '.join(formula_keys)} and {', '.join(upstream_keys)}: give the model either as a "
                "formula over a table (data, images, formula) or as upstream's Y_files, X and Z, not both")
        for key in ("data", "formula"):
            if not check.present(key):
                check.problem(f"{key}: required key is missing (a formula run needs data and formula)")
        return True
    for key in UPSTREAM_MODEL_KEYS:
        if not check.present(key):
            check.problem(f"{key}: required key is missing")
    return False


def _key_of(message: str) -> str:
    """Which YAML key a FormulaError is about."""
    if message.startswith(("images column", "unknown images column", "no images column",
                           "the formula's left-hand side")):
        return "images"
    if "participants table" in message:
        return "data"
    if message.startswith("contrast"):
        return "contrasts"
    return "formula"


def check_formula(check) -> FormulaModel | None:
    """Read the table, build the design, resolve images and contrasts; None after a problem."""
    from blmm.formula import FormulaError, design_from_table, read_table

    na_action = read_choice(check, "na_action", NA_ACTIONS, "omit")
    images = check.raw.get("images")
    if images is not None and (not isinstance(images, str) or not images.strip()):
        check.problem(f"images: expected the name of the table's column of image paths, found {_shorten(images)}")
        return None
    formula = check.raw.get("formula")
    if formula is None or not check.present("data"):
        return None
    if not isinstance(formula, str) or not formula.strip():
        check.problem(f"formula: expected an lme4 formula such as \"~ age + (1 | subject)\", found {_shorten(formula)}")
        return None
    data_path = read_path(check, "data", check.raw["data"])
    if data_path is None:
        return None
    try:
        table = read_table(data_path)
        design, paths = design_from_table(table, formula, images=images.strip() if images else None,
                                          table_dir=data_path.parent, na_action=na_action)
    except FormulaError as err:
        text = str(err)
        key = _key_of(text)
        where = f" ({data_path.name})" if key != "data" else ""
        check.problem(f"{key}: {text}{where}")
        return None
    check.warnings.extend(f"formula: {note}" for note in design.notes)
    column = design.images
    label = f"images (column {column!r} of {data_path.name})"
    ok = _check_image_paths(check, label, design, paths)
    contrasts, specs = _contrasts(check, design)
    inputs = FormulaInputs(data_path, column, formula.strip(), na_action, design, tuple(specs))
    space = _image_space(check, label, paths) if ok else None
    return FormulaModel(inputs, paths, space, design.X, list(design.columns), list(design.factors),
                        contrasts)


def _check_image_paths(check, label: str, design, paths: list[Path]) -> bool:
    missing = [f"data row {int(r) + 1}: {p}" for r, p in zip(design.rows, paths) if not p.is_file()]
    if missing:
        check.problem(f"{label}: {len(missing)} of {len(paths)} image files not found: {_listing(missing)}")
    seen: dict[str, int] = {}
    repeated = []
    for r, p in zip(design.rows, paths):
        real = os.path.realpath(p)
        if real in seen:
            repeated.append(f"data rows {seen[real] + 1} and {int(r) + 1}: {p}")
        else:
            seen[real] = int(r)
    if repeated:
        check.problem(f"{label}: {len(repeated)} images are named on more than one row (one row per image "
                      f"is needed): {_listing(repeated)}")
    return not missing


def _image_space(check, label: str, paths: list[Path]) -> ImageSpace | None:
    """The header checks of Y_files, run on the table's images, reported under ``label``."""
    saved = check.raw.get("Y_files", None)
    before = len(check.problems)
    check.raw["Y_files"] = [str(p) for p in paths]
    try:
        from blmm.config.sections import _check_inputs  # the Y_files header checks, reused

        _, _, space = _check_inputs(check)
    finally:
        if saved is None:
            check.raw.pop("Y_files", None)
        else:
            check.raw["Y_files"] = saved
    for i in range(before, len(check.problems)):
        text = check.problems[i]
        if text.startswith("Y_files"):
            check.problems[i] = label + text[len("Y_files"):]
    check.warnings[:] = [label + w[len("Y_files"):] if w.startswith("Y_files") else w for w in check.warnings]
    return space


def _contrast_entries(value: Any) -> list[tuple[str, Any]] | None:
    """(name, spec) per entry: ``- name: spec``, ``- spec``, ``- c1: {name, spec | vector}``,
    or a mapping ``{name: spec}``."""
    if isinstance(value, dict):
        value = [{k: v} for k, v in value.items()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    found = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            found.append((item.strip(), item))
        elif isinstance(item, dict) and len(item) == 1 and not isinstance(next(iter(item.values())), dict) \
                and next(iter(item)) not in _CONTRAST_FIELDS:
            key, spec = next(iter(item.items()))
            found.append((str(key), spec))
        elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), dict):
            key, body = next(iter(item.items()))
            found.append((str(key), body))
        else:
            found.append((f"c{index + 1}", item))
    return found


def _parse_vector(check, label: str, spec: Any) -> list | None:
    """A contrast vector from the YAML (flat: T, nested: F); None after reporting a problem."""
    try:
        return _vector_from_yaml(spec)
    except (ValueError, TypeError) as err:
        check.problem(f"{label}: a vector must be a list of numbers (T) or of rows (F), found "
                      f"{_shorten(spec)} ({err})")
        return None


def _contrasts(check, design) -> tuple[list[Contrast], list[tuple[str, Any]]]:
    from blmm.formula import FormulaError

    if not check.present("contrasts"):
        return [], []
    entries = _contrast_entries(check.raw["contrasts"])
    if entries is None:
        check.problem("contrasts: expected a list of named contrasts (- age: \"age\", - site: \"site\"), "
                      f"found {_shorten(check.raw['contrasts'])}")
        return [], []
    contrasts, specs = [], []
    names_seen: set[str] = set()
    for key, body in entries:
        name, spec = key, body
        if isinstance(body, dict):  # upstream-style entry: name and spec or vector
            unknown = [f for f in body if f not in _CONTRAST_FIELDS]
            if unknown:
                check.problem(f"contrasts {key}: unknown field {unknown[0]!r} (expected name and spec or vector)")
                continue
            name = str(body.get("name") or key)
            spec = body.get("spec")
            if spec is None:
                spec = body.get("vector")
                if spec is None:
                    check.problem(f"contrasts {key} ({name}): give spec (a coefficient, term or combination) "
                                  "or vector")
                    continue
                spec = _parse_vector(check, f"contrasts {key} ({name})", spec)
                if spec is None:
                    continue
        label = f"contrasts {name}"
        if isinstance(spec, list):
            spec = _parse_vector(check, label, spec)
            if spec is None:
                continue
        if not isinstance(spec, (str, list)):
            check.problem(f"{label}: expected a coefficient, term or linear combination of coefficient names, "
                          f"found {_shorten(spec)}")
            continue
        if name in names_seen:
            check.problem(f"{label}: the name is used by another contrast; names must be unique")
            continue
        names_seen.add(name)
        try:
            contrast = design.contrast(spec, name)
        except (FormulaError, ValueError) as err:
            text = str(err)
            prefix = f"contrast {name!r}: "
            check.problem(f"{label}: {text[len(prefix):] if text.startswith(prefix) else text}")
            continue
        L = contrast.matrix
        rank = int(np.linalg.matrix_rank(L))
        if rank == 0:
            check.problem(f"{label}: the contrast is all zeros")
            continue
        if rank < L.shape[0]:
            check.problem(f"{label}: F contrast has {L.shape[0]} rows but rank {rank}; its rows must be "
                          "linearly independent")
            continue
        contrasts.append(contrast)
        specs.append((name, spec))
    return contrasts, specs

"""What a finished run (or comparison) folder says, read into plain objects for the report:
``summarise_run`` (the model, settings and counts: ``RunDescription``), ``map_geometry``
(where its maps are drawn), ``read_report_map`` and the numbers of a map (``histogram``,
``contrast_numbers``).  No HTML here (that is ``page``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blmm.core.inference import sidedness
from blmm.core.varcorr import CorrelationTerm, VarianceTerm, variance_components
from blmm.errors import InputError, ViewerError
from blmm.io.images import image_space
from blmm.io.outdir import (
    RUN_FILE,
    ContrastEntry,
    contrast_entries,
    load_map,
    read_run_record,
    read_settings,
    settings_entries,
)
from blmm.io.surfaces import FSAVERAGE5_N_VERTICES, Mesh, cifti_cortices, fsaverage5_mesh, hemisphere_from_names

DEFAULT_REPORT_THRESHOLD = 3.0
HISTOGRAM_BINS = 60


# ------------------------------------------------------------------ what the run says


@dataclass(frozen=True)
class FactorSummary:
    """One random factor: name, effects per level, number of levels, design column names."""

    name: str
    q: int
    levels: int
    design_names: list[str]


ContrastSummary = ContrastEntry  # one contrast of the run's settings


@dataclass
class RunDescription:
    """Everything the report says about a run, gathered from its output folder."""

    outdir: Path
    n: int | None
    p: int | None
    x_names: list[str]
    factors: list[FactorSummary]
    contrasts: list[ContrastSummary]
    settings: dict
    record: dict
    threshold: float
    notes: list[str] = field(default_factory=list)

    @property
    def q(self) -> int:
        """Columns of Z: Σ_k q_k × levels_k."""
        return sum(f.q * f.levels for f in self.factors)

    @property
    def t_sidedness(self) -> str:
        """How the T contrasts' p-values were computed (the run's two_sided setting)."""
        return sidedness(bool(self.settings.get("two_sided")))


def _table_header(path: Any) -> list[str] | None:
    """Column names of a CSV/TSV table (its header row), or None when unreadable/absent."""
    from blmm.io.tables import read_matrix

    if not isinstance(path, str):
        return None
    try:
        return read_matrix(Path(path))[1]
    except (InputError, OSError, ValueError, IndexError):
        return None


def summarise_run(outdir: str | Path) -> RunDescription:
    """The model, settings and counts of a finished run, from its files only.

    Settings come from ``blmm_run.json`` (the resolved inputs, as ``inputs.yml``); the names
    of X's and Z's columns from the header rows of the tables they point to. Nothing here
    reads the images, so a report can be rewritten after the inputs have moved.
    """
    folder = Path(outdir)
    record = read_run_record(folder)
    settings = read_settings(folder, record)
    notes = []
    if not record:
        notes.append(f"{RUN_FILE} is missing or unreadable: counts and timings are not shown.")
    p = record.get("p")
    recorded_names = record.get("x_names")  # the run's names: a formula's coefficients, or X's header
    unnamed = [f"x{j + 1}" for j in range(int(p or 0))]  # what a run records for X without a header
    # X's header is read again only when the run recorded no names of its own (reading all of X: ~0.1 s)
    x_names = recorded_names if isinstance(recorded_names, list) and (settings.get("formula") or recorded_names != unnamed) \
        else _table_header(settings.get("X"))
    if x_names is None or (p is not None and len(x_names) != p):
        x_names = [f"x{j + 1}" for j in range(int(p or 0))]
        if p:
            notes.append("X has no header row (or could not be read): columns are called x1, x2, ….")
    recorded_factors = record.get("factors") or []
    factors = []
    for position, (key, body) in enumerate(settings_entries(settings.get("Z"))):
        recorded = recorded_factors[position] if position < len(recorded_factors) else {}
        q = int(recorded.get("q", 0))
        design_names = recorded.get("columns") or _table_header(body.get("design"))  # the run's own names first
        if design_names is None or (q and len(design_names) != q):
            design_names = [f"z{j + 1}" for j in range(q)]
        factors.append(FactorSummary(str(body.get("name") or recorded.get("name") or key), q,
                                     int(recorded.get("levels", 0)), design_names))
    formula = record.get("formula") or {}
    for position, term in enumerate(formula.get("random_terms") or []):  # a formula run: no Z tables
        recorded = recorded_factors[position] if position < len(recorded_factors) else {}
        factors.append(FactorSummary(str(term.get("name")), int(recorded.get("q", len(term.get("columns", [])))),
                                     int(recorded.get("levels", term.get("levels", 0))),
                                     list(term.get("r_columns") or term.get("columns") or [])))
    if formula.get("rows_dropped"):
        notes.append(f"{formula['rows_dropped']} of {formula.get('rows_in_table')} table rows were left out "
                     "for missing values (na_action: omit); blmm_run.json lists them.")
    contrasts = contrast_entries(settings)
    threshold = settings.get("report_threshold", DEFAULT_REPORT_THRESHOLD)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        threshold = DEFAULT_REPORT_THRESHOLD
    return RunDescription(folder, record.get("n"), p, x_names, factors, contrasts, settings, record,
                      threshold, notes)


def _number(value: float) -> str:
    """A coefficient as written in a formula: 1, -1, 0.5, 1/3 as 0.3333."""
    return f"{value:g}" if float(value) != int(value) else str(int(value))


def contrast_text(vector: list, x_names: list[str]) -> str:
    """``time − age_baseline`` for [0, 0, -1, 1, ...]; F contrasts as rows joined by "; "."""
    if any(isinstance(row, list) for row in vector):
        return "; ".join(contrast_text(row, x_names) for row in vector)
    terms = []
    for weight, name in zip(vector, x_names + [f"x{j + 1}" for j in range(len(x_names), len(vector))]):
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            return str(vector)
        if weight == 0:
            continue
        magnitude = "" if abs(weight) == 1 else f"{_number(abs(weight))}·"
        sign = "−" if weight < 0 else "+"
        terms.append((sign, f"{magnitude}{name}"))
    if not terms:
        return "0"
    text = ("−" if terms[0][0] == "−" else "") + terms[0][1]
    return text + "".join(f" {sign} {term}" for sign, term in terms[1:])


def model_formula(summary: RunDescription) -> str:
    """lme4-like: ``Y ~ intercept + age + … + (intercept + time | subject)``; a formula run's own formula."""
    written = summary.settings.get("formula")
    if isinstance(written, str) and written.strip():
        written = written.strip()
        return "Y " + written if written.startswith("~") else written
    fixed = " + ".join(summary.x_names) or "?"
    random = "".join(f" + ({' + '.join(f.design_names) or '1'} | {f.name})" for f in summary.factors)
    return f"Y ~ {fixed}{random}"


# ------------------------------------------------------------------ where maps are drawn


@dataclass(frozen=True, eq=False)
class SurfacePanel:
    """One mesh of a surface figure: the map rows shown on it and their mesh vertices."""

    hemi: str
    mesh: Mesh
    rows: np.ndarray
    vertices: np.ndarray


@dataclass(frozen=True, eq=False)
class MapGeometry:
    """How the maps of a folder are drawn: on surfaces, as volume slices, or not at all."""

    n_voxels: int
    format: str
    description: str
    panels: tuple[SurfacePanel, ...] = ()
    volume_shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    note: str | None = None

    @property
    def kind(self) -> str:
        return "surface" if self.panels else "volume" if self.volume_shape else "none"


def _fsaverage5_panels(hemis: list[str]) -> tuple[SurfacePanel, ...]:
    """Consecutive blocks of map rows on the fsaverage5 hemispheres, in order."""
    panels, start = [], 0
    for hemi in hemis:
        mesh = _fsaverage5(hemi)
        rows = np.arange(start, start + mesh.n_vertices)
        panels.append(SurfacePanel(hemi, mesh, rows, np.arange(mesh.n_vertices)))
        start += mesh.n_vertices
    return tuple(panels)


@functools.lru_cache(maxsize=2)
def _fsaverage5(hemi: str) -> Mesh:
    return fsaverage5_mesh(hemi, "pial")


def map_geometry(mask_path: Path, hemi_hints: tuple[str, ...] = ()) -> MapGeometry:
    """Decide how to draw the maps that share ``mask_path``'s grid (see the module docstring)."""
    no_mesh = ("view them on your own surface with blmm_view OUTDIR MAP --surface "
               "lh.pial (docs/viewer.md)")
    if mask_path.name.endswith(".dat"):
        # A .dat mask is int32 with one value per vertex and no header.
        n_voxels, fmt, space = mask_path.stat().st_size // 4, "dat", None
    else:
        space = image_space(mask_path)
        n_voxels, fmt = space.n_voxels, space.format
    try:
        if fmt == "cifti":
            return _cifti_geometry(mask_path, space, no_mesh)
        if fmt in ("nifti", "mgh") and sum(1 for n in space.shape if n > 1) > 1:
            shape = "×".join(str(n) for n in space.shape)
            return MapGeometry(n_voxels, fmt, f"volume {shape} voxels", volume_shape=tuple(space.shape),
                               affine=np.asarray(space.affine, dtype=float))
        if n_voxels == 2 * FSAVERAGE5_N_VERTICES:
            return MapGeometry(n_voxels, fmt, "fsaverage5, left and right hemispheres "
                               f"({n_voxels} vertices, left first)", _fsaverage5_panels(["left", "right"]))
        if n_voxels == FSAVERAGE5_N_VERTICES:
            hemi = hemisphere_from_names(*hemi_hints)
            note = None if hemi else ("the folder and file names do not say which hemisphere this is: "
                                      "drawn on the left fsaverage5 hemisphere")
            return MapGeometry(n_voxels, fmt, f"fsaverage5, {hemi or 'left'} hemisphere ({n_voxels} vertices)",
                               _fsaverage5_panels([hemi or "left"]), note=note)
    except ViewerError as err:  # nilearn (the meshes) missing
        return MapGeometry(n_voxels, fmt, f"{n_voxels} vertices",
                           note=f"no surface figures: {err}. The histograms below still describe the maps")
    return MapGeometry(n_voxels, fmt, f"{n_voxels} vertices",
                       note=f"no known mesh has {n_voxels} vertices (fsaverage5 has {FSAVERAGE5_N_VERTICES} "
                            f"per hemisphere): the maps are summarised as histograms only; {no_mesh}")


def _cifti_geometry(path: Path, space: Any, no_mesh: str) -> MapGeometry:
    panels, sizes = [], []
    for hemi, rows, vertices, n_mesh in cifti_cortices(space):
        sizes.append(f"{hemi} {n_mesh}")
        if n_mesh == FSAVERAGE5_N_VERTICES:
            panels.append(SurfacePanel(hemi, _fsaverage5(hemi), rows, vertices))
    described = f"CIFTI, {space.n_voxels} grayordinates"
    if panels and len(panels) == len(sizes):
        hemis = " and ".join(panel.hemi for panel in panels)
        return MapGeometry(space.n_voxels, "cifti", f"{described}: cortex on fsaverage5 ({hemis})", tuple(panels))
    why = (f"its cortex meshes have {', '.join(sizes)} vertices, not fsaverage5's {FSAVERAGE5_N_VERTICES}"
           if sizes else "it has no cortical surface (CORTEX_LEFT/RIGHT)")
    return MapGeometry(space.n_voxels, "cifti", described,
                       note=f"no surface figures for this CIFTI file: {why}; the maps are summarised as "
                            f"histograms only; {no_mesh}")


def read_report_map(outdir: Path, stat: str, geometry: MapGeometry) -> np.ndarray | None:
    """Map ``stat`` of ``outdir`` as float64 (n_voxels, k), or None if it is not there."""
    try:
        values = load_map(outdir, stat, n_vertices=geometry.n_voxels if geometry.format == "dat" else None)
    except (ViewerError, OSError, ValueError):
        return None
    if values.shape[0] != geometry.n_voxels:
        return None
    return values.astype(np.float64)


# ------------------------------------------------------------------ numbers


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS,
              selected: np.ndarray | None = None) -> dict | None:
    """Bin centres, widths and counts of the finite values (and of ``selected`` ones)."""
    finite = np.isfinite(values)
    data = values[finite]
    if data.size == 0:
        return None
    low, high = float(data.min()), float(data.max())
    if np.all(data == np.round(data)) and high - low <= 4 * bins:
        # Counts such as iterations: one bar per integer, centred on it.
        edges = np.arange(low - 0.5, high + 1.0)
    else:
        if low == high:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
    counts = np.histogram(data, edges)[0]
    out = {"centres": (edges[:-1] + edges[1:]) / 2, "width": float(edges[1] - edges[0]), "counts": counts}
    if selected is not None:
        out["selected"] = np.histogram(values[finite & selected], edges)[0]
    return out


def contrast_numbers(stat: np.ndarray, mlog10p: np.ndarray | None, df: np.ndarray | None,
                     threshold: float) -> dict:
    """Voxels tested and above threshold, the statistic's range, max −log10 p, df quartiles."""
    finite = _finite(stat)
    numbers: dict[str, Any] = {"tested": int(finite.size)}
    if finite.size:
        numbers.update(stat_min=float(finite.min()), stat_max=float(finite.max()))
    if mlog10p is not None:
        lp = _finite(mlog10p)
        numbers["above"] = int(np.count_nonzero(lp > threshold))
        numbers["lp_max"] = float(lp.max()) if lp.size else None
    if df is not None:
        dfs = _finite(df)
        if dfs.size:
            numbers["df_quartiles"] = [float(v) for v in np.percentile(dfs, [0, 25, 50, 75, 100])]
    return numbers


def random_effects(summary: RunDescription, geometry: MapGeometry) -> tuple[list[VarianceTerm], list[CorrelationTerm]] | None:
    """lme4's VarCorr per fitted voxel, from ``blmm_vox_D`` and ``blmm_vox_sigma2``: every factor's
    variances (σ² D_k[i, i]) and correlations, and the residual variance; None without the maps."""
    D = read_report_map(summary.outdir, "D", geometry)
    sigma2 = read_report_map(summary.outdir, "sigma2", geometry)
    factors = [(f.name, list(f.design_names)) for f in summary.factors]
    if D is None or sigma2 is None or D.shape[1] != sum(len(c) * (len(c) + 1) // 2 for _, c in factors):
        return None
    return variance_components(D, sigma2[:, 0], factors)

"""``report.html``: one self-contained page that shows what a blmm run (or comparison) found.

``write_report(outdir)`` is called by the pipeline at the end of every run; it reads (through
``summary``) only what the run left in ``outdir`` (``blmm_run.json``, ``inputs.yml``, the ``blmm_vox_*``
maps) and writes ``outdir/report.html`` atomically:

* the model: a formula-like summary, X's columns, the random factors, n, p, q, REML/ML,
  method, tol and the contrasts;
* convergence: the counts of ``blmm_run.json`` and the ``blmm_vox_nit`` map;
* per contrast: the T or F map where −log10 p > ``report_threshold`` (an inputs key,
  default 3) on fsaverage5 (10242 or 20484 = left + right vertices, or a CIFTI's cortex on
  fsaverage5) or as slices of a NIfTI volume, plus histograms of the statistic and of
  its Satterthwaite df. Other surfaces get the histograms and a note.

``write_compare_report(outdir)`` does the same for a ``blmm_compare`` folder (the Chi2lp
map, histograms of Chi2 and Chi2lp, and the null distribution used).

Figures need the ``[viewer]`` extra (plotly; nilearn for the meshes). Without plotly the
page holds the tables and numbers only, and says how to install the extra. With it,
plotly.js is embedded once for the whole page (it works offline), the mesh geometry once
per surface, and figures are drawn when scrolled into view (WebGL contexts are limited,
so surfaces far out of view are released).
"""
from __future__ import annotations

import base64
import datetime
import functools
import html
import importlib
import json
import math
from pathlib import Path
from importlib import resources
from typing import Any

import numpy as np

from blmm.version import __version__
from blmm.errors import InputError, ViewerError
from blmm.io.images import to_canonical
from blmm.io.outdir import (
    CLUSTERS_FILE,
    COMPARE_FILE,
    MAP_PREFIX,
    REPORT_FILE,
    contrast_test_maps,
    corrected_map_stat,
    find_map,
    read_cluster_table,
    read_compare_record,
    read_null_maxima,
    read_run_record,
    write_text_atomically,
)
from blmm.io.surfaces import Mesh
from blmm.report.summary import (
    DEFAULT_REPORT_THRESHOLD,
    ContrastSummary,
    MapGeometry,
    RunDescription,
    SurfacePanel,
    _finite,
    contrast_numbers,
    contrast_text,
    histogram,
    map_geometry,
    model_formula,
    random_effects,
    read_report_map,
    summarise_run,
)
from blmm.core.varcorr import spread


def _asset(name: str) -> str:
    """A file of blmm/report/assets (package data: CSS and JavaScript of the page)."""
    return resources.files("blmm.report").joinpath("assets", name).read_text(encoding="utf-8")


# Volumes are shown as three maximum-intensity projections ("glass brain"): ~0.2 MB per
# 2 mm map, where slices with sliders would cost ~3 MB (16 slices) to ~16 MB (64).
PROJECTION_VIEWS = (  # name, axis projected over, (horizontal axis, vertical axis)
    ("sagittal", 0, (1, 2)),
    ("coronal", 1, (0, 2)),
    ("axial", 2, (0, 1)),
)
OUTLINE_COLOURS = [[0.0, "rgb(255, 255, 255)"], [1.0, "rgb(222, 222, 226)"]]
# WebGL surfaces kept drawn at once: browsers drop the oldest context beyond ~16, and a
# two-hemisphere figure holds two.
MAX_LIVE_WEBGL_FIGURES = 6
VIEWER_EXTRA_HINT = "pip install 'blmm[viewer]'"



# ------------------------------------------------------------------ the page


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def _round(values: np.ndarray, digits: int = 4) -> list[float]:
    """Values as short JSON numbers (``digits`` significant digits)."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]



def plotly_available() -> bool:
    """Whether figures can be drawn (the ``[viewer]`` extra is installed)."""
    try:
        for module in ("plotly.graph_objects", "plotly.offline"):
            importlib.import_module(module)
    except ImportError:
        return False
    return True


# plotly.js's typed arrays (what plotly.io.to_json writes for numpy arrays); int64 has none
_TYPED_CODES = {np.dtype(np.float64): "f8", np.dtype(np.float32): "f4", np.dtype(np.int32): "i4",
                np.dtype(np.uint32): "u4", np.dtype(np.int16): "i2", np.dtype(np.uint16): "u2",
                np.dtype(np.int8): "i1", np.dtype(np.uint8): "u1"}
_TYPED_KINDS = {code: dtype for dtype, code in _TYPED_CODES.items()}


def _typed(array: np.ndarray, dtype: str) -> dict:
    """A base64 typed-array spec {dtype, bdata} (plotly.js's; the page's script decodes the shared
    geometry's), ``dtype`` one of `_TYPED_CODES`' codes."""
    data = np.ascontiguousarray(array, dtype=_TYPED_KINDS[dtype])
    return {"dtype": dtype, "bdata": base64.b64encode(data.tobytes()).decode("ascii")}


def figure_json(value: Any) -> Any:
    """A plotly figure given as a dict, as JSON values, as ``plotly.io.to_json`` writes a figure
    without building plotly's figure objects (~0.1 s of validators the first time in a process):
    numeric numpy arrays as base64 typed arrays (2-D with their shape; int64 as i4 where it fits;
    booleans as a list, as plotly writes them), numpy scalars as numbers, non-finite floats as null,
    and keys set to None left out (unset)."""
    if isinstance(value, dict):
        return {key: figure_json(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [figure_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return _typed_array(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _typed_array(array: np.ndarray) -> Any:
    if array.dtype == np.int64:
        fits = array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max)
        array = array.astype(np.int32 if fits else np.float64)
    code = _TYPED_CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim > 2:
        return figure_json(array.tolist())  # text, objects: plain lists
    spec = _typed(array, code)
    if array.ndim == 2:
        spec["shape"] = f"{array.shape[0]}, {array.shape[1]}"
    return spec


@functools.cache
def default_template_text() -> str:
    """plotly's default template ("plotly", which plotly's figures take) as compact JSON: read from
    plotly's package data (plotly.io's template object would build figure objects)."""
    try:
        raw = resources.files("plotly").joinpath("package_data/templates/plotly.json").read_text()
    except (OSError, ModuleNotFoundError):
        import plotly.io as pio

        raw = pio.to_json(pio.templates["plotly"], validate=False)
    return json.dumps(json.loads(raw), separators=(",", ":"))


class ReportPage:
    """Sections of HTML and plotly figures, written as one self-contained page."""

    def __init__(self, title: str, with_figures: bool) -> None:
        self.title = title
        self.with_figures = with_figures
        self.blocks: list[str] = []
        self.figures: list[dict] = []
        self.geometry: dict[str, dict] = {}
        self.templates: list[str] = []
        self.contents: list[tuple[str, str]] = []

    def heading(self, text: str, anchor: str, level: int = 2) -> None:
        if level == 2:
            self.contents.append((anchor, text))
        self.blocks.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')

    def text(self, markup: str) -> None:
        """Trusted markup (callers escape what came from files)."""
        self.blocks.append(f'<div class="blmm-text">{markup}</div>')

    def note(self, text: str) -> None:
        self.blocks.append(f'<p class="blmm-text note">{html.escape(text)}</p>')

    def table(self, rows: list[tuple[str, str]], header: tuple[str, ...] | None = None,
              escape: bool = True) -> None:
        """A table of rows (tuples of cells); cells are escaped unless ``escape`` is False."""
        cell = html.escape if escape else (lambda s: s)
        head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
        body = "".join("<tr>" + "".join(f"<td>{cell(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.blocks.append(f'<table class="blmm-text">{head}{body}</table>')

    def figure(self, spec: dict, meshes: list[str | None] | None = None) -> None:
        """Add a figure given as plotly's figure JSON (a dict of data and layout, numpy arrays in it;
        `figure_json`); traces with a key in ``meshes`` take that shared geometry."""
        spec = figure_json(spec)
        layout = spec.setdefault("layout", {})
        template = layout.pop("template", None)
        text = json.dumps(template, separators=(",", ":")) if template is not None else default_template_text()
        if text not in self.templates:  # the same few KB in every figure otherwise
            self.templates.append(text)
        template_index = self.templates.index(text)
        keys = list(meshes or [])
        for trace, key in zip(spec["data"], keys):
            if key is not None:
                for axis in ("x", "y", "z", "i", "j", "k"):
                    trace.pop(axis, None)
        keys += [None] * (len(spec["data"]) - len(keys))
        webgl = any(trace.get("type") in ("mesh3d", "scatter3d", "surface") for trace in spec["data"])
        figure_id = f"blmm-figure-{len(self.figures)}"
        height = int(layout.get("height") or 450)
        self.figures.append({"id": figure_id, "figure": spec, "meshes": keys, "webgl": webgl,
                             "template": template_index})
        self.blocks.append(f'<div class="blmm-figure" id="{figure_id}" style="height:{height}px"></div>')

    def add_mesh(self, key: str, mesh: Mesh) -> str:
        """Store a mesh's geometry once for every figure that draws on it."""
        if key not in self.geometry:
            coords, faces = mesh.coords, mesh.faces
            self.geometry[key] = {
                "x": _typed(coords[:, 0], "f4"), "y": _typed(coords[:, 1], "f4"), "z": _typed(coords[:, 2], "f4"),
                "i": _typed(faces[:, 0], "i4"), "j": _typed(faces[:, 1], "i4"), "k": _typed(faces[:, 2], "i4")}
        return key

    def render(self) -> str:
        contents = "".join(f'<li><a href="#{anchor}">{html.escape(text)}</a></li>'
                           for anchor, text in self.contents)
        parts = [
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<style>{PAGE_STYLE}</style>", "</head>", "<body>", "<main>",
            f'<h1 class="blmm-text">{html.escape(self.title)}</h1>',
            f'<nav class="blmm-text"><ol>{contents}</ol></nav>' if contents else "",
            *self.blocks,
            f'<footer class="blmm-text">Written by blmm {html.escape(__version__)} on '
            f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}.</footer>',
            "</main>",
        ]
        if self.with_figures and self.figures:
            from plotly.offline import get_plotlyjs

            data = {"figures": self.figures, "geometry": self.geometry,
                    "templates": [json.loads(t) for t in self.templates],
                    "max_live_webgl": MAX_LIVE_WEBGL_FIGURES}
            # "<" escaped: a contrast named "</script>" must not end the script element.
            payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
            parts += [
                f'<script type="text/javascript">{get_plotlyjs()}</script>',
                f'<script type="application/json" id="blmm-report-data">{payload}</script>',
                f"<script>{PAGE_SCRIPT}</script>",
            ]
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)


PAGE_STYLE = "\n" + _asset("report.css")

# Figures are built from the JSON payload when they scroll into view; WebGL figures far from
# view are purged so the page never holds more contexts than browsers allow.
PAGE_SCRIPT = "\n" + _asset("report.js")


# ------------------------------------------------------------------ figures


def _panel_values(column: np.ndarray, panel: SurfacePanel) -> np.ndarray:
    full = np.full(panel.mesh.n_vertices, np.nan)
    full[panel.vertices] = column[panel.rows]
    return full


def _mesh_key(panel: SurfacePanel) -> str:
    return panel.mesh.name or f"mesh {panel.hemi}"


def add_map_figure(page: ReportPage, geometry: MapGeometry, column: np.ndarray, title: str, *,
                   shown: np.ndarray | None = None, colorscale: Any = None,
                   threshold: float | None = None) -> bool:
    """Draw one map (n_voxels,) on the folder's surfaces or volume; False when it cannot be.

    ``shown``: where the map is coloured; elsewhere the surface stays grey (volume: blank).
    ``threshold``: additionally grey out |value| < threshold (the viewer's meaning).
    """
    from blmm import viewer

    values = np.asarray(column, dtype=np.float64).copy()
    if shown is not None:
        values[~shown] = np.nan
    if geometry.kind == "surface":
        panels = {panel.hemi: (_panel_values(values, panel), panel.mesh) for panel in geometry.panels}
        spec = viewer.surfaces_spec(panels, 0, colorscale=colorscale, threshold=threshold or None,
                                    title=title, grey_missing=True)  # hidden vertices grey
        page.figure(spec, [page.add_mesh(_mesh_key(panel), panel.mesh) for panel in geometry.panels])
        return True
    if geometry.kind == "volume":
        outline = np.isfinite(np.asarray(column, dtype=np.float64))
        if threshold:
            values[np.abs(values) < threshold] = np.nan
        fig = plot_projections(values.reshape(geometry.volume_shape), geometry.affine,
                               outline.reshape(geometry.volume_shape), title=title, colorscale=colorscale)
        page.figure(fig)
        return True
    return False


def signed_projection(values: np.ndarray, axis: int) -> np.ndarray:
    """Along ``axis``, the value of largest magnitude (sign kept); NaN where all are NaN."""
    magnitude = np.where(np.isfinite(values), np.abs(values), -1.0)
    index = np.expand_dims(np.argmax(magnitude, axis=axis), axis)
    picked = np.take_along_axis(values, index, axis).squeeze(axis)
    return np.where(magnitude.max(axis=axis) >= 0, picked, np.nan)


def plot_projections(values: np.ndarray, affine: np.ndarray, outline: np.ndarray, *,
                     title: str = "", colorscale: Any = None) -> dict:
    """A 3-D map as sagittal, coronal and axial maximum-intensity projections: plotly's figure as a
    dict (`ReportPage.figure` takes it; ``plotly.graph_objects.Figure(...)`` shows it elsewhere).

    NaN voxels are transparent; ``outline`` (the fitted voxels) is drawn as a light
    silhouette beneath. Axes are in mm, oriented RAS whatever the file's orientation.
    """
    from blmm import viewer

    data, ras = to_canonical(np.stack([values, outline], axis=-1), affine)
    data = np.asarray(data, dtype=np.float32)
    values, outline = data[..., 0], data[..., 1] > 0
    mm = [ras[axis, axis] * np.arange(values.shape[axis]) + ras[axis, 3] for axis in range(3)]
    colours = viewer.colour_range(_finite(values), colorscale=colorscale)
    traces, axes = [], []
    for column, (name, axis, (h_axis, v_axis)) in enumerate(PROJECTION_VIEWS, start=1):
        x, y = np.round(mm[h_axis], 2), np.round(mm[v_axis], 2)
        suffix = "" if column == 1 else str(column)
        place = dict(xaxis="x" + suffix, yaxis="y" + suffix)
        traces.append(dict(type="heatmap", z=outline.any(axis=axis).T.astype(np.uint8), x=x, y=y, zmin=0, zmax=1,
                           colorscale=OUTLINE_COLOURS, showscale=False, hoverinfo="skip",
                           name="fitted voxels", **place))
        traces.append(dict(type="heatmap", z=signed_projection(values, axis).T.astype(np.float32), x=x, y=y,
                           coloraxis="coloraxis", name=name,
                           hovertemplate="(%{x:.0f}, %{y:.0f}) mm<br>value %{z:.4g}<extra></extra>", **place))
        axes.append({"xaxis": dict(showgrid=False, zeroline=False, constrain="domain",
                                   title=dict(text=f"{'xyz'[h_axis]} (mm)", font=dict(size=11))),
                     "yaxis": dict(scaleanchor=f"x{suffix}", scaleratio=1, showgrid=False, zeroline=False,
                                   constrain="domain", title=dict(text=f"{'xyz'[v_axis]} (mm)", font=dict(size=11)))})
    layout = viewer.subplot_row("xy", len(PROJECTION_VIEWS), 0.07,
                                [f"{name} (max over {'xyz'[axis]})" for name, axis, _ in PROJECTION_VIEWS], axes)
    layout.update(title=dict(text=title, x=0.5, xanchor="center"), height=420,
                  coloraxis=dict(colorscale=colours.colorscale, cmin=colours.cmin, cmax=colours.cmax,
                                 colorbar=dict(thickness=15, len=0.8)),
                  plot_bgcolor="white", paper_bgcolor="white", margin=dict(l=20, r=20, t=80, b=40))
    return dict(data=traces, layout=layout)


def add_histograms(page: ReportPage, panels: list[tuple[str, np.ndarray, np.ndarray | None, str | None]],
                   title: str | None = None) -> bool:
    """Side-by-side histograms: (x-axis title, values, selected-or-None, selected label)."""
    from blmm import viewer

    drawn = [(axis, counts, label) for axis, values, selected, label in panels
             if (counts := histogram(values, selected=selected)) is not None]
    if not drawn:
        return False
    traces, axes = [], []
    shown_selected = False  # one legend entry for the highlighted voxels, not one per panel
    for column, (axis, counts, label) in enumerate(drawn, start=1):
        centres = _round(counts["centres"], 5)
        suffix = "" if column == 1 else str(column)
        place = dict(xaxis="x" + suffix, yaxis="y" + suffix)
        traces.append(dict(type="bar", x=centres, y=counts["counts"].tolist(), width=counts["width"],
                           marker=dict(color="rgb(140, 150, 170)"), name="all", showlegend=column == 1,
                           legendgroup="all", hovertemplate="%{x:.4g}: %{y}<extra></extra>", **place))
        if "selected" in counts and counts["selected"].any():
            traces.append(dict(type="bar", x=centres, y=counts["selected"].tolist(), width=counts["width"],
                               marker=dict(color="rgb(215, 60, 20)"), name=label, legendgroup="selected",
                               showlegend=not shown_selected, hovertemplate="%{x:.4g}: %{y}<extra></extra>",
                               **place))
            shown_selected = True
        axes.append({"xaxis": dict(title=dict(text=axis)),
                     "yaxis": dict(title=dict(text="voxels")) if column == 1 else {}})
    layout = viewer.subplot_row("xy", len(drawn), 0.1, None, axes)
    layout.update(barmode="overlay", bargap=0, height=300, margin=dict(l=60, r=20, t=80 if title else 45, b=50),
                  title=dict(text=title or "", x=0.5, xanchor="center"), paper_bgcolor="white",
                  plot_bgcolor="white", legend=dict(orientation="h", x=0, xanchor="left", y=1.02, yanchor="bottom"))
    page.figure(dict(data=traces, layout=layout))
    return True


# ------------------------------------------------------------------ the run report


def _counts_rows(counts: dict) -> list[tuple[str, str]]:
    labels = (("analysis_mask", "voxels in the analysis mask"), ("fitted", "fitted"),
              ("converged", "converged (llh change and predicted gain < tol)"),
              ("not_converged", "not converged (kept in the maps)"),
              ("boundary", "boundary fits (singular random-effects covariance)"))
    rows = [(label, _fmt(counts[key])) for key, label in labels if key in counts]
    for reason, count in (counts.get("not_converged_reasons") or {}).items():
        rows.append((f"not converged: {reason}", _fmt(count)))
    for reason, count in (counts.get("dropped") or {}).items():
        rows.append((f"dropped: {reason}", _fmt(count)))
    if not counts.get("dropped") and counts:
        rows.append(("dropped", "0"))
    return rows


def _model_section(page: ReportPage, summary: RunDescription) -> None:
    settings, record = summary.settings, summary.record
    page.heading("Model", "model")
    page.text(f'<p class="formula">{html.escape(model_formula(summary))}</p>'
              "<p>One linear mixed model per voxel: Y = Xβ + Zb + ε, ε ~ N(0, σ²I), b ~ N(0, σ²D) "
              "(docs/model.md).</p>")
    reml = settings.get("REML", True)
    rows = [
        ("images (n)", _fmt(summary.n)),
        ("fixed effects (p, columns of X)", _fmt(summary.p)),
        ("random effects (q = Σ q_k × levels_k, columns of Z)", _fmt(summary.q) if summary.factors else "–"),
        ("estimation", "REML" if reml else "ML"),
        ("method", str(settings.get("method", "pSFS"))),
        ("tol (log-likelihood change)", str(settings.get("tol", "–"))),
        ("maxnit", str(settings.get("maxnit", "–"))),
        ("T p-values", summary.t_sidedness),
        ("report threshold", f"−log10 p > {summary.threshold:g}"),
    ]
    if record.get("engine"):
        rows.append(("engine", f"{record['engine']} ({record.get('batches', '?')} image batches, "
                               f"{record.get('blocks', '?')} voxel blocks)"))
    timings = record.get("timings_s") or {}
    if timings:
        rows.append(("time (s)", ", ".join(f"{stage} {seconds:g}" for stage, seconds in timings.items())))
    if settings.get("outdir"):
        rows.append(("outdir", str(settings["outdir"])))
    page.table(rows)
    page.heading("Fixed effects (columns of X)", "fixed", level=3)
    page.table([(str(j), name) for j, name in enumerate(summary.x_names)],
               header=("blmm_vox_beta volume", "column"))
    if summary.factors:
        page.heading("Random factors", "random", level=3)
        page.table([(f.name, str(f.q), _fmt(f.levels), ", ".join(f.design_names)) for f in summary.factors],
                   header=("factor", "q_k (effects per level)", "levels", "design columns"))
    if summary.contrasts:
        page.heading("Contrasts", "contrasts-table", level=3)
        page.table([(c.label, c.name, c.kind,
                     f"{'conT' if c.kind == 'T' else 'conF'} volume {c.index}",
                     contrast_text(c.vector, summary.x_names)) for c in summary.contrasts],
                   header=("key", "name", "type", "map volume", "tests"))


def _spread_cells(values: np.ndarray) -> tuple[str, str]:
    """(median, 'min to max') over the voxels where the value is finite."""
    found = spread(values)
    if found is None:
        return "–", "–"
    return _fmt(found.median), f"{_fmt(found.low)} to {_fmt(found.high)}"


def _random_effects_section(page: ReportPage, summary: RunDescription, geometry: MapGeometry | None) -> None:
    """lme4's VarCorr, summarised over the fitted voxels: each term's variance, SD and correlations."""
    if not summary.factors or geometry is None:
        return
    found = random_effects(summary, geometry)
    page.heading("Random effects", "random-effects")
    if found is None:
        page.note("blmm_vox_D or blmm_vox_sigma2 is missing or does not match the factors: no random-effects table.")
        return
    variances, correlations = found
    page.text("<p>As lme4's <code>VarCorr</code>, per fitted voxel, then the median and range over voxels. "
              "Variances are σ² D (blmm_vox_D holds D relative to σ²); the D volumes are named as the "
              "terms here.</p>")
    rows = []
    for position, term in enumerate(variances):
        first = position == 0 or variances[position - 1].group != term.group  # the group named once, as lme4
        rows.append((term.group if first else "", term.name, *_spread_cells(term.variance),
                     *_spread_cells(term.sd)))
    page.table(rows, header=("group", "name", "variance (median)", "variance (range)",
                             "std. dev. (median)", "std. dev. (range)"))
    if correlations:
        page.table([(term.group, f"{term.first} x {term.second}", *_spread_cells(term.correlation))
                    for term in correlations], header=("group", "correlation of", "corr (median)", "corr (range)"))


def _convergence_section(page: ReportPage, summary: RunDescription, geometry: MapGeometry | None) -> None:
    counts = summary.record.get("counts") or {}
    page.heading("Convergence", "convergence")
    if counts:
        page.table(_counts_rows(counts), header=("voxels", "count"))
    if not (page.with_figures and geometry is not None):
        return
    nit = read_report_map(summary.outdir, "nit", geometry)
    mask = read_report_map(summary.outdir, "mask", geometry)
    if nit is None or mask is None:
        page.note("blmm_vox_nit or blmm_vox_mask is missing: no convergence figures.")
        return
    fitted = mask[:, 0] != 0
    iterations = np.where(fitted, nit[:, 0], np.nan)
    add_map_figure(page, geometry, iterations, "iterations per voxel (blmm_vox_nit)", shown=fitted,
                   colorscale="Viridis", threshold=0.5)
    converged = read_report_map(summary.outdir, "converged", geometry)
    selected = None if converged is None else fitted & (converged[:, 0] == 0)
    if selected is not None and selected.any():
        add_map_figure(page, geometry, selected.astype(np.float64),
                       "voxels that did not converge (blmm_vox_converged = 0)", shown=selected,
                       colorscale=[[0, "rgb(215, 60, 20)"], [1, "rgb(215, 60, 20)"]], threshold=0.5)
    add_histograms(page, [("iterations (blmm_vox_nit)", iterations, selected, "not converged")])


def _contrast_section(page: ReportPage, summary: RunDescription, geometry: MapGeometry | None,
                      contrast: ContrastSummary, maps: dict[str, np.ndarray | None], anchor: str) -> None:
    stat_name, lp_name, df_name = contrast_test_maps(contrast.kind)
    page.heading(f"{contrast.kind} contrast {contrast.label}: {contrast.name}", anchor, level=3)
    stat = maps.get(stat_name)
    lp = maps.get(lp_name)
    df = maps.get(df_name)
    if stat is None or stat.shape[1] <= contrast.index:
        page.note(f"{MAP_PREFIX}{stat_name} volume {contrast.index} is missing.")
        return
    column = stat[:, contrast.index]
    lp_column = None if lp is None or lp.shape[1] <= contrast.index else lp[:, contrast.index]
    df_column = None if df is None or df.shape[1] <= contrast.index else df[:, contrast.index]
    numbers = contrast_numbers(column, lp_column, df_column, summary.threshold)
    side = "" if contrast.kind == "F" else f" ({summary.t_sidedness})"
    rows = [("tests", contrast_text(contrast.vector, summary.x_names)),
            ("maps", f"{MAP_PREFIX}{stat_name}, {lp_name}, {df_name} volume {contrast.index}"),
            ("voxels tested", _fmt(numbers["tested"])),
            (f"voxels with −log10 p > {summary.threshold:g}{side}", _fmt(numbers.get("above"))),
            (f"{contrast.kind} range", f"{_fmt(numbers.get('stat_min'))} to {_fmt(numbers.get('stat_max'))}"),
            (f"max −log10 p{side}", _fmt(numbers.get("lp_max")))]
    if "df_quartiles" in numbers:
        q = numbers["df_quartiles"]
        rows.append(("Satterthwaite df (min, quartiles, max)", ", ".join(_fmt(v) for v in q)))
    page.table(rows)
    if not page.with_figures:
        return
    above = None if lp_column is None else np.nan_to_num(lp_column, nan=-np.inf) > summary.threshold
    if geometry is not None and geometry.kind != "none":
        where = f"−log10 p > {summary.threshold:g}"
        if above is not None and not above.any():
            where = f"no voxel has −log10 p > {summary.threshold:g}"
        title = f"{contrast.kind} · {html.escape(contrast.name)} ({where})"
        add_map_figure(page, geometry, column, title, shown=above, threshold=None)
    label = f"−log10 p > {summary.threshold:g}"
    add_histograms(page, [(f"{contrast.kind} ({MAP_PREFIX}{stat_name})", column, above, label),
                          (f"Satterthwaite df ({stat_name}_swedf)",
                           df_column if df_column is not None else np.array([]), above, label)])


def _geometry_for(folder: Path, hints: tuple[str, ...], page: ReportPage) -> MapGeometry | None:
    try:
        mask_path = find_map(folder, "mask")
    except ViewerError as err:
        page.note(f"no maps can be shown: {err}")
        return None
    try:
        return map_geometry(mask_path, hints)
    except (InputError, OSError, ValueError) as err:
        page.note(f"the maps cannot be read: {err}")
        return None


def build_report(outdir: str | Path, with_figures: bool | None = None) -> str:
    """The report page of a run as HTML text (``with_figures``: default when plotly is installed)."""
    summary = summarise_run(outdir)
    folder = summary.outdir
    figures = plotly_available() if with_figures is None else with_figures
    page = ReportPage(f"blmm report: {folder.name}", figures)
    page.text(f"<p>Results in <code>{html.escape(str(folder.resolve()))}</code>"
              + (f", inputs hash <code>{html.escape(str(summary.record['input_hash']))}</code>"
                 if summary.record.get("input_hash") else "") + ".</p>")
    if not figures:
        page.note(f"Figures need the viewer extra (plotly and nilearn): {VIEWER_EXTRA_HINT}; "
                  "then rewrite this page with: python -m blmm.report " + str(folder))
    for note in summary.notes:
        page.note(note)
    hints = (folder.name, str(summary.settings.get("Y_files", "")))
    geometry = _geometry_for(folder, hints, page)
    if geometry is not None:
        page.text(f"<p>Maps: {html.escape(geometry.format)} files, {html.escape(geometry.description)}.</p>")
        if figures and geometry.note:
            page.note(geometry.note)
    _model_section(page, summary)
    _random_effects_section(page, summary, geometry)
    _convergence_section(page, summary, geometry)
    if summary.contrasts:
        page.heading("Contrasts", "results")
        maps: dict[str, np.ndarray | None] = {}
        if geometry is not None:
            for kind in {c.kind for c in summary.contrasts}:
                for name in contrast_test_maps(kind):
                    maps[name] = read_report_map(folder, name, geometry)
        for position, contrast in enumerate(summary.contrasts):
            _contrast_section(page, summary, geometry, contrast, maps, f"contrast-{position}")
    _corrected_section(page, summary, geometry)
    page.heading("More", "more")
    page.text("<p>Every map: docs/outputs.md. Any map, interactively: "
              f"<code>blmm_view {html.escape(str(folder))} conTlp --volume 0 --threshold "
              f"{summary.threshold:g} -o page.html</code> (docs/viewer.md).</p>")
    return page.render()


def _corrected_section(page: ReportPage, summary: RunDescription, geometry: MapGeometry | None) -> None:
    """Corrected inference (docs/corrected.md): its settings, the null distributions of the
    maxima, each contrast's FWE (or FDR) map, and the cluster table."""
    record = summary.record.get("correction")
    if not record:
        return
    folder = summary.outdir
    page.heading("Corrected inference", "corrected")
    rows = [("FDR", str(record.get("fdr") or "none")), ("resamples (B)", _fmt(record.get("resamples"))),
            ("seed", _fmt(record.get("seed")))]
    if record.get("resamples"):
        blocks = record.get("blocks", {})
        tail = record.get("tail", {})
        rows += [("sign blocks", f"{blocks.get('count')} ({blocks.get('factor')})"),
                 ("weights", str(record.get("weights", "–"))),
                 ("σ² per resample", str(record.get("sigma2", "–"))),
                 ("FWE over contrasts", "yes" if record.get("over_contrasts") else "no"),
                 ("tail approximation", "asked; accepted for " + (", ".join(k for k, v in tail.get("accepted", {}).items() if v) or "none")
                  if tail.get("asked") else "no"),
                 ("voxels left out (own missing images)", _fmt(record.get("excluded_voxels")))]
    page.table(rows)
    header, clusters = read_cluster_table(folder)
    nulls = read_null_maxima(folder)
    if page.with_figures and nulls:
        for owner, per in nulls.items():
            add_histograms(page, [(f"null maximum of {statistic}", values, None, None)
                                  for statistic, values in per.items()],
                           title=f"Null distributions of the maxima: {html.escape(owner)}")
    if page.with_figures and geometry is not None and geometry.kind != "none":
        for kind in sorted({c.kind for c in summary.contrasts}, reverse=True):
            stat = corrected_map_stat(kind, "lp_fwe" if record.get("resamples") else "lp_fdr")
            values = read_report_map(folder, stat, geometry)
            if values is None:
                continue
            for contrast in (c for c in summary.contrasts if c.kind == kind):
                column = values[:, contrast.index]
                shown = np.nan_to_num(column, nan=-np.inf) > -math.log10(0.05)
                add_map_figure(page, geometry, column, f"{kind} · {html.escape(contrast.name)}: "
                               f"{MAP_PREFIX}{stat} (p < 0.05 coloured)", shown=shown, threshold=None)
    if header:
        page.heading("Clusters", "clusters", level=3)
        if clusters:
            page.table([tuple(row) for row in clusters[:200]], header=tuple(header))
        else:
            page.note(f"no cluster above the cluster-forming threshold ({CLUSTERS_FILE} is empty)")


def write_report(outdir: Path) -> Path:
    """Write ``outdir/report.html`` for a finished run (atomically); returns its path."""
    folder = Path(outdir)
    return write_text_atomically(folder / REPORT_FILE, build_report(folder))


# ------------------------------------------------------------------ the comparison report


def _model_rows(model: dict) -> list[tuple[str, str]]:
    factors = ", ".join(f"{f.get('name')} (q={f.get('q')}, {f.get('levels')} levels)"
                        for f in model.get("factors") or []) or "none"
    return [("outdir", str(model.get("outdir", "–"))), ("p", _fmt(model.get("p"))),
            ("X columns", ", ".join(model.get("x_columns") or [])), ("random factors", factors),
            ("parameters", _fmt(model.get("n_params")))]


def build_compare_report(outdir: str | Path, with_figures: bool | None = None) -> str:
    """The report page of a ``blmm_compare`` folder as HTML text."""
    folder = Path(outdir)
    record = read_compare_record(folder)
    figures = plotly_available() if with_figures is None else with_figures
    page = ReportPage(f"blmm_compare report: {folder.name}", figures)
    if not record:
        page.note(f"{COMPARE_FILE} is missing or unreadable: not a finished blmm_compare folder.")
    if not figures:
        page.note(f"Figures need the viewer extra (plotly and nilearn): {VIEWER_EXTRA_HINT}.")
    big, small = record.get("big") or {}, record.get("small") or {}
    big_run = read_run_record(str(big["outdir"])) if big.get("outdir") else {}
    threshold = (big_run.get("settings") or {}).get("report_threshold", DEFAULT_REPORT_THRESHOLD)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        threshold = DEFAULT_REPORT_THRESHOLD
    null = record.get("null_distribution") or {}
    page.heading("Test", "test")
    page.table([
        ("test", str(record.get("test", "–"))),
        ("estimation", "REML" if record.get("REML") else "ML" if "REML" in record else "–"),
        ("statistic", str(record.get("statistic", "Chi2 = 2 (llh_big − llh_small)"))),
        ("null distribution", str(null.get("label", "–"))
         + ("" if null.get("exact", True) else " (approximation)")),
        ("why this null", str(null.get("reason", "–"))),
        ("mixture", ", ".join(f"{c.get('weight'):g} × χ²({c.get('df')})" for c in null.get("components") or [])
         or "–"),
        ("difference in parameters", _fmt(record.get("df_parameters"))),
        ("REML X correction", _fmt(record.get("reml_x_correction"))),
        ("max −log10 p", _fmt(record.get("max_Chi2lp"))),
        ("report threshold", f"−log10 p > {threshold:g}"),
    ])
    if record.get("swapped"):
        page.note("The first folder given held the bigger model, so the two were swapped.")
    for note in record.get("notes") or []:
        page.note(str(note))
    page.heading("Models", "models")
    page.table([(label, small_value, big_value) for (label, small_value), (_, big_value)
                in zip(_model_rows(small), _model_rows(big))], header=("", "small model", "big model"))
    counts = record.get("counts") or {}
    page.heading("Voxels", "voxels")
    count_labels = {
        "mask": "in both masks", "tested": "tested", "nan": "not tested (NaN)",
        "not_fitted": "not fitted in a model", "not_converged": "not converged in a model",
        "not_converged_small": "not converged, small model", "not_converged_big": "not converged, big model",
        "n_differs": "different number of images", "llh_big_below_small": "big model's llh below small's",
        "mask_model_1": "mask of model 1", "mask_model_2": "mask of model 2"}
    page.table([(count_labels.get(key, key), _fmt(value)) for key, value in counts.items()],
               header=("voxels", "count"))
    page.heading("Map", "map")
    hints = (folder.name, str(big.get("outdir", "")), str(small.get("outdir", "")))
    geometry = _geometry_for(folder, hints, page)
    if geometry is not None:
        page.text(f"<p>Maps: {html.escape(geometry.format)} files, {html.escape(geometry.description)}.</p>")
        chi2 = read_report_map(folder, "Chi2", geometry)
        lp = read_report_map(folder, "Chi2lp", geometry)
        if lp is not None:
            above = int(np.count_nonzero(_finite(lp[:, 0]) > threshold))
            page.table([(f"voxels with −log10 p > {threshold:g}", _fmt(above))])
        if figures and geometry.note:
            page.note(geometry.note)
        if figures and lp is not None:
            column = lp[:, 0]
            if geometry.kind != "none":
                add_map_figure(page, geometry, column,
                               f"likelihood-ratio test −log10 p (blmm_vox_Chi2lp), shown > {threshold:g}",
                               threshold=threshold)
            selected = np.nan_to_num(column, nan=-np.inf) > threshold
            label = f"−log10 p > {threshold:g}"
            add_histograms(page, [("χ² (blmm_vox_Chi2)", chi2[:, 0] if chi2 is not None else np.array([]),
                                   selected, label),
                                  ("−log10 p (blmm_vox_Chi2lp)", column, selected, label)])
    return page.render()


def write_compare_report(outdir: Path) -> Path:
    """Write ``outdir/report.html`` for a ``blmm_compare`` folder (atomically); returns its path."""
    folder = Path(outdir)
    return write_text_atomically(folder / REPORT_FILE, build_compare_report(folder))

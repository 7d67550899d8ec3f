"""Plotly figures of blmm output maps: colour ranges, surfaces (Mesh3d), volume slices, titles
and the self-contained HTML page.  No argument parsing here (that is ``blmm.cli.view``)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blmm.errors import ViewerError
from blmm.io.images import image_space, read_map, to_canonical
from blmm.io.outdir import (
    MAP_PREFIX,
    MAPS,
    contrast_entries,
    load_map,
    read_settings,
    strip_prefix,
    per_contrast_maps,
    recorded_volume_names,
    write_text_atomically,
)
from blmm.io.surfaces import HEMISPHERES, Mesh, mni152_template

if TYPE_CHECKING:  # plotly is optional: only imported when a figure is built
    import plotly.graph_objects as go


# the maps with one volume per contrast of a kind, and each map's one-line meaning: from io.outdir.MAPS
T_CONTRAST_MAPS = per_contrast_maps("T")
F_CONTRAST_MAPS = per_contrast_maps("F")
MAP_DESCRIPTIONS = {stat: kind.meaning for stat, kind in MAPS.items()}


# Sub-threshold vertices and missing values are painted in this grey.
NEUTRAL_COLOUR = "rgb(200, 200, 200)"
SIGNED_COLORSCALE = "RdBu_r"
POSITIVE_COLORSCALE = [
    [0.0, "rgb(180, 0, 0)"], [0.5, "rgb(255, 120, 0)"], [1.0, "rgb(255, 255, 0)"]]
NEGATIVE_COLORSCALE = [
    [0.0, "rgb(0, 255, 255)"], [0.5, "rgb(0, 120, 255)"], [1.0, "rgb(0, 0, 180)"]]
# A threshold band narrower than this share of the colour range would vanish in the
# 256-entry colour texture, so it is widened to it.
MIN_BAND_FRACTION = 0.02




# ---------------------------------------------------------------- contrast names


def contrast_names(outdir: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """T and F contrasts of the run in ``outdir`` in order: {"T": [(label, name)], "F": ...}.

    A missing or unreadable record gives empty lists (titles just lack names).
    """
    found: dict[str, list[tuple[str, str]]] = {"T": [], "F": []}
    for entry in contrast_entries(read_settings(outdir)):
        found[entry.kind].append((entry.label, entry.name))
    return found


def describe_volume(
    name: str, volume: int, n_volumes: int, outdir: str | os.PathLike | None = None,
) -> str:
    """Title text: map, what it is, volume, and the contrast name when known."""
    stat = strip_prefix(name)
    parts = [f"{MAP_PREFIX}{stat}"]
    if stat in MAP_DESCRIPTIONS:
        parts[0] += f" ({MAP_DESCRIPTIONS[stat]})"
    parts.append(f"volume {volume} (of 0\u2013{n_volumes - 1})" if n_volumes > 1
                 else f"volume {volume}")
    kind = "T" if stat in T_CONTRAST_MAPS else "F" if stat in F_CONTRAST_MAPS else None
    names = recorded_volume_names(outdir, stat) if outdir is not None and not kind else None
    if names and volume < len(names):
        parts.append(names[volume])
    if kind and outdir is not None:
        contrasts = contrast_names(outdir)[kind]
        if volume < len(contrasts):
            label, contrast = contrasts[volume]
            parts.append(f"{kind} contrast {label}: {contrast}")
    return " \u00b7 ".join(parts)


# ------------------------------------------------------------------- colouring


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ViewerError(
            "the viewer needs plotly: pip install 'blmm[viewer]'") from None
    return go


def _select_volume(values: np.ndarray, volume: int, what: str = "map") -> np.ndarray:
    """Column ``volume`` of (V,) or (V, k) values, with a ViewerError naming the range."""
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ViewerError(f"{what} must be (n_vertices,) or (n_vertices, k), got {array.shape}")
    n_volumes = array.shape[1]
    if not isinstance(volume, (int, np.integer)) or not 0 <= volume < n_volumes:
        valid = "0" if n_volumes == 1 else f"0 to {n_volumes - 1}"
        raise ViewerError(
            f"volume {volume} is out of range: {what} has {n_volumes} "
            f"volume{'s' if n_volumes != 1 else ''} (valid: {valid})")
    return array[:, volume].astype(np.float64)


@dataclass(frozen=True)
class ColourRange:
    """Colour limits, the threshold band [band_low, band_high] shown grey, and the scale."""

    cmin: float
    cmax: float
    band_low: float | None
    band_high: float | None
    colorscale: list


def _base_colorscale(colorscale: Any, signed: bool, negative_only: bool) -> list:
    import plotly.colors

    if colorscale is None:
        if signed:
            colorscale = SIGNED_COLORSCALE
        else:
            colorscale = NEGATIVE_COLORSCALE if negative_only else POSITIVE_COLORSCALE
    if isinstance(colorscale, str):
        reverse = colorscale.endswith("_r")
        scale = plotly.colors.make_colorscale(_named_colours(colorscale[:-2] if reverse else colorscale))
        if reverse:
            scale = [[1.0 - float(t), colour] for t, colour in reversed(scale)]
        return [[float(t), colour] for t, colour in scale]
    return [[float(t), colour] for t, colour in colorscale]


def _named_colours(name: str) -> list[str]:
    """The colours of plotly's built-in continuous scale ``name`` (any case), from the modules that
    plotly's ``get_colorscale`` searches; that function imports plotly's validators (narwhals, ~70 ms
    of every report)."""
    import plotly.colors

    wanted = name.lower()
    for module in (plotly.colors.sequential, plotly.colors.diverging, plotly.colors.cyclical):
        for attr, colours in vars(module).items():
            if attr.lower() == wanted and not attr.startswith("_") and not attr.endswith("_r") \
                    and isinstance(colours, list):
                return colours
    raise ViewerError(f"unknown plotly colorscale {name!r}")


def _colour_at(scale: list, t: float) -> str:
    import plotly.colors

    return plotly.colors.sample_colorscale(scale, [min(max(t, 0.0), 1.0)])[0]


def _banded_colorscale(scale: list, t_low: float, t_high: float) -> list:
    """``scale`` with [t_low, t_high] replaced by a flat neutral band (hard edges)."""
    banded: list = [[t, colour] for t, colour in scale if t < t_low]
    if t_low > 0.0:
        banded.append([t_low, _colour_at(scale, t_low)])
    banded += [[t_low, NEUTRAL_COLOUR], [t_high, NEUTRAL_COLOUR]]
    if t_high < 1.0:
        banded.append([t_high, _colour_at(scale, t_high)])
    banded += [[t, colour] for t, colour in scale if t > t_high]
    return banded


def colour_range(
    values: np.ndarray,
    *,
    colorscale: Any = None,
    symmetric: bool | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
    grey_missing: bool = False,
) -> ColourRange:
    """Colour limits and scale for ``values``; ``|v| < threshold`` falls in a grey band.

    Defaults: symmetric (±max|v|) when values have both signs, otherwise from 0 to the
    extreme, as usual for statistic maps.  ``grey_missing`` without a threshold adds a grey
    band just below the colour range, for missing values only (hidden vertices).
    """
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    if symmetric is None:
        symmetric = low < 0.0 < high
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        raise ViewerError(f"threshold must be a non-negative number, got {threshold}")
    if symmetric:
        extreme = max(abs(low), abs(high), threshold or 0.0) or 1.0
        cmin = -extreme if vmin is None else float(vmin)
        cmax = extreme if vmax is None else float(vmax)
    else:
        cmin = (min(low, 0.0) if vmin is None else float(vmin))
        cmax = (max(high, 0.0) if vmax is None else float(vmax))
    if not cmin < cmax:
        if vmin is not None and vmax is not None:
            raise ViewerError(f"vmin ({vmin}) must be below vmax ({vmax})")
        cmin, cmax = (cmin - 1.0, cmax + 1.0) if cmin == cmax else (cmax, cmin)
    signed = symmetric or cmin < 0.0 < cmax
    scale = _base_colorscale(colorscale, signed, negative_only=cmax <= 0.0)
    if not threshold and grey_missing:
        width = MIN_BAND_FRACTION * (cmax - cmin)
        start = width / (cmax - cmin + width)  # the band's share of the extended range
        # grey up to 3/4 of the band, then the scale's first colour: values at cmin are never grey
        banded = [[0.0, NEUTRAL_COLOUR], [0.75 * start, NEUTRAL_COLOUR], [0.75 * start, scale[0][1]]] + \
            [[start + t * (1 - start), colour] for t, colour in scale]
        return ColourRange(cmin - width, cmax, cmin - width, cmin - 0.25 * width, banded)
    if not threshold:
        return ColourRange(cmin, cmax, None, None, scale)
    band_low, band_high = max(cmin, -threshold), min(cmax, threshold)
    min_width = MIN_BAND_FRACTION * (cmax - cmin)
    if band_high - band_low < min_width:
        # The limits exclude most of the band: widen so sub-threshold values still clamp grey.
        if cmin >= 0.0 or band_low == cmin:
            band_low = cmin = min(cmin, band_high - min_width)
        else:
            band_high = cmax = max(cmax, band_low + min_width)
    span = cmax - cmin
    banded = _banded_colorscale(scale, (band_low - cmin) / span, (band_high - cmin) / span)
    return ColourRange(cmin, cmax, band_low, band_high, banded)


def _display_intensity(values: np.ndarray, colours: ColourRange) -> np.ndarray:
    """Values as painted: missing values moved into the grey band when there is one."""
    shown = values.astype(np.float32)
    if colours.band_low is not None:
        # NaN would be painted by the GPU's whim; the band centre is reliably grey.
        shown[~np.isfinite(shown)] = 0.5 * (colours.band_low + colours.band_high)
    return shown


# ------------------------------------------------------------------- surfaces


_LATERAL_EYE = {"left": (-1.7, 0.0, 0.1), "right": (1.7, 0.0, 0.1)}
_SURFACE_LIGHTING = dict(ambient=0.45, diffuse=0.8, specular=0.05, roughness=0.9, fresnel=0.1)


def _mesh_side(mesh: Mesh, key: str) -> str:
    if key in HEMISPHERES:
        return key
    if mesh.hemi in HEMISPHERES:
        return mesh.hemi
    return "left" if float(mesh.coords[:, 0].mean()) < 0 else "right"


def _hemisphere_values(data: Any, mesh: Mesh, volume: int, key: str) -> np.ndarray:
    if isinstance(data, (str, os.PathLike)):
        data = load_map(data, n_vertices=mesh.n_vertices)
    array = np.asarray(data)
    n_data = array.shape[0] if array.ndim else 0
    if n_data != mesh.n_vertices:
        raise ViewerError(
            f"{key}: map has {n_data} vertices but the mesh {mesh.name or ''} has "
            f"{mesh.n_vertices}; use the surface the analysis was run on".replace("  ", " "))
    return _select_volume(array, volume)


def plot_surfaces(hemispheres: Mapping[str, tuple[Any, Mesh]], volume: int = 0, **options: Any) -> go.Figure:
    """Several surfaces side by side (e.g. {"left": (data_l, mesh_l), "right": (...)}) sharing one
    colour bar, as a plotly figure; ``options`` are those of `surfaces_spec` (keyword-only)."""
    go = _plotly()
    return go.Figure(surfaces_spec(hemispheres, volume, **options))


def surfaces_spec(
    hemispheres: Mapping[str, tuple[Any, Mesh]],
    volume: int = 0,
    *,
    colorscale: Any = None,
    symmetric: bool | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
    title: str | None = None,
    grey_missing: bool = False,
) -> dict:
    """Several surfaces side by side, sharing one colour bar, as plotly's figure JSON in a plain dict
    (numpy arrays in it): `plot_surfaces` wraps it in a figure; the report writes it as it is, without
    plotly's figure objects, whose first construction in a process costs ~0.1 s of validators (issue 21).
    ``data`` is (V,) or (V, k) values, or a map file path.  ``grey_missing``: missing (NaN) vertices are
    grey even without a threshold, e.g. those a ``--where`` condition hides."""
    if not hemispheres:
        raise ViewerError("nothing to plot: give at least one (data, mesh) pair")
    panels = []
    for key, pair in hemispheres.items():
        try:
            data, mesh = pair
        except (TypeError, ValueError):
            raise ViewerError(f"{key}: expected a (data, mesh) pair") from None
        if not isinstance(mesh, Mesh):
            raise ViewerError(f"{key}: mesh must be a blmm.viewer.Mesh, got {type(mesh).__name__}")
        panels.append((key, mesh, _hemisphere_values(data, mesh, volume, key)))
    colours = colour_range(
        np.concatenate([values for _, _, values in panels]), colorscale=colorscale,
        symmetric=symmetric, vmin=vmin, vmax=vmax, threshold=threshold, grey_missing=grey_missing)

    data, scenes = [], []
    for column, (key, mesh, values) in enumerate(panels, start=1):
        scene = "scene" if column == 1 else f"scene{column}"
        data.append(dict(
            type="mesh3d", x=mesh.coords[:, 0], y=mesh.coords[:, 1], z=mesh.coords[:, 2],
            i=mesh.faces[:, 0], j=mesh.faces[:, 1], k=mesh.faces[:, 2],
            intensity=_display_intensity(values, colours), intensitymode="vertex",
            coloraxis="coloraxis", customdata=values.astype(np.float32),
            hovertemplate="value %{customdata:.4g}<br>(%{x:.0f}, %{y:.0f}, %{z:.0f}) mm"
                          f"<extra>{key}</extra>",
            lighting=_SURFACE_LIGHTING, lightposition=dict(x=0, y=0, z=1e5),
            flatshading=False, name=key, showscale=False, scene=scene))
        eye = _LATERAL_EYE[_mesh_side(mesh, key)]
        axis = dict(visible=False, showbackground=False)
        scenes.append(dict(xaxis=axis, yaxis=axis, zaxis=axis, aspectmode="data",
                           camera=dict(eye=dict(x=eye[0], y=eye[1], z=eye[2]), up=dict(x=0, y=0, z=1))))
    layout = subplot_row("scene", len(panels), 0.0, [key for key, _, _ in panels] if len(panels) > 1 else None,
                         scenes)
    layout.update(
        title=dict(text=title or "", x=0.5, xanchor="center"),
        coloraxis=dict(colorscale=colours.colorscale, cmin=colours.cmin, cmax=colours.cmax,
                       colorbar=dict(thickness=18, len=0.75)),
        paper_bgcolor="white", margin=dict(l=10, r=10, t=80 if title else 40, b=45),
        height=520, updatemenus=[_camera_menu(panels)],
    )
    return dict(data=data, layout=layout)


def subplot_row(kind: str, n: int, spacing: float, titles: Sequence[str] | None = None,
                axes: Sequence[Mapping[str, Any]] | None = None) -> dict:
    """A plotly layout of ``n`` subplots side by side (``kind`` "xy": x/y axes, "scene": 3-D), as
    ``plotly.subplots.make_subplots(rows=1, cols=n, horizontal_spacing=spacing)`` lays them out
    (titles above, in plotly's subplot-title style); ``axes``: each subplot's own settings (for
    "xy", ``{"xaxis": ..., "yaxis": ...}``).  Built as one dict because make_subplots and per-axis
    updates cost ~20-40 ms of validation a figure, most of a run's report (issue 21)."""
    width = (1.0 - spacing * (n - 1)) / n
    layout: dict[str, Any] = {}
    centres = []
    for column in range(n):
        start = sum([width] * column) + column * spacing  # plotly's own sum: identical domains
        domain = [start, start + width]
        centres.append(sum(domain) / 2.0)
        own = dict(axes[column]) if axes else {}
        suffix = "" if column == 0 else str(column + 1)
        if kind == "scene":
            layout["scene" + suffix] = {"domain": {"x": domain, "y": [0.0, 1.0]}, **own}
        else:
            layout["xaxis" + suffix] = {"anchor": "y" + suffix, "domain": domain, **own.get("xaxis", {})}
            layout["yaxis" + suffix] = {"anchor": "x" + suffix, "domain": [0.0, 1.0], **own.get("yaxis", {})}
    annotations = [dict(text=text, x=x, y=1.0, xref="paper", yref="paper", xanchor="center", yanchor="bottom",
                        showarrow=False, font=dict(size=16)) for text, x in zip(titles or [], centres) if text]
    if annotations:
        layout["annotations"] = annotations
    return layout


def _camera_menu(panels: Sequence[tuple[str, Mesh, np.ndarray]]) -> dict:
    """Buttons that turn every panel to a standard view (lateral, medial, top, ...)."""
    views = {"lateral": 1, "medial": -1}
    buttons = []
    for label, sign in views.items():
        update = {}
        for column, (key, mesh, _) in enumerate(panels, start=1):
            x = _LATERAL_EYE[_mesh_side(mesh, key)][0] * sign
            scene = "scene" if column == 1 else f"scene{column}"
            update[f"{scene}.camera"] = dict(eye=dict(x=x, y=0, z=0.1), up=dict(x=0, y=0, z=1))
        buttons.append(dict(label=label, method="relayout", args=[update]))
    for label, eye, up in (("top", (0, 0, 2.0), (0, 1, 0)), ("front", (0, 2.0, 0.1), (0, 0, 1)),
                           ("back", (0, -2.0, 0.1), (0, 0, 1))):
        update = {
            f"{'scene' if column == 1 else f'scene{column}'}.camera": dict(
                eye=dict(zip("xyz", eye)), up=dict(zip("xyz", up)))
            for column in range(1, len(panels) + 1)}
        buttons.append(dict(label=label, method="relayout", args=[update]))
    return dict(type="buttons", direction="right", x=0.0, y=0.0, xanchor="left",
                yanchor="top", buttons=buttons, showactive=False, pad=dict(t=4))


def plot_surface(data: Any, mesh: Mesh, volume: int = 0, **options: Any) -> go.Figure:
    """One map on one surface: a plotly Mesh3d with one intensity per vertex.

    ``data`` is (V,) or (V, k) values (or a map file path); ``volume`` picks the column.
    ``options`` are those of `surfaces_spec` (keyword-only): colorscale, symmetric, vmin,
    vmax, threshold, title.  Vertices with ``|value| < threshold`` (and missing values, when
    thresholded) are grey.
    """
    key = getattr(mesh, "hemi", None) or "surface"
    return plot_surfaces({key: (data, mesh)}, volume, **options)


# -------------------------------------------------------------------- volumes


def _canonical_volume(data: Any, affine: np.ndarray | None,
                      shown: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """(data (X, Y, Z, k) RAS-oriented, its affine, header-or-None) from a path or array;
    ``shown`` (the grid's voxels in file order, flat or 3-D): NaN where False."""
    header = None
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        space = image_space(path)
        if space.format not in ("nifti", "mgh") or len(space.shape) != 3:
            raise ViewerError(f"{path}: a volume view needs a NIfTI or MGH volume, "
                              f"found {space.describe()}")
        array = np.asarray(read_map(path)).reshape(space.shape + (-1,))
        affine, header = space.affine, space.header
    else:
        array = np.asarray(data)
        if array.ndim not in (3, 4):
            raise ViewerError(f"volume data must be 3-D or 4-D, got shape {array.shape}")
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    if shown is not None:
        grid = array.shape[:3]
        shown = np.asarray(shown, bool)
        if shown.size != int(np.prod(grid)):
            raise ViewerError(f"the voxels to show cover {shown.size} voxels, the map {int(np.prod(grid))}")
        keep = shown.reshape(grid + (1,) * (array.ndim - 3))
        array = np.where(keep, np.asarray(array, dtype=np.float32), np.nan)
    canonical, affine = to_canonical(array, affine)
    return canonical, affine, header


def _is_mni(affine: np.ndarray, shape: Sequence[int], header: Any, template: Any) -> bool:
    """MNI when the header says so, or when the map's box mostly overlaps the template's."""
    try:
        codes = {int(header["sform_code"]), int(header["qform_code"])}
    except (KeyError, TypeError, ValueError):
        codes = set()
    if 4 in codes:
        return True

    def box(aff: np.ndarray, dims: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[i, j, k, 1] for i in (0, dims[0] - 1) for j in (0, dims[1] - 1)
                            for k in (0, dims[2] - 1)], dtype=float)
        world = corners @ aff.T
        return world[:, :3].min(axis=0), world[:, :3].max(axis=0)

    low_a, high_a = box(affine, shape)
    low_b, high_b = box(template.affine, template.shape)
    overlap = np.prod(np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0, None))
    union = np.prod(high_a - low_a) + np.prod(high_b - low_b) - overlap
    return bool(union > 0 and overlap / union > 0.5)


def _template_on_grid(template: Any, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The template resampled (trilinear) onto the map's voxel grid, scaled to 0..255."""
    from scipy import ndimage

    voxel_to_template = np.linalg.inv(template.affine) @ affine
    grid = np.indices(shape[:3], dtype=np.float32).reshape(3, -1)
    coords = voxel_to_template[:3, :3] @ grid + voxel_to_template[:3, 3:4]
    source = np.asanyarray(template.dataobj).astype(np.float32)
    resampled = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0)
    resampled = resampled.reshape(shape[:3])
    top = float(resampled.max()) or 1.0
    return np.clip(resampled / top * 255.0, 0, 255).astype(np.uint8)


def _typed_array(array: np.ndarray) -> dict:
    """plotly.js typed-array spec, so slider steps carry compact base64, not JSON lists."""
    import base64

    array = np.ascontiguousarray(array)
    codes = {np.dtype(np.float32): "f4", np.dtype(np.uint8): "u1"}
    return {"dtype": codes[array.dtype], "bdata": base64.b64encode(array.tobytes()).decode(),
            "shape": ", ".join(str(n) for n in array.shape)}


_VIEWS = (  # name, axis cut, (horizontal axis, vertical axis), axis letter
    ("sagittal", 0, (1, 2), "x"),
    ("coronal", 1, (0, 2), "y"),
    ("axial", 2, (0, 1), "z"),
)


def plot_volume(
    data: Any,
    volume: int = 0,
    affine: np.ndarray | None = None,
    *,
    colorscale: Any = None,
    symmetric: bool | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
    title: str | None = None,
    underlay: str | None = "auto",
    max_slices: int = 64,
    shown: np.ndarray | None = None,
) -> go.Figure:
    """A NIfTI map as sagittal, coronal and axial slices, each with its own slider.

    ``data`` is a NIfTI path or a 3-D/4-D array (then ``affine`` maps voxels to mm).
    ``shown``: voxels to colour (the grid in file order, flat or 3-D); the others are
    transparent, e.g. β where another map's −log10 p > 3 (``blmm_view --where``).
    ``underlay``: "auto" draws nilearn's MNI152 template below maps in MNI space,
    "mni152" always, None never. Sub-threshold and missing voxels are transparent.
    Each slider offers at most ``max_slices`` evenly spaced slices (page size).
    """
    go = _plotly()
    from plotly.subplots import make_subplots

    array, ras_affine, header = _canonical_volume(data, affine, shown)
    if array.ndim == 3:
        array = array[..., None]
    array = array.reshape(array.shape[:3] + (-1,))
    n_volumes = array.shape[3]
    if not isinstance(volume, (int, np.integer)) or not 0 <= volume < n_volumes:
        valid = "0" if n_volumes == 1 else f"0 to {n_volumes - 1}"
        raise ViewerError(f"volume {volume} is out of range: map has {n_volumes} "
                          f"volume{'s' if n_volumes != 1 else ''} (valid: {valid})")
    values = np.asarray(array[..., volume], dtype=np.float32)
    shape = values.shape
    colours = colour_range(values.ravel().astype(np.float64), colorscale=colorscale,
                           symmetric=symmetric, vmin=vmin, vmax=vmax, threshold=threshold)
    overlay = values.copy()
    if threshold:
        overlay[np.abs(overlay) < threshold] = np.nan  # transparent: the underlay shows
    if underlay not in (None, "auto", "mni152"):
        raise ViewerError(f"underlay must be 'auto', 'mni152' or None, got {underlay!r}")
    background = None
    if underlay is not None:
        template = mni152_template()
        if underlay == "mni152" or _is_mni(ras_affine, shape, header, template):
            background = _template_on_grid(template, ras_affine, shape)

    # Millimetre positions along each axis (RAS after reorientation).
    mm = [ras_affine[axis, axis] * np.arange(shape[axis]) + ras_affine[axis, 3]
          for axis in range(3)]
    finite = np.isfinite(overlay)
    if finite.any():  # open at the strongest voxel: that is what the user came to see
        peak = np.unravel_index(np.nanargmax(np.where(finite, np.abs(overlay), -np.inf)), shape)
    else:
        peak = tuple(n // 2 for n in shape)

    figure = make_subplots(rows=1, cols=3, subplot_titles=[v[0] for v in _VIEWS],
                           horizontal_spacing=0.07)
    sliders = []

    def cut(volume3d: np.ndarray, axis: int, index: int) -> np.ndarray:
        # Rows follow the vertical axis, columns the horizontal one.
        return np.take(volume3d, index, axis=axis).T

    for column, (view, axis, (h_axis, v_axis), letter) in enumerate(_VIEWS, start=1):
        traces = []
        if background is not None:
            traces.append(len(figure.data))
            figure.add_trace(go.Heatmap(
                z=cut(background, axis, peak[axis]), x=mm[h_axis], y=mm[v_axis],
                colorscale="gray", zmin=0, zmax=255, showscale=False, hoverinfo="skip",
                name="MNI152"), row=1, col=column)
        traces.append(len(figure.data))
        figure.add_trace(go.Heatmap(
            z=cut(overlay, axis, peak[axis]), x=mm[h_axis], y=mm[v_axis],
            coloraxis="coloraxis", name=view,
            hovertemplate="(%{x:.0f}, %{y:.0f}) mm<br>value %{z:.4g}<extra></extra>"),
            row=1, col=column)
        x_ref = "x" if column == 1 else f"x{column}"
        figure.layout[f"yaxis{'' if column == 1 else column}"].update(
            scaleanchor=x_ref, scaleratio=1, showgrid=False, zeroline=False, constrain="domain")
        figure.layout[f"xaxis{'' if column == 1 else column}"].update(
            showgrid=False, zeroline=False, constrain="domain",
            title=dict(text=f"{'xyz'[h_axis]} (mm)", font=dict(size=11)))
        figure.layout[f"yaxis{'' if column == 1 else column}"].update(
            title=dict(text=f"{'xyz'[v_axis]} (mm)", font=dict(size=11)))
        stride = max(1, math.ceil(shape[axis] / max_slices))
        indices = sorted(set(range(0, shape[axis], stride)) | {int(peak[axis])})
        steps = []
        for index in indices:
            new_z = []
            if background is not None:
                new_z.append(_typed_array(cut(background, axis, index)))
            new_z.append(_typed_array(cut(overlay, axis, index).astype(np.float32)))
            steps.append(dict(method="restyle", label=f"{mm[axis][index]:.0f}",
                              args=[{"z": new_z}, traces]))
        sliders.append(dict(
            active=indices.index(int(peak[axis])), steps=steps,
            currentvalue=dict(prefix=f"{view} {letter} = ", suffix=" mm"),
            x=(column - 1) / 3 + 0.01, len=1 / 3 - 0.03, y=0, yanchor="top",
            pad=dict(t=30), ticklen=0, font=dict(size=9)))
    figure.update_layout(
        title=dict(text=title or "", x=0.5, xanchor="center"), sliders=sliders,
        coloraxis=dict(colorscale=colours.colorscale, cmin=colours.cmin, cmax=colours.cmax,
                       colorbar=dict(thickness=15, len=0.8)),
        plot_bgcolor="black" if background is not None else "white", paper_bgcolor="white",
        height=480, margin=dict(l=20, r=20, t=70, b=110))
    return figure


# ---------------------------------------------------------------------- output


def write_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """One self-contained HTML page (plotly.js embedded, works offline), written atomically."""
    html = fig.to_html(include_plotlyjs=True, full_html=True, include_mathjax=False,
                       config={"displaylogo": False, "responsive": True})
    return write_text_atomically(path, html)

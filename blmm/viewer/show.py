"""From an output folder (or one map file) to the figure ``blmm_view`` writes.

``MapView`` holds what the command line asks for; ``map_figure(view)`` finds the map (a
NIfTI volume, a surface file, a CIFTI dscalar or per-hemisphere subfolders), picks the
meshes and returns the plotly figure.  Argument parsing is ``blmm.cli.view``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blmm.errors import ViewerError, name_hint
from blmm.io.images import image_space, read_map
from blmm.io.outdir import (
    MAP_PREFIX, available_maps, find_map, load_map, map_stat_name, recorded_volume_names, strip_prefix,
    volume_aliases,
)
from blmm.io.surfaces import FSAVERAGE5_KINDS, HEMISPHERES, Mesh, cifti_cortices, fsaverage5_mesh, guess_hemi, load_surface
from blmm.viewer.figures import (
    F_CONTRAST_MAPS, T_CONTRAST_MAPS, contrast_names, describe_volume, plot_surfaces, plot_volume,
)

if TYPE_CHECKING:  # plotly is optional: only imported when a figure is built
    import plotly.graph_objects as go


@dataclass
class MapView:
    """What to show: ``outdir`` (an output folder or a map file), ``map`` (its name when
    ``outdir`` is a folder; ``MAP:NAME`` picks a volume by name), the ``volume`` (0-based number or name), the ``surface`` and ``hemi`` (left, right,
    both or auto) for surface maps, and the colouring and title of the figure."""

    outdir: str
    map: str | None = None
    volume: int | str = 0
    surface: str = "fsaverage5"
    hemi: str = "auto"
    threshold: float | None = None
    symmetric: bool | None = None
    vmin: float | None = None
    vmax: float | None = None
    colorscale: Any = None
    title: str | None = None
    where: str | None = None  # show only where another map passes, e.g. "conTlp>3" (Condition)


_WHERE = re.compile(r"^\s*(?P<map>[^<>=]+?)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Condition:
    """``--where MAP[:VOLUME]>VALUE``: the voxels where another map passes a threshold."""

    stat: str
    volume: str | None  # None: the volume matching the map shown (see ``where_volume``)
    op: str  # ">", ">=", "<" or "<="
    value: float

    @classmethod
    def parse(cls, text: str) -> "Condition":
        found = _WHERE.match(text)
        if not found:
            raise ViewerError(f"--where {text!r}: expected MAP[:VOLUME]>VALUE (or >=, <, <=), "
                              "e.g. conTlp>3 or 'conTlp:age>3'")
        stat, _, volume = found.group("map").partition(":")
        return cls(strip_prefix(stat.strip()), volume.strip() or None, found.group("op"), float(found.group("value")))

    def holds(self, values: np.ndarray) -> np.ndarray:
        """Where the values pass (NaN never does)."""
        values = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            passed = {">": values > self.value, ">=": values >= self.value,
                      "<": values < self.value, "<=": values <= self.value}[self.op]
        return passed & np.isfinite(values)

    def describe(self, volume_name: str) -> str:
        return f"where {MAP_PREFIX}{self.stat}{f' ({volume_name})' if volume_name else ''} {self.op} {self.value:g}"


def where_volume(outdir: Path, condition: Condition, n_volumes: int, stat: str, volume: int) -> int:
    """The volume of the --where map: the one named, its only one, the one named as the volume
    shown (beta:age where conTlp:age), or the same contrast of a T or F map (conT where conTlp)."""
    if condition.volume is not None:
        return _volume_number(outdir, condition.stat, condition.volume)
    if n_volumes == 1:
        return 0
    for family in (T_CONTRAST_MAPS, F_CONTRAST_MAPS):
        if stat in family and condition.stat in family:
            return volume
    shown_names = recorded_volume_names(outdir, stat) or []
    names = recorded_volume_names(outdir, condition.stat) or []
    if volume < len(shown_names) and shown_names[volume] in names:
        return names.index(shown_names[volume])
    listing = ", ".join(f"{i} {n}" for i, n in enumerate(names)) or f"0 to {n_volumes - 1}"
    raise ViewerError(f"--where: {MAP_PREFIX}{condition.stat} has {n_volumes} volumes; say which, e.g. "
                      f"--where '{condition.stat}:0{condition.op}{condition.value:g}' (volumes: {listing})")


def map_figure(view: MapView) -> go.Figure:
    """The figure of the map ``view`` names; raises ``ViewerError`` (an ``InputError``).

    With ``view.where`` (``conTlp>3``) only the voxels where that map passes are coloured."""
    given = Path(view.outdir)
    if view.map and ":" in view.map:  # beta:age -> map beta, volume age
        stat_name, volume_name = view.map.split(":", 1)
        view = replace(view, map=stat_name, volume=volume_name)
    if given.is_file():
        path, outdir = given, given.parent
        stat = map_stat_name(given) or given.name
        from_folder = None
    else:
        if not view.map:
            maps = ", ".join(available_maps(given)) or "none"
            raise ViewerError(f"say which map to show; available maps: {maps}")
        path, outdir, stat = None, given, strip_prefix(view.map)
        from_folder = given
        if not _hemisphere_folders(given, stat):
            path = find_map(given, stat)
    view = replace(view, volume=_volume_number(outdir, stat, view.volume))
    condition = Condition.parse(view.where) if view.where else None
    if path is not None and _is_volumetric(path):
        n_volumes = image_space(path).n_volumes
        title = view.title or describe_volume(stat, view.volume, n_volumes, outdir)
        shown = None
        if condition is not None:
            where_path = find_map(outdir, condition.stat)
            values = np.asarray(read_map(where_path))
            values = values[:, None] if values.ndim == 1 else values
            if values.shape[0] != image_space(path).n_voxels:
                raise ViewerError(f"--where: {where_path.name} has {values.shape[0]} voxels, the map shown "
                                  f"{image_space(path).n_voxels}")
            k = where_volume(outdir, condition, values.shape[1], stat, view.volume)
            shown = condition.holds(values[:, k])
            title = view.title or f"{title} · {condition.describe(_volume_name(outdir, condition.stat, k))}"
        return plot_volume(path, view.volume, colorscale=view.colorscale,
                           symmetric=view.symmetric, vmin=view.vmin, vmax=view.vmax,
                           threshold=view.threshold, title=title, shown=shown)
    return _surface_figure(view, from_folder, stat, path, outdir, condition)


def _volume_name(outdir: Path, stat: str, volume: int) -> str:
    names = recorded_volume_names(outdir, stat)
    if names is None and (stat in T_CONTRAST_MAPS or stat in F_CONTRAST_MAPS):
        names = [name for _, name in contrast_names(outdir)["T" if stat in T_CONTRAST_MAPS else "F"]]
    return names[volume] if names and volume < len(names) else f"volume {volume}"


def volume_by_name(outdir: str | Path, stat: str, name: str) -> int:
    """The 0-based volume of map ``stat`` named ``name`` (a coefficient, contrast or D entry)."""
    stat = strip_prefix(stat)
    names = recorded_volume_names(outdir, stat)
    if names is None:
        kind = "T" if stat in T_CONTRAST_MAPS else "F" if stat in F_CONTRAST_MAPS else None
        names = [contrast for _, contrast in contrast_names(outdir)[kind]] if kind else None
    if not names:
        raise ViewerError(f"the volumes of {MAP_PREFIX}{stat} in {outdir} have no recorded names; "
                          "pick one by number with --volume N")
    for candidates in (names, volume_aliases(outdir, stat)):
        if name in candidates:
            return candidates.index(name)
    for kind, maps, other in (("F", T_CONTRAST_MAPS, "conFlp"), ("T", F_CONTRAST_MAPS, "conTlp")):
        if stat in maps and name in [contrast for _, contrast in contrast_names(outdir)[kind]]:
            raise ViewerError(f"{MAP_PREFIX}{stat} has no volume named {name!r}: {name!r} is an {kind} contrast, "
                              f"shown by {MAP_PREFIX}{other} (e.g. blmm_view {outdir} {other}:{name})")
    numbers = {n: f"volume {i}" for i, n in enumerate(names)}
    raise ViewerError(f"{MAP_PREFIX}{stat} has no volume named {name!r}{name_hint(name, names, labels=numbers)}")


def _volume_number(outdir: Path, stat: str, volume: int | str) -> int:
    """A volume given by number or by name (the name looked up in the run record)."""
    text = str(volume).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    hemispheres = [outdir / sub for sub in ("lh", "left", "rh", "right") if (outdir / sub).is_dir()]
    recorded = [f for f in [outdir, *hemispheres] if recorded_volume_names(f, strip_prefix(stat)) is not None]
    return volume_by_name(recorded[0] if recorded else outdir, stat, text)


def _is_volumetric(path: Path) -> bool:
    """A NIfTI/MGH map on a 3-D grid (not a (V, 1, 1) surface vector)."""
    if path.name.endswith(".dat"):
        return False
    space = image_space(path)
    return space.format in ("nifti", "mgh") and sum(1 for n in space.shape if n > 1) > 1


def _cifti_hemispheres(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Per-hemisphere (values scattered onto all mesh vertices, n vertices) of a dscalar."""
    values = np.asarray(read_map(path))
    found = {}
    for hemi, rows, vertices, n_vertices in cifti_cortices(image_space(path)):
        full = np.full((n_vertices, values.shape[1]), np.nan, dtype=np.float32)
        full[vertices] = values[rows]
        found[hemi] = (full, n_vertices)
    if not found:
        raise ViewerError(f"{path}: CIFTI file has no cortical surface (CORTEX_LEFT/RIGHT)")
    return found


def _surface_for(spec: str, hemi: str) -> Mesh:
    """Mesh named by --surface: fsaverage5[:kind], a kind, or a file (lh.* <-> rh.*)."""
    if spec.startswith("fsaverage5"):
        kind = spec.partition(":")[2] or spec.partition("_")[2] or "pial"
        return fsaverage5_mesh(hemi, kind)
    path = Path(spec)
    if not path.exists() and spec in FSAVERAGE5_KINDS:
        return fsaverage5_mesh(hemi, spec)
    guessed = guess_hemi(path.name)
    if guessed and guessed != hemi:
        swaps = (("lh.", "rh."), ("left", "right"), ("_lh", "_rh"), (".L.", ".R."))
        for a, b in swaps:
            old, new = (a, b) if guessed == "left" else (b, a)
            if old in path.name:
                path = path.with_name(path.name.replace(old, new, 1))
                break
    return load_surface(path, hemi)


def _hemisphere_folders(outdir: Path, stat: str) -> dict[str, Path]:
    """Maps in per-hemisphere subfolders (lh/rh or left/right) of an output folder."""
    found = {}
    for hemi, names in (("left", ("lh", "left")), ("right", ("rh", "right"))):
        for folder in names:
            if (outdir / folder).is_dir():
                try:
                    found[hemi] = find_map(outdir / folder, stat)
                except ViewerError:
                    continue
                break
    return found


def _surface_figure(view: MapView, outdir: Path | None, stat: str, path: Path | None, title_outdir: Path,
                    condition: Condition | None = None) -> go.Figure:
    """Figure for a surface map; ``outdir`` is set when per-hemisphere folders may hold it;
    with ``condition`` only the vertices where that map passes are coloured."""
    panels = _surface_panels(view, outdir, stat, path)
    first_values = np.asarray(next(iter(panels.values()))[0])
    n_volumes = 1 if first_values.ndim == 1 else first_values.shape[1]
    title = view.title or describe_volume(stat, view.volume, n_volumes, title_outdir)
    if condition is not None:
        where_path = None if path is None else find_map(path.parent, condition.stat)
        where_panels = _surface_panels(view, outdir, condition.stat, where_path)
        if set(where_panels) != set(panels):
            raise ViewerError(f"--where: {MAP_PREFIX}{condition.stat} covers {', '.join(where_panels)}, "
                              f"the map shown {', '.join(panels)}")
        sample = np.asarray(next(iter(where_panels.values()))[0])
        k = where_volume(title_outdir, condition, 1 if sample.ndim == 1 else sample.shape[1], stat, view.volume)
        masked = {}
        for hemi, (values, mesh) in panels.items():
            where_values = np.asarray(where_panels[hemi][0])
            where_values = where_values if where_values.ndim == 1 else where_values[:, k]
            column = np.array(values if np.ndim(values) == 1 else np.asarray(values)[:, view.volume], dtype=np.float64)
            column[~condition.holds(where_values)] = np.nan
            masked[hemi] = (column, mesh)
        panels = masked
        view = replace(view, volume=0)
        title = view.title or f"{title} · {condition.describe(_volume_name(title_outdir, condition.stat, k))}"
    return plot_surfaces(panels, view.volume, colorscale=view.colorscale,
                         symmetric=view.symmetric, vmin=view.vmin, vmax=view.vmax,
                         threshold=view.threshold, title=title, grey_missing=condition is not None)


def _surface_panels(view: MapView, outdir: Path | None, stat: str,
                    path: Path | None) -> dict[str, tuple[np.ndarray, Mesh]]:
    """The values of a surface map per hemisphere, on their meshes."""
    hemis = {"both": list(HEMISPHERES), "left": ["left"], "right": ["right"]}
    surface_hint = guess_hemi(Path(view.surface).name) if Path(view.surface).exists() else None
    per_hemi_files = _hemisphere_folders(outdir, stat) if outdir is not None and path is None \
        else {}
    if per_hemi_files:
        wanted = hemis.get(view.hemi) or list(per_hemi_files)
        missing = [h for h in wanted if h not in per_hemi_files]
        if missing:
            raise ViewerError(f"no {MAP_PREFIX}{stat} map for the {missing[0]} hemisphere "
                              f"under {outdir}")
        panels = {}
        for hemi in wanted:
            mesh = _surface_for(view.surface, hemi)
            panels[hemi] = (load_map(per_hemi_files[hemi], n_vertices=mesh.n_vertices), mesh)
    elif path.name.endswith(".dscalar.nii"):
        found = _cifti_hemispheres(path)
        wanted = hemis.get(view.hemi) or list(found)
        panels = {}
        for hemi in wanted:
            if hemi not in found:
                raise ViewerError(f"{path}: no {hemi} hemisphere in this CIFTI file")
            panels[hemi] = (found[hemi][0], _surface_for(view.surface, hemi))
    else:
        if view.hemi in hemis:
            wanted = hemis[view.hemi]
        else:
            wanted = [surface_hint or "left"]
        meshes = {hemi: _surface_for(view.surface, hemi) for hemi in wanted}
        total = sum(mesh.n_vertices for mesh in meshes.values())
        is_dat = path.name.endswith(".dat")
        values = load_map(path, n_vertices=total if is_dat else None)
        if len(wanted) == 1 and not is_dat and values.shape[0] > total:
            # Maybe one file holding both hemispheres, left first (the fsaverage layout).
            other = "right" if wanted[0] == "left" else "left"
            meshes[other] = _surface_for(view.surface, other)
            n_left = meshes["left"].n_vertices
            if values.shape[0] == n_left + meshes["right"].n_vertices:
                if view.hemi == "auto":
                    wanted = list(HEMISPHERES)
                else:
                    values = values[:n_left] if wanted[0] == "left" else values[n_left:]
                total = sum(meshes[hemi].n_vertices for hemi in wanted)
        if values.shape[0] != total:
            counts = " + ".join(f"{meshes[h].n_vertices} ({h})" for h in wanted)
            raise ViewerError(
                f"{path.name}: map has {values.shape[0]} vertices but the surface has "
                f"{counts}; choose the matching --surface/--hemi")
        panels, start = {}, 0
        for hemi in wanted:
            stop = start + meshes[hemi].n_vertices
            panels[hemi] = (values[start:stop], meshes[hemi])
            start = stop
    return panels

"""Interactive views of blmm output maps: surfaces (plotly Mesh3d) and volumes (slices).

Needs the ``[viewer]`` extra (plotly; nilearn only as the source of the fsaverage5
meshes and the MNI152 template that ship inside its package). Nothing is downloaded:
the shipped files are found without importing nilearn and read with nibabel.

* ``figures``: colour ranges, ``plot_surface(s)``, ``plot_volume``, titles, ``write_html``;
* ``show``: ``MapView`` and ``map_figure``, from an output folder or map file to a figure.

Notebook use::

    from blmm import viewer
    data = viewer.load_map("out", "conT", n_vertices=10242)
    fig = viewer.plot_surface(data, viewer.fsaverage5_mesh("left"), volume=0, threshold=2)
    fig.show()

Command line: ``blmm_view OUTDIR MAP -o page.html`` (``blmm.cli.view``).
Volume indices are 0-based everywhere (API and CLI).
"""
from __future__ import annotations

from blmm.errors import ViewerError
from blmm.io.outdir import MAP_PREFIX, available_maps, find_map, load_map, map_stat_name, strip_prefix
from blmm.io.surfaces import (
    FSAVERAGE5_KINDS,
    FSAVERAGE5_N_VERTICES,
    HEMISPHERES,
    Mesh,
    fsaverage5_mesh,
    guess_hemi,
    load_surface,
    mni152_template,
)
from blmm.viewer.figures import (
    F_CONTRAST_MAPS,
    MAP_DESCRIPTIONS,
    MIN_BAND_FRACTION,
    NEGATIVE_COLORSCALE,
    NEUTRAL_COLOUR,
    POSITIVE_COLORSCALE,
    SIGNED_COLORSCALE,
    T_CONTRAST_MAPS,
    ColourRange,
    colour_range,
    contrast_names,
    describe_volume,
    plot_surface,
    plot_surfaces,
    plot_volume,
    subplot_row,
    surfaces_spec,
    write_html,
)
from blmm.viewer.show import MapView, map_figure, volume_by_name



__all__ = [
    "FSAVERAGE5_KINDS", "FSAVERAGE5_N_VERTICES", "F_CONTRAST_MAPS", "HEMISPHERES", "MAP_DESCRIPTIONS",
    "MAP_PREFIX", "MIN_BAND_FRACTION", "NEGATIVE_COLORSCALE", "NEUTRAL_COLOUR", "POSITIVE_COLORSCALE",
    "SIGNED_COLORSCALE", "T_CONTRAST_MAPS", "ColourRange", "MapView", "Mesh", "ViewerError",
    "available_maps", "colour_range", "contrast_names", "describe_volume", "find_map", "fsaverage5_mesh",
    "guess_hemi", "load_map", "load_surface", "map_figure", "map_stat_name", "mni152_template",
    "plot_surface", "plot_surfaces", "plot_volume", "strip_prefix", "subplot_row", "surfaces_spec", "volume_by_name", "write_html",
]

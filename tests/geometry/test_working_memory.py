"""What TFCE and cluster maxima allocate stays within the bounds the corrections stage plans with.

``tfce_maxima_bytes`` and ``cluster_maxima_bytes`` are upper bounds of a batch's allocations
(tracemalloc counts numpy's), on the maps that cost most: every element above the threshold
(one cluster, every element in TFCE's sums), and smooth maps with many clusters.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from blmm.geometry import (
    cluster_maxima, cluster_maxima_bytes, surface_layout, tfce_maxima, tfce_maxima_bytes, volume_layout,
)
from blmm.io.surfaces import fsaverage5_mesh

SHAPE = (30, 36, 30)


def _ellipsoid() -> np.ndarray:
    i, j, k = np.indices(SHAPE, dtype=float)
    c = [(s - 1) / 2 for s in SHAPE]
    return ((i - c[0]) / 12) ** 2 + ((j - c[1]) / 15) ** 2 + ((k - c[2]) / 12) ** 2 <= 1


def _layouts():
    mask = _ellipsoid()
    yield "volume 6", volume_layout(mask, 6), ("volume", mask)
    yield "volume 26", volume_layout(mask, 26), ("volume", mask)
    mesh = fsaverage5_mesh("left")
    yield "fsaverage5", surface_layout(mesh.coords, mesh.faces, mesh.coords.shape[0]), ("mesh", None)


def _maps(kind: str, layout, how: str, rows: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    n = layout.n_elements
    if how == "all above":  # one cluster of every element, values spread (many TFCE merges)
        return 4.0 + rng.uniform(0, 4, (rows, n))
    if kind[0] == "volume":
        smooth = [ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2)[kind[1]] for _ in range(rows)]
    else:  # a few passes of neighbour averaging on the mesh
        smooth = []
        for _ in range(rows):
            x = rng.standard_normal(n)
            for _ in range(5):
                x = (x + layout.adjacency @ x / np.maximum(1, layout.adjacency.sum(axis=1).A1)) / 2
            smooth.append(x)
    maps = np.array(smooth)
    return maps * (6.0 / maps.std())  # signed: clusters of both signs above 3


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name, layout, kind", list(_layouts()), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("how", ["all above", "smooth"])
@pytest.mark.parametrize("rows", [1, 8])
def test_maxima_allocate_within_their_bounds(name, layout, kind, how, rows):
    maps = _maps(kind, layout, how, rows)
    _ = layout.part_edges  # built once per layout, counted in SpatialLayout.nbytes, not here
    tfce_peak = _peak(lambda: tfce_maxima(maps, layout, two_sided=True))
    cluster_peak = _peak(lambda: cluster_maxima(maps, layout, 3.0, two_sided=True))
    assert tfce_peak <= tfce_maxima_bytes(layout, rows)
    assert cluster_peak <= cluster_maxima_bytes(layout, rows)
    if how == "all above" and rows == 8:  # the bounds are not loose by more than 3x at the worst case
        assert tfce_maxima_bytes(layout, rows) <= 3 * tfce_peak
        assert cluster_maxima_bytes(layout, rows) <= 3 * cluster_peak

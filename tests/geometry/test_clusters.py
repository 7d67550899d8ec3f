"""Clusters against scipy.ndimage.label (volumes) and hand-computed extents on a mesh."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from blmm.geometry import cluster_maxima, find_clusters, surface_layout, volume_layout, volume_structure
import blmm.geometry.clusters as clusters_module


def _smooth_volume(shape, seed):
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    return volume / volume.std()


def _same_partition(ours: np.ndarray, theirs: np.ndarray) -> None:
    """The two labellings differ only by a renaming of labels (0 stays background)."""
    assert np.array_equal(ours == 0, theirs == 0)
    pairs = np.unique(np.stack([ours[ours > 0], theirs[theirs > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_labels_equal_ndimage_label(connectivity):
    volume = _smooth_volume((14, 12, 10), connectivity)
    mask = np.abs(volume) < 2.5  # a ragged analysis mask, so adjacency must respect it
    layout = volume_layout(mask, connectivity)
    table = find_clusters(volume[mask], layout, threshold=0.5)
    theirs, count = ndimage.label(mask & (volume >= 0.5), volume_structure(connectivity))
    _same_partition(table.labels, theirs[mask])
    assert table.n_clusters == count
    # extent is the voxel count; mass the sum of the map (PALM): both exact sums of integers / floats
    sizes = np.bincount(theirs[mask], minlength=count + 1)[1:]
    np.testing.assert_array_equal(np.sort(table.extent), np.sort(sizes))
    assert np.all(np.diff(table.extent) <= 0)  # label 1 is the largest
    for label in range(1, table.n_clusters + 1):
        members = table.labels == label
        values = volume[mask][members]
        np.testing.assert_allclose(table.mass[label - 1], values.sum(), rtol=1e-12)  # summation order
        assert table.peak_value[label - 1] == values.max()
        assert table.labels[table.peak_index[label - 1]] == label
        np.testing.assert_array_equal(table.peak_coords[label - 1],
                                      np.argwhere(mask)[table.peak_index[label - 1]])


def test_two_sided_clusters_carry_their_sign():
    volume = _smooth_volume((10, 10, 8), 5)
    layout = volume_layout(np.ones(volume.shape, bool), 6)
    table = find_clusters(volume.ravel(), layout, threshold=1.0, two_sided=True)
    negative, n_negative = ndimage.label(volume <= -1.0, volume_structure(6))
    positive, n_positive = ndimage.label(volume >= 1.0, volume_structure(6))
    assert table.n_clusters == n_negative + n_positive
    assert (table.sign == -1).sum() == n_negative
    for label in np.flatnonzero(table.sign == -1) + 1:
        members = table.labels == label
        assert table.mass[label - 1] == pytest.approx(volume.ravel()[members].sum(), rel=1e-12)
        assert table.peak_value[label - 1] == volume.ravel()[members].min()


def test_surface_extent_is_area():
    coords = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [5, 5, 5]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])  # vertex 4 is in no triangle: area 0
    layout = surface_layout(coords, faces, 5)
    table = find_clusters(np.array([4.0, 3.5, 1.0, 3.2, 9.0]), layout, threshold=3.0)
    # {0, 1, 3} (vertex 2 below 3 still links 1 and 3 through 0) and {4}
    assert table.n_clusters == 2
    np.testing.assert_allclose(table.extent, [1 / 3 + 1 / 6 + 1 / 6, 0.0], rtol=1e-15)
    assert list(table.extent_unit) == ["mm2", "mm2"]
    assert table.mass[0] == pytest.approx(4.0 + 3.5 + 3.2, rel=1e-15)
    assert table.peak_index.tolist() == [0, 4]
    assert set(table.columns()) >= {"cluster", "extent", "mass", "peak_value", "peak_index",
                                    "peak_x", "peak_y", "peak_z"}


def test_batch_maxima_equal_each_maps_table(monkeypatch):
    volume = _smooth_volume((9, 8, 7), 11)
    mask = volume > -1.5
    layout = volume_layout(mask, 18)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(7, 1))
    maps = signs * volume[mask] + np.linspace(0, 0.3, 7)[:, None]
    maps[3] = -5.0  # a map without clusters gives 0
    monkeypatch.setattr(clusters_module, "NODES_PER_CALL", 150)  # several graph calls
    extent, mass = cluster_maxima(maps, layout, threshold=0.7)
    for row, values in enumerate(maps):
        table = find_clusters(values, layout, threshold=0.7)
        assert extent[row] == (table.extent.max() if table.n_clusters else 0.0)
        assert mass[row] == pytest.approx(table.mass.max() if table.n_clusters else 0.0, rel=1e-12)


def test_two_sided_batch_maxima_take_both_tails_and_skip_unfitted():
    volume = _smooth_volume((9, 8, 7), 13)
    layout = volume_layout(np.ones(volume.shape, bool), 6)
    maps = np.stack([volume.ravel(), 3 * volume.ravel()])
    maps[:, ::5] = np.nan  # not fitted: in no cluster
    extent, mass = cluster_maxima(maps, layout, threshold=0.8, two_sided=True)
    for row, values in enumerate(maps):
        filled = np.nan_to_num(values, nan=0.0)  # 0 is below the threshold in both tails
        table = find_clusters(filled, layout, threshold=0.8, two_sided=True)
        assert extent[row] == table.extent.max()
        assert mass[row] == pytest.approx(np.abs(table.mass).max(), rel=1e-12)  # summation order


def test_cifti_clusters_report_their_part_and_unit():
    from blmm.geometry import combined_layout

    coords = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
    square = surface_layout(coords, np.array([[0, 1, 2], [0, 2, 3]]), 4, name="left")
    line = volume_layout(np.ones((3, 1, 1), bool))
    both = combined_layout([square, line])
    table = find_clusters(np.array([5.0, 5.0, 0.0, 0.0, 4.0, 4.0, 4.0]), both, threshold=3.0)
    # the volume cluster has 3 voxels; the surface one 1/3 + 1/6 mm² (extent order: 3 > 0.5)
    assert list(table.part) == ["volume", "left"]
    assert list(table.extent_unit) == ["voxels", "mm2"]
    np.testing.assert_allclose(table.extent, [3.0, 0.5], rtol=1e-15)  # float64 rounding

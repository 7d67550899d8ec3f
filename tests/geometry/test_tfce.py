"""TFCE against nilearn (volume), MNE (mesh), a brute-force exact integral and a hand-computed mesh.

What each oracle computes:
- nilearn's ``calculate_tfce`` (a private function, used here only as an oracle): levels
  linspace(0, max|x|, 101)[1:] (dh = max|x| / 100), members ``x >= h``, score e^E h^H per
  level WITHOUT the factor dh (fslmaths' convention), voxel counts; its negative part is
  enhanced separately and negated.  So nilearn = our `tfce_stepped(dh=max|x|/100) / dh`.
- MNE's ``_find_clusters`` with threshold=dict(start=0, step=dh, ...): levels arange(0, max, dh)
  (the maximum itself excluded), members ``x > h``, score e^E h^H dh, extent = vertex COUNT.
  With a step that does not divide the maximum and continuous values (no ties), this is our
  `tfce_stepped` with unit extents.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse.csgraph import connected_components

from blmm.errors import GeometryError
from blmm.geometry import (
    SpatialLayout, combined_layout, surface_layout, tfce, tfce_batch, tfce_maxima, tfce_stepped,
    volume_layout, volume_structure,
)
from blmm.io.surfaces import fsaverage5_mesh

# Agreement to 1e-6 relative to the map's largest TFCE value is the criterion; the
# two computations sum the same terms in another order (float64: ~1e-13 relative).
RTOL = 1e-6


def _close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=RTOL * np.abs(theirs).max())


def _smooth_volume(shape, seed, mean=0.0):
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return volume / volume.std() + mean


@pytest.fixture(scope="module")
def fsaverage5():
    mesh = fsaverage5_mesh("left", "white")
    layout = surface_layout(mesh.coords, mesh.faces, mesh.n_vertices)
    rng = np.random.default_rng(7)
    values = rng.standard_normal(mesh.n_vertices)
    degree = np.asarray(layout.adjacency.sum(axis=1)).ravel()
    for _ in range(8):  # smooth on the mesh so clusters are large
        values = (layout.adjacency @ values + values) / (degree + 1)
    return mesh, layout, values / values.std()


@pytest.mark.parametrize("connectivity, mean", [(6, 0.0), (26, 0.4)])
def test_stepped_equals_nilearn_on_a_volume(connectivity, mean):
    from nilearn.mass_univariate._utils import calculate_tfce

    volume = _smooth_volume((13, 12, 11), connectivity, mean)
    mask = volume > -1.8  # ragged mask: outside voxels are 0 in nilearn's array, below every level
    layout = volume_layout(mask, connectivity)
    full = np.where(mask, volume, 0.0)
    theirs = calculate_tfce(full[..., None], volume_structure(connectivity), E=0.5, H=2,
                            dh="auto", two_sided_test=True)[..., 0][mask]
    dh = np.abs(volume[mask]).max() / 100
    _close(tfce_stepped(volume[mask], layout, dh, H=2, E=0.5) / dh, theirs)
    # the volume defaults are nilearn's H = 2, E = 0.5
    _close(tfce_stepped(volume[mask], layout, dh) / dh, theirs)


@pytest.mark.parametrize("E", [1.0, 0.5])
def test_stepped_equals_mne_on_a_mesh(fsaverage5, E):
    mne = pytest.importorskip("mne")
    from mne.stats.cluster_level import _find_clusters

    mesh, layout, values = fsaverage5
    adjacency = mne.spatial_tris_adjacency(mesh.faces, remap_vertices=False)
    counted = SpatialLayout(layout.adjacency, np.ones(layout.n_elements), layout.coords,
                            layout.parts)  # MNE counts vertices
    step = 0.0317  # does not divide the maximum: MNE stops below it, we at it
    _, positive = _find_clusters(values, dict(start=0, step=step, h_power=2, e_power=E),
                                 tail=1, adjacency=adjacency)
    _, negative = _find_clusters(values, dict(start=0, step=-step, h_power=2, e_power=E),
                                 tail=-1, adjacency=adjacency)
    _close(tfce_stepped(values, counted, step, H=2, E=E), positive - negative)


def _brute_force_exact(values, mask, structure, H, E):
    """∫ e^E h^H dh as closed-form pieces between consecutive distinct positive values,
    labelling each level with ndimage.label (independent of blmm's union-find)."""
    out = np.zeros(values.shape)
    levels = np.unique(values[mask & (values > 0)])
    lower = 0.0
    for level in levels:
        labels, _ = ndimage.label(mask & (values >= level), structure)
        sizes = np.bincount(labels.ravel())
        piece = (level ** (H + 1) - lower ** (H + 1)) / (H + 1)
        inside = labels > 0
        out[inside] += sizes[labels[inside]] ** E * piece
        lower = level
    return out


@pytest.mark.parametrize("connectivity, H, E", [(6, 2.0, 0.5), (18, 2.0, 1.0), (26, 1.5, 0.7)])
def test_exact_equals_a_brute_force_integral(connectivity, H, E):
    volume = _smooth_volume((7, 6, 6), connectivity, 0.2)
    mask = volume > -1.0
    layout = volume_layout(mask, connectivity)
    structure = volume_structure(connectivity)
    expected = (_brute_force_exact(volume, mask, structure, H, E)
                - _brute_force_exact(-volume, mask, structure, H, E))[mask]
    _close(tfce(volume[mask], layout, H=H, E=E), expected)


@pytest.mark.parametrize("decimals", [None, 1])
def test_exact_on_rough_maps_with_many_saddles_and_ties(decimals):
    # unsmoothed noise: many local maxima, so most merges join two components (saddles);
    # rounding makes many equal values (zero-width pieces, elements joining at one level)
    volume = np.random.default_rng(12).standard_normal((8, 7, 6)) + 0.3
    if decimals is not None:
        volume = np.round(volume, decimals)
    mask = np.ones(volume.shape, bool)
    structure = volume_structure(18)
    expected = (_brute_force_exact(volume, mask, structure, 2.0, 0.5)
                - _brute_force_exact(-volume, mask, structure, 2.0, 0.5)).ravel()
    _close(tfce(volume.ravel(), volume_layout(mask, 18)), expected)


def test_exact_is_the_limit_of_the_stepped_sum():
    volume = _smooth_volume((10, 10, 8), 4)
    layout = volume_layout(np.ones(volume.shape, bool), 6)
    values = volume.ravel()
    exact = tfce(values, layout)
    top = np.abs(values).max()
    # the stepped sum takes each level's extent at its top end: its error shrinks like dh
    errors = [np.abs(tfce_stepped(values, layout, top / n) - exact).max() for n in (100, 1000)]
    assert errors[1] < errors[0] / 5
    assert errors[1] < 0.01 * np.abs(exact).max()


def _grid_mesh(side: int, seed: int):
    """A jittered triangulated grid: vertex areas all differ."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    coords = np.column_stack([i.ravel(), j.ravel(), np.zeros(side * side)])
    coords[:, :2] += rng.uniform(-0.3, 0.3, (side * side, 2))
    corner = (i[:-1, :-1] * side + j[:-1, :-1]).ravel()
    faces = np.concatenate([np.column_stack([corner, corner + side, corner + 1]),
                            np.column_stack([corner + 1, corner + side, corner + side + 1])])
    return coords, faces


@pytest.mark.parametrize("E", [1.0, 0.5])
def test_exact_area_weighted_equals_a_brute_force_integral_on_a_mesh(E):
    coords, faces = _grid_mesh(9, int(E * 10))
    layout = surface_layout(coords, faces, len(coords))
    values = np.random.default_rng(5).standard_normal(len(coords))
    expected = np.zeros(len(coords))
    for sign in (1.0, -1.0):
        x = sign * values
        lower = 0.0
        for level in np.unique(x[x > 0]):  # one csgraph labelling per distinct value
            inside = x >= level
            sub = layout.adjacency[inside][:, inside]
            _, labels = connected_components(sub, directed=False)
            area = np.bincount(labels, weights=layout.extents[inside])
            expected[inside] += sign * area[labels] ** E * (level ** 3 - lower ** 3) / 3
            lower = level
    _close(tfce(values, layout, H=2, E=E), expected)


def test_area_weighting_on_a_hand_computed_mesh():
    # unit square as triangles (0, 1, 2) and (0, 2, 3): areas 1/3, 1/6, 1/3, 1/6
    coords = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
    layout = surface_layout(coords, np.array([[0, 1, 2], [0, 2, 3]]), 4)
    values = np.array([3.0, 1.0, 2.0, 0.0])
    # vertex 0: {0} on (2, 3], {0, 2} on (1, 2], {0, 1, 2} on (0, 1]; ∫ e h² dh in pieces
    zero = (1 / 3) * (27 - 8) / 3 + (2 / 3) * (8 - 1) / 3 + (5 / 6) * 1 / 3
    two = (2 / 3) * (8 - 1) / 3 + (5 / 6) * 1 / 3
    one = (5 / 6) * 1 / 3
    # float64 rounding of a handful of operations
    np.testing.assert_allclose(tfce(values, layout), [zero, one, two, 0.0], rtol=1e-13)
    # the surface default is E = 1: the same as asked explicitly
    np.testing.assert_allclose(tfce(values, layout, H=2, E=1), [zero, one, two, 0.0], rtol=1e-13)


def test_each_part_gets_its_own_defaults_and_batches_equal_rows():
    volume = _smooth_volume((5, 5, 4), 3)
    cube = volume_layout(np.ones(volume.shape, bool), 6)
    coords = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
    square = surface_layout(coords, np.array([[0, 1, 2], [0, 2, 3]]), 4)
    both = combined_layout([square, cube])
    surface_values = np.array([3.0, -1.0, 2.0, 0.5])
    values = np.concatenate([surface_values, volume.ravel()])
    expected = np.concatenate([tfce(surface_values, square, H=2, E=1),
                               tfce(volume.ravel(), cube, H=2, E=0.5)])
    _close(tfce(values, both), expected)
    batch = np.stack([values, -values, 2 * values])
    result = tfce_batch(batch, both)
    np.testing.assert_array_equal(result[0], tfce(values, both))
    _close(result[1], -tfce(values, both))  # two-sided: the sign flips with the map


def test_bad_maps_are_refused():
    layout = volume_layout(np.ones((2, 2, 2), bool))
    with pytest.raises(GeometryError, match=r"found shape \(7,\), expected \(8,\)"):
        tfce(np.zeros(7), layout)
    with pytest.raises(GeometryError, match="NaN or infinite"):
        tfce(np.full(8, np.nan), layout)
    with pytest.raises(GeometryError, match="found 0, expected a positive number"):
        tfce_stepped(np.zeros(8), layout, 0)
    with pytest.raises(GeometryError, match=r"found H = -1.0, E = 0.5; expected both >= 0"):
        tfce(np.zeros(8), layout, H=-1)


def test_a_lone_element_and_a_flat_map():
    layout = volume_layout(np.ones((3, 1, 1), bool))
    # element 1 alone above 0 on (0, 2]: ∫ h² dh = 8/3; ties merge at once: 2^0.5 * 8/3 each
    np.testing.assert_allclose(tfce(np.array([0.0, 2.0, -1.0]), layout),
                               [0.0, 8 / 3, -1 / 3], rtol=1e-14)  # float64 rounding
    np.testing.assert_allclose(tfce(np.array([2.0, 2.0, 0.0]), layout),
                               [np.sqrt(2) * 8 / 3] * 2 + [0.0], rtol=1e-14)
    components = connected_components(layout.adjacency)[0]
    assert components == 1


def test_maxima_of_a_batch_treat_unfitted_elements_as_outside():
    volume = _smooth_volume((6, 5, 5), 8)
    layout = volume_layout(np.ones(volume.shape, bool), 6)
    batch = np.stack([volume.ravel(), -2 * volume.ravel(), np.zeros(volume.size)])
    with_nan = batch.copy()
    with_nan[:, ::7] = np.nan
    expected = [np.abs(tfce(np.nan_to_num(row), layout)).max() for row in with_nan]
    np.testing.assert_array_equal(tfce_maxima(with_nan, layout), expected)
    assert tfce_maxima(batch, layout)[2] == 0.0
    one_sided = tfce_maxima(batch[:1], layout, two_sided=False)
    assert one_sided[0] == tfce(volume.ravel(), layout, two_sided=False).max()


@pytest.mark.parametrize("per_pass", [1, 10_000_000])
def test_maps_sharing_a_pass_equal_each_map_alone_bit_for_bit(monkeypatch, per_pass):
    import blmm.geometry.threshold_free as threshold_free

    # rough rounded maps: many saddles and ties, where merge order could change rounding
    rng = np.random.default_rng(21)
    layout = volume_layout(np.ones((7, 6, 5), bool), 18)
    maps = np.round(rng.standard_normal((5, layout.n_elements)) + 0.2, 1)
    maps[3] = 0.0  # a map with nothing above 0
    alone = np.stack([tfce(row, layout) for row in maps])
    monkeypatch.setattr(threshold_free, "ELEMENTS_PER_CALL", per_pass)
    np.testing.assert_array_equal(tfce_batch(maps, layout), alone)
    # the maxima are taken at the components' peaks only: the same numbers as over every element
    np.testing.assert_array_equal(tfce_maxima(maps, layout), np.abs(alone).max(axis=1))
    one_sided = np.stack([tfce(row, layout, two_sided=False) for row in maps]).max(axis=1)
    np.testing.assert_array_equal(tfce_maxima(maps, layout, two_sided=False), np.maximum(one_sided, 0))


def test_a_batch_of_the_wrong_width_is_refused():
    layout = volume_layout(np.ones((2, 2, 2), bool))
    with pytest.raises(GeometryError, match=r"found shape \(3, 7\), expected \(maps, 8,\)"):
        tfce_batch(np.zeros((3, 7)), layout)

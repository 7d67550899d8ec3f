"""Adjacency, vertex areas and layouts against brute-force and hand-computed references."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from blmm.errors import GeometryError
from blmm.geometry import (
    SurfacePiece, combined_layout, grayordinate_layout, mesh_adjacency, surface_layout,
    vertex_areas, volume_adjacency, volume_layout, voxel_layout,
)

# Two triangles making the unit square: vertices 0 and 2 touch both triangles.
SQUARE = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
SQUARE_FACES = np.array([[0, 1, 2], [0, 2, 3]])


def _pairs(matrix) -> set[tuple[int, int]]:
    coo = matrix.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist()))


@pytest.mark.parametrize("connectivity, most_axes", [(6, 1), (18, 2), (26, 3)])
def test_volume_adjacency_is_every_pair_within_the_neighbourhood(connectivity, most_axes):
    rng = np.random.default_rng(connectivity)
    mask = rng.random((5, 6, 4)) < 0.6
    ijk = np.argwhere(mask)  # C order: the layout's numbering
    step = np.abs(ijk[:, None, :] - ijk[None, :, :])
    near = (step.max(axis=2) == 1) & ((step > 0).sum(axis=2) <= most_axes)
    expected = set(zip(*map(np.ndarray.tolist, np.nonzero(near))))
    adjacency = volume_adjacency(mask, connectivity)
    assert adjacency.shape == (mask.sum(), mask.sum())
    assert _pairs(adjacency) == expected
    assert set(np.unique(adjacency.data).tolist()) == {1}


def test_volume_adjacency_rejects_other_connectivities_and_shapes():
    with pytest.raises(GeometryError, match="found 8, expected one of 6, 18 or 26"):
        volume_adjacency(np.ones((2, 2, 2), bool), 8)
    with pytest.raises(GeometryError, match="found 2 dimensions, expected 3"):
        volume_adjacency(np.ones((2, 2), bool), 6)


def test_mesh_adjacency_and_areas_of_the_square():
    adjacency = mesh_adjacency(SQUARE_FACES, 4)
    assert _pairs(adjacency) == {(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0),
                                 (2, 3), (3, 2), (0, 3), (3, 0)}
    # one third of each incident triangle (each of area 1/2); exact in float64 up to rounding
    np.testing.assert_allclose(vertex_areas(SQUARE, SQUARE_FACES), [1 / 3, 1 / 6, 1 / 3, 1 / 6],
                               rtol=1e-15)


def test_vertex_areas_add_up_to_the_mesh_area():
    # a scaled, tilted 3-4-5 right triangle fan; total area by hand = 4 * 6 = 24
    coords = np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0], [-3, 0, 0], [0, -4, 0]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1]])
    areas = vertex_areas(coords, faces)
    np.testing.assert_allclose(areas, [8.0, 4.0, 4.0, 4.0, 4.0], rtol=1e-15)  # float64 rounding


def test_surface_layout_masks_after_areas_and_rejects_other_vertex_counts():
    layout = surface_layout(SQUARE, SQUARE_FACES, 4, kept=np.array([True, True, True, False]))
    np.testing.assert_allclose(layout.extents, [1 / 3, 1 / 6, 1 / 3], rtol=1e-15)
    assert _pairs(layout.adjacency) == {(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)}
    assert layout.kind == "surface"
    with pytest.raises(GeometryError, match="lh.white has 4 vertices but the data has 5"):
        surface_layout(SQUARE, SQUARE_FACES, 5, mesh_name="lh.white")


def test_restricting_a_volume_layout_equals_building_it_from_the_smaller_mask():
    rng = np.random.default_rng(3)
    big = rng.random((6, 5, 4)) < 0.8
    small = big & (rng.random(big.shape) < 0.7)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 1]
    restricted = volume_layout(big, 18, affine).restricted(small[big])
    direct = volume_layout(small, 18, affine)
    assert _pairs(restricted.adjacency) == _pairs(direct.adjacency)
    np.testing.assert_array_equal(restricted.coords, direct.coords)
    np.testing.assert_array_equal(direct.coords[0], np.argwhere(small)[0] * 2 + [-10, 5, 1])


def test_voxel_layout_keeps_the_listed_order():
    mask = np.ones((3, 3, 2), bool)
    ijk = np.argwhere(mask)
    shuffle = np.random.default_rng(0).permutation(len(ijk))
    listed = voxel_layout(ijk[shuffle], 26)
    in_c_order = volume_layout(mask, 26)
    back = listed.taken(np.argsort(shuffle))
    assert _pairs(back.adjacency) == _pairs(in_c_order.adjacency)


def test_grayordinates_are_block_diagonal_in_the_file_order():
    left = SurfacePiece("left", rows=np.array([3, 4]), vertices=np.array([0, 2]), n_vertices=4,
                        coords=SQUARE, faces=SQUARE_FACES)
    volume_rows = np.array([0, 1, 2])
    layout = grayordinate_layout(5, [left], volume_rows, np.array([[0, 0, 0], [0, 0, 1], [1, 1, 1]]),
                                 connectivity=6)
    assert layout.kind == "cifti"
    assert _pairs(layout.adjacency) == {(0, 1), (1, 0), (3, 4), (4, 3)}
    np.testing.assert_allclose(layout.extents, [1, 1, 1, 1 / 3, 1 / 3], rtol=1e-15)
    assert [(part.kind, part.positions.tolist()) for part in layout.parts] == [
        ("surface", [3, 4]), ("volume", [0, 1, 2])]
    with pytest.raises(GeometryError, match="cover 4 grayordinates, expected each of 5 once"):
        grayordinate_layout(5, [left], volume_rows[:2], np.zeros((2, 3)) + [[0, 0, 0], [0, 0, 1]])


def test_combined_layouts_do_not_touch():
    a = volume_layout(np.ones((2, 1, 1), bool))
    b = surface_layout(SQUARE, SQUARE_FACES, 4)
    both = combined_layout([a, b])
    assert both.n_elements == 6
    assert _pairs(both.adjacency) == {(0, 1), (1, 0)} | {(i + 2, j + 2) for i, j in _pairs(b.adjacency)}


def test_a_layout_travels_to_workers_with_its_cached_edges():
    layout = volume_layout(np.ones((3, 2, 2), bool), 18)
    first, second = layout.edges
    copy = pickle.loads(pickle.dumps(layout))
    np.testing.assert_array_equal(copy.edges[0], first)
    np.testing.assert_array_equal(copy.edges[1], second)
    assert (copy.adjacency != layout.adjacency).nnz == 0

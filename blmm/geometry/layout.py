"""Which map elements touch which: adjacency, extents and coordinates of an analysis.

A `SpatialLayout` is built once per analysis and shared by the observed map and every
resampled one, so both are clustered over the same neighbours.  Element ``i`` of a layout is
position ``i`` of a masked map (the fitted voxels or vertices, in the analysis' order):

- volumes: the in-mask voxels in C order, i.e. ``np.flatnonzero(mask)`` of the 3-D mask;
- surfaces: the kept vertices in increasing vertex number, ``np.flatnonzero(kept)``;
- CIFTI: the kept grayordinates in the file's order (its cortices, then its voxels).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from blmm.errors import GeometryError

VOLUME_CONNECTIVITIES = (6, 18, 26)
# ndimage's structure rank for each neighbourhood: faces (6), + edges (18), + corners (26).
STRUCTURE_RANK = {6: 1, 18: 2, 26: 3}
SURFACE = "surface"
VOLUME = "volume"


@dataclass(frozen=True, eq=False)
class LayoutPart:
    """One piece of a layout: a surface (one mesh) or a volume.

    ``positions`` are the layout elements it holds; no adjacency crosses two parts.
    """

    kind: str  # SURFACE or VOLUME
    name: str  # e.g. "left", "right", "volume"
    positions: np.ndarray  # int64 indices into the layout's elements


@dataclass(frozen=True, eq=False)
class SpatialLayout:
    """Adjacency, per-element extent and coordinates of the elements of a masked map.

    ``adjacency`` is a symmetric (n, n) CSR matrix of ones without diagonal.  ``extents`` is
    what one element adds to a cluster's extent: 1 per voxel (extent is a voxel count) and the
    vertex area in mm² on surfaces (extent is an area).  ``coords`` are world coordinates
    (mm) of each element, for peaks in cluster tables.
    """

    adjacency: sp.csr_matrix
    extents: np.ndarray
    coords: np.ndarray
    parts: tuple[LayoutPart, ...]
    connectivity: int | None = None  # 6, 18 or 26 where a volume part exists

    def __post_init__(self) -> None:
        n = self.adjacency.shape[0]
        if self.adjacency.shape != (n, n) or self.extents.shape != (n,) or self.coords.shape != (n, 3):
            raise GeometryError(
                f"layout pieces disagree: adjacency {self.adjacency.shape}, extents "
                f"{self.extents.shape}, coords {self.coords.shape}; expected ({n}, {n}), "
                f"({n},), ({n}, 3)")

    @property
    def n_elements(self) -> int:
        return int(self.adjacency.shape[0])

    @property
    def kind(self) -> str:
        """'volume', 'surface', or 'cifti' when surfaces and a volume are combined."""
        kinds = {part.kind for part in self.parts}
        return kinds.pop() if len(kinds) == 1 else "cifti"

    @property
    def nbytes(self) -> int:
        """Bytes the layout holds once its edge lists are built (``edges``, ``part_edges``: 4 int64 an edge)."""
        a = self.adjacency
        return int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes + self.extents.nbytes + self.coords.nbytes
                   + sum(part.positions.nbytes for part in self.parts) + 32 * (a.nnz // 2))

    @cached_property
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Each neighbouring pair once, as (i, j) with i < j (computed once per layout)."""
        upper = sp.triu(self.adjacency, k=1).tocoo()
        return upper.row.astype(np.int64), upper.col.astype(np.int64)

    @cached_property
    def part_edges(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Per part, its edges numbered within the part (index into ``part.positions``)."""
        first, second = self.edges
        local = np.empty(self.n_elements, dtype=np.int64)
        owner = np.empty(self.n_elements, dtype=np.int64)
        for index, part in enumerate(self.parts):
            local[part.positions] = np.arange(part.positions.size)
            owner[part.positions] = index
        return tuple((local[first[owner[first] == index]], local[second[owner[first] == index]])
                     for index in range(len(self.parts)))

    def restricted(self, kept: np.ndarray) -> SpatialLayout:
        """The layout of the elements where boolean ``kept`` is true (renumbered in order)."""
        kept = np.asarray(kept, dtype=bool)
        if kept.shape != (self.n_elements,):
            raise GeometryError(
                f"mask has {kept.size} values, the layout has {self.n_elements} elements")
        return self.taken(np.flatnonzero(kept))

    def taken(self, positions: np.ndarray) -> SpatialLayout:
        """The layout of the elements at ``positions`` (distinct), numbered in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        new_position = np.full(self.n_elements, -1, dtype=np.int64)
        new_position[positions] = np.arange(positions.size)
        if positions.size and (np.count_nonzero(new_position >= 0) != positions.size):
            raise GeometryError("positions: found an element twice, expected distinct positions")
        parts = []
        for part in self.parts:
            inside = new_position[part.positions]
            parts.append(LayoutPart(part.kind, part.name, np.sort(inside[inside >= 0])))
        return SpatialLayout(_ones(self.adjacency[positions][:, positions]),
                             self.extents[positions], self.coords[positions], tuple(parts),
                             self.connectivity)


def _ones(matrix: sp.spmatrix) -> sp.csr_matrix:
    """The same pattern with every stored value 1 (duplicates summed first), as int8 CSR."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.data = np.ones_like(matrix.data, dtype=np.int8)
    return matrix.astype(np.int8)


def volume_structure(connectivity: int) -> np.ndarray:
    """The (3, 3, 3) boolean neighbourhood of 6, 18 or 26 neighbours (ndimage's structure)."""
    if connectivity not in STRUCTURE_RANK:
        raise GeometryError(
            f"connectivity: found {connectivity!r}, expected one of 6, 18 or 26 neighbours")
    from scipy import ndimage  # when used: scipy.ndimage costs every run ~30 ms (issue 21)

    return ndimage.generate_binary_structure(3, STRUCTURE_RANK[connectivity])


def volume_adjacency(mask: np.ndarray, connectivity: int = 6) -> sp.csr_matrix:
    """Adjacency of the true voxels of a 3-D mask, numbered as ``np.flatnonzero(mask)``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise GeometryError(f"volume mask: found {mask.ndim} dimensions, expected 3")
    structure = volume_structure(connectivity)
    n = int(mask.sum())
    number = np.full(mask.shape, -1, dtype=np.int64)
    number[mask] = np.arange(n)
    rows, cols = [], []
    # Half of the symmetric offsets; each pair is found once and mirrored below.
    offsets = [d for d in np.argwhere(structure) - 1 if tuple(d) > (0, 0, 0)]
    for offset in offsets:
        source = tuple(slice(max(0, -o), mask.shape[a] - max(0, o)) for a, o in enumerate(offset))
        target = tuple(slice(max(0, o), mask.shape[a] - max(0, -o)) for a, o in enumerate(offset))
        first, second = number[source], number[target]
        both = (first >= 0) & (second >= 0)
        rows.append(first[both])
        cols.append(second[both])
    return _symmetric(np.concatenate(rows), np.concatenate(cols), n)


def _symmetric(rows: np.ndarray, cols: np.ndarray, n: int) -> sp.csr_matrix:
    both_rows = np.concatenate([rows, cols])
    both_cols = np.concatenate([cols, rows])
    keep = both_rows != both_cols
    matrix = sp.coo_matrix((np.ones(int(keep.sum()), dtype=np.int8),
                            (both_rows[keep], both_cols[keep])), shape=(n, n))
    return _ones(matrix)


def mesh_adjacency(faces: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    """Vertices sharing a triangle edge are neighbours; (n_vertices, n_vertices) CSR."""
    faces = _checked_faces(faces, n_vertices)
    rows = faces[:, [0, 1, 2]].ravel()
    cols = faces[:, [1, 2, 0]].ravel()
    return _symmetric(rows, cols, n_vertices)


def vertex_areas(coords: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Each vertex's area (coordinate units², mm²): one third of each incident triangle's area.

    The thirds of every triangle add up to the mesh's total area; a vertex in no triangle has 0.
    """
    coords = np.asarray(coords, dtype=np.float64)
    faces = _checked_faces(faces, len(coords))
    corner = coords[faces]
    triangle = 0.5 * np.linalg.norm(
        np.cross(corner[:, 1] - corner[:, 0], corner[:, 2] - corner[:, 0]), axis=1)
    return np.bincount(faces.ravel(), weights=np.repeat(triangle / 3.0, 3),
                       minlength=len(coords))


def _checked_faces(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise GeometryError(f"mesh faces: found shape {faces.shape}, expected (M, 3)")
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise GeometryError(
            f"mesh faces refer to vertex {int(faces.max())}, but the mesh has {n_vertices} vertices")
    return faces


def volume_layout(mask: np.ndarray, connectivity: int = 6,
                  affine: np.ndarray | None = None) -> SpatialLayout:
    """The layout of a 3-D analysis mask's voxels (extent: 1 per voxel; coords: ``affine`` @ ijk)."""
    mask = np.asarray(mask, dtype=bool)
    adjacency = volume_adjacency(mask, connectivity)
    coords = _world(np.argwhere(mask), affine)
    n = adjacency.shape[0]
    return SpatialLayout(adjacency, np.ones(n), coords,
                         (LayoutPart(VOLUME, VOLUME, np.arange(n)),), connectivity)


def _world(ijk: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
    if affine is None:
        return ijk
    affine = np.asarray(affine, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def surface_layout(coords: np.ndarray, faces: np.ndarray, n_data_vertices: int,
                   kept: np.ndarray | None = None, name: str = "surface",
                   mesh_name: str = "the mesh", data_name: str = "the data") -> SpatialLayout:
    """The layout of a mesh's kept vertices; extents are vertex areas over the WHOLE mesh.

    ``n_data_vertices`` is the data's vertex count; a mesh of another size is an error naming
    both.  Areas are computed before masking, so a vertex at the medial wall's edge keeps its
    full third of every triangle.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise GeometryError(f"{mesh_name}: coordinates have shape {coords.shape}, expected (N, 3)")
    if len(coords) != n_data_vertices:
        raise GeometryError(
            f"{mesh_name} has {len(coords)} vertices but {data_name} has {n_data_vertices}: "
            "name the mesh the data were sampled on")
    n = len(coords)
    layout = SpatialLayout(mesh_adjacency(faces, n), vertex_areas(coords, faces), coords,
                           (LayoutPart(SURFACE, name, np.arange(n)),))
    return layout if kept is None else layout.restricted(kept)


@dataclass(frozen=True, eq=False)
class SurfacePiece:
    """One surface structure of a CIFTI: its grayordinate rows, their mesh vertices, the mesh."""

    name: str  # e.g. "left"
    rows: np.ndarray  # grayordinates of this structure
    vertices: np.ndarray  # their vertex numbers on the mesh
    n_vertices: int  # the structure's vertex count as the CIFTI declares it
    coords: np.ndarray  # the mesh
    faces: np.ndarray
    mesh_name: str = "the mesh"


def grayordinate_layout(n_grayordinates: int, surfaces: list[SurfacePiece],
                        volume_rows: np.ndarray, volume_ijk: np.ndarray,
                        affine: np.ndarray | None = None, connectivity: int = 6) -> SpatialLayout:
    """A CIFTI's layout in grayordinate order: each surface on its mesh, all voxels as one volume.

    No adjacency joins two surfaces or a surface and the volume (block-diagonal); voxels of
    different volume structures that touch are neighbours.
    """
    pieces = [surface_layout(piece.coords, piece.faces, piece.n_vertices, name=piece.name,
                             mesh_name=piece.mesh_name,
                             data_name=f"the CIFTI's {piece.name} structure").taken(piece.vertices)
              for piece in surfaces]
    order = [np.asarray(piece.rows, dtype=np.int64) for piece in surfaces]
    if len(volume_rows):
        pieces.append(voxel_layout(volume_ijk, connectivity, affine))
        order.append(np.asarray(volume_rows, dtype=np.int64))
    order = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    if not np.array_equal(np.sort(order), np.arange(n_grayordinates)):
        raise GeometryError(
            f"the CIFTI's structures cover {order.size} grayordinates, expected each of "
            f"{n_grayordinates} once")
    return combined_layout(pieces).taken(np.argsort(order))


def combined_layout(layouts: list[SpatialLayout]) -> SpatialLayout:
    """Layouts side by side (e.g. CIFTI's cortices then its volume): block-diagonal adjacency."""
    if not layouts:
        raise GeometryError("no layout to combine")
    offsets = np.cumsum([0] + [layout.n_elements for layout in layouts])
    parts = tuple(LayoutPart(part.kind, part.name, part.positions + offset)
                  for layout, offset in zip(layouts, offsets) for part in layout.parts)
    connectivities = {layout.connectivity for layout in layouts} - {None}
    return SpatialLayout(
        _ones(sp.block_diag([layout.adjacency for layout in layouts], format="csr")),
        np.concatenate([layout.extents for layout in layouts]),
        np.concatenate([layout.coords for layout in layouts]),
        parts, connectivities.pop() if connectivities else None)


def voxel_layout(ijk: np.ndarray, connectivity: int = 6,
                 affine: np.ndarray | None = None) -> SpatialLayout:
    """The layout of voxels listed by their (i, j, k) indices, in the listed order (CIFTI's volume)."""
    ijk = np.asarray(ijk, dtype=np.int64).reshape(-1, 3)
    if len(ijk) and ijk.min() < 0:
        raise GeometryError("voxel indices must be non-negative")
    if len(np.unique(ijk, axis=0)) != len(ijk):
        raise GeometryError("a voxel is listed twice")
    shape = tuple(ijk.max(axis=0) + 1) if len(ijk) else (1, 1, 1)
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(ijk.T)] = True
    # volume_adjacency numbers voxels in C order; map that numbering to the listed order.
    c_order = np.ravel_multi_index(tuple(ijk.T), shape)
    listed = np.argsort(c_order)  # listed[c] is the listed position of the c-th voxel in C order
    adjacency = volume_adjacency(mask, connectivity).tocoo()
    n = len(ijk)
    reordered = sp.coo_matrix((adjacency.data, (listed[adjacency.row], listed[adjacency.col])),
                              shape=(n, n))
    return SpatialLayout(_ones(reordered), np.ones(n), _world(ijk, affine),
                         (LayoutPart(VOLUME, VOLUME, np.arange(n)),), connectivity)

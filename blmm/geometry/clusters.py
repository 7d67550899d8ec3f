"""Clusters: connected elements at or above a cluster-forming threshold, with extent and mass.

Membership is ``value >= threshold`` (PALM's and FSL's convention).  A cluster's extent is
the sum of its elements' layout extents (voxel count on volumes, area in mm² on surfaces);
its mass is PALM's: the sum of the statistic over the cluster's elements (not of the excess
over the threshold), unweighted by area.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.errors import GeometryError
from blmm.geometry.layout import SURFACE, SpatialLayout

DEFAULT_CLUSTER_THRESHOLD = 3.0  # −log10 p, i.e. p < 0.001
# Above-threshold (row, element) pairs labelled in one graph call; bounds memory per call.
NODES_PER_CALL = 4_000_000


@dataclass(frozen=True)
class RowComponents:
    """Connected components of each row's above-threshold elements, all rows labelled at once.

    ``rows`` and ``elements`` list the above-threshold pairs in row-major order; ``labels``
    gives each pair's component (components never span rows); ``n_components`` counts them.
    """

    rows: np.ndarray
    elements: np.ndarray
    labels: np.ndarray
    n_components: int


def row_components(above: np.ndarray, first: np.ndarray, second: np.ndarray) -> RowComponents:
    """Components of every row of boolean ``above`` (rows x elements) on the graph whose
    edges are (first[k], second[k]); e.g. ``SpatialLayout.edges``.

    The rows are stacked as disjoint copies of the graph, so one scipy call labels them all.
    """
    above = np.asarray(above, dtype=bool)
    n = above.shape[1]
    flat = above.ravel()
    node = np.cumsum(flat) - 1  # node number of each above pair, in row-major order
    n_nodes = int(flat.sum())
    row, edge = np.nonzero(above[:, first] & above[:, second])
    source = node[row * n + first[edge]]
    target = node[row * n + second[edge]]
    graph = sp.csr_matrix((np.ones(len(source), dtype=np.int8), (source, target)),
                          shape=(n_nodes, n_nodes))
    from scipy.sparse.csgraph import connected_components  # when used: scipy's csgraph costs every run ~15 ms (issue 21)

    n_components, labels = connected_components(graph, directed=False)
    rows, elements = np.nonzero(above)
    return RowComponents(rows, elements, labels, int(n_components))


def _checked_map(values: np.ndarray, layout: SpatialLayout, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] != layout.n_elements:
        raise GeometryError(
            f"{what}: found {values.shape[-1]} values per map, the layout has "
            f"{layout.n_elements} elements")
    return values


@dataclass(frozen=True, eq=False)
class ClusterTable:
    """The clusters of one map, largest extent first (label k is row k - 1).

    ``labels`` (n,) holds each element's cluster (0 outside clusters); per cluster: ``sign``
    (+1 at or above the threshold, -1 at or below minus it), ``extent`` (voxels, or mm² where
    ``part`` is a surface), ``mass`` (signed sum of the statistic), ``peak_value`` (the most
    extreme statistic), ``peak_index`` (its position in the masked map) and ``peak_coords``
    (its world coordinates, mm).
    """

    labels: np.ndarray
    sign: np.ndarray
    extent: np.ndarray
    extent_unit: np.ndarray
    part: np.ndarray
    mass: np.ndarray
    peak_value: np.ndarray
    peak_index: np.ndarray
    peak_coords: np.ndarray

    @property
    def n_clusters(self) -> int:
        return int(self.extent.size)

    def columns(self) -> dict[str, np.ndarray]:
        """Named columns, one row per cluster, ready to be written as TSV."""
        return {
            "cluster": np.arange(1, self.n_clusters + 1), "sign": self.sign,
            "part": self.part, "extent": self.extent, "extent_unit": self.extent_unit,
            "mass": self.mass, "peak_value": self.peak_value, "peak_index": self.peak_index,
            "peak_x": self.peak_coords[:, 0], "peak_y": self.peak_coords[:, 1],
            "peak_z": self.peak_coords[:, 2],
        }


def find_clusters(values: np.ndarray, layout: SpatialLayout,
                  threshold: float = DEFAULT_CLUSTER_THRESHOLD,
                  statistic: np.ndarray | None = None, two_sided: bool = False) -> ClusterTable:
    """Clusters of the elements with ``values >= threshold`` (and ``<= -threshold`` if two-sided).

    ``values`` is the map the threshold applies to (e.g. a signed −log10 p); ``statistic``
    (default ``values``) is what mass and peaks are taken from.
    """
    values = _checked_map(values, layout, "cluster-forming map")
    statistic = values if statistic is None else _checked_map(statistic, layout, "statistic")
    signs = (1.0, -1.0) if two_sided else (1.0,)
    above = np.stack([sign * values >= threshold for sign in signs])
    found = row_components(above, *layout.edges)
    row_sign = np.asarray(signs)[found.rows]
    extent = np.bincount(found.labels, weights=layout.extents[found.elements],
                         minlength=found.n_components)
    signed = statistic[found.elements]
    mass = np.bincount(found.labels, weights=signed, minlength=found.n_components)
    # Peak: the element of largest signed statistic in its cluster (first one on ties).
    order = np.lexsort((found.elements, -row_sign * signed, found.labels))
    first = order[np.r_[True, found.labels[order][1:] != found.labels[order][:-1]][:order.size]]
    cluster_sign = np.zeros(found.n_components)
    cluster_sign[found.labels] = row_sign
    peak = np.zeros(found.n_components, dtype=np.int64)
    peak[found.labels[first]] = found.elements[first]
    rank = np.lexsort((peak, -extent))  # largest extent first; ties by peak position
    new_label = np.empty(found.n_components, dtype=np.int64)
    new_label[rank] = np.arange(1, found.n_components + 1)
    labels = np.zeros(layout.n_elements, dtype=np.int32)
    labels[found.elements] = new_label[found.labels]
    part_kind, part_name = _element_parts(layout)
    peaks = peak[rank]
    return ClusterTable(
        labels=labels, sign=cluster_sign[rank].astype(np.int8), extent=extent[rank],
        extent_unit=np.where(part_kind[peaks] == SURFACE, "mm2", "voxels"),
        part=part_name[peaks], mass=mass[rank], peak_value=statistic[peaks],
        peak_index=peaks, peak_coords=layout.coords[peaks])


def _element_parts(layout: SpatialLayout) -> tuple[np.ndarray, np.ndarray]:
    kind = np.empty(layout.n_elements, dtype=object)
    name = np.empty(layout.n_elements, dtype=object)
    for part in layout.parts:
        kind[part.positions] = part.kind
        name[part.positions] = part.name
    return kind, name


def cluster_maxima(values: np.ndarray, layout: SpatialLayout,
                   threshold: float = DEFAULT_CLUSTER_THRESHOLD,
                   statistic: np.ndarray | None = None,
                   two_sided: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per map of a (maps x elements) batch: the largest cluster extent and cluster mass.

    Clusters are ``values >= threshold`` (two-sided: also ``values <= -threshold``, their mass
    taken as minus the summed statistic); mass sums ``statistic`` (default ``values``).  NaN
    (an element not fitted) is in no cluster.  A map without clusters gives 0 for both.
    This is the resampling engine's transform: all maps are labelled in a few scipy calls.
    """
    values = np.atleast_2d(_checked_map(values, layout, "cluster-forming maps"))
    statistic = values if statistic is None else np.atleast_2d(
        _checked_map(statistic, layout, "statistic maps"))
    max_extent = np.zeros(values.shape[0])
    max_mass = np.zeros(values.shape[0])
    for sign in ((1.0, -1.0) if two_sided else (1.0,)):
        with np.errstate(invalid="ignore"):
            above = sign * values >= threshold  # NaN compares False: not in a cluster
        _tail_maxima(above, sign * statistic, layout, max_extent, max_mass)
    return max_extent, max_mass


def cluster_maxima_bytes(layout: SpatialLayout, maps: int) -> int:
    """An upper bound of what ``cluster_maxima`` allocates for a batch of ``maps`` maps (bytes): per
    map about 48 bytes an element and 64 an edge when every element is in a cluster (the above
    flags, their node numbers, the edges between above elements, the labels; tracemalloc on volumes
    with 6 and 26 neighbours and on meshes: tests/geometry/test_clusters.py)."""
    return int(max(1, maps) * (48 * layout.n_elements + 64 * layout.edges[0].size))


def _tail_maxima(above: np.ndarray, statistic: np.ndarray, layout: SpatialLayout,
                 max_extent: np.ndarray, max_mass: np.ndarray) -> None:
    first, second = layout.edges
    per_map = np.maximum(above.sum(axis=1), 1)
    start = 0
    while start < above.shape[0]:
        # as many maps as fit NODES_PER_CALL above-threshold pairs (at least one map)
        stop = start + max(1, int(np.searchsorted(np.cumsum(per_map[start:]), NODES_PER_CALL)))
        found = row_components(above[start:stop], first, second)
        extent = np.bincount(found.labels, weights=layout.extents[found.elements],
                             minlength=found.n_components)
        mass = np.bincount(found.labels, weights=statistic[start:stop][found.rows, found.elements],
                           minlength=found.n_components)
        owner = np.zeros(found.n_components, dtype=np.int64)
        owner[found.labels] = found.rows + start
        np.maximum.at(max_extent, owner, extent)
        np.maximum.at(max_mass, owner, mass)
        start = stop

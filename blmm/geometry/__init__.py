"""Geometry of an analysis, on arrays only: adjacency, extents, clusters and TFCE.

Beside io/ (which reads the meshes and masks), never touching files: layout.py builds one
`SpatialLayout` per analysis; clusters.py labels clusters and their extent and mass;
threshold_free.py (TFCE) enhances maps exactly or with a step.
"""
from blmm.geometry.clusters import (
    DEFAULT_CLUSTER_THRESHOLD, ClusterTable, cluster_maxima, cluster_maxima_bytes, find_clusters, row_components,
)
from blmm.geometry.layout import (
    SURFACE, VOLUME, VOLUME_CONNECTIVITIES, LayoutPart, SpatialLayout, SurfacePiece, combined_layout,
    grayordinate_layout,
    mesh_adjacency, surface_layout, vertex_areas, volume_adjacency, volume_layout,
    volume_structure, voxel_layout,
)
from blmm.geometry.threshold_free import (
    TFCE_DEFAULTS, tfce, tfce_batch, tfce_maxima, tfce_maxima_bytes, tfce_stepped,
)

__all__ = [
    "DEFAULT_CLUSTER_THRESHOLD", "ClusterTable", "cluster_maxima", "cluster_maxima_bytes", "find_clusters",
    "row_components", "SURFACE", "VOLUME", "VOLUME_CONNECTIVITIES", "LayoutPart",
    "SpatialLayout", "SurfacePiece", "combined_layout", "grayordinate_layout", "mesh_adjacency", "surface_layout", "vertex_areas",
    "volume_adjacency", "volume_layout", "volume_structure", "voxel_layout", "TFCE_DEFAULTS",
    "tfce", "tfce_batch", "tfce_maxima", "tfce_maxima_bytes", "tfce_stepped",
]

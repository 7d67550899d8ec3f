"""Reading and writing images and small text tables (see docs/inputs.md)."""
from blmm.errors import ImageError, InputError
from blmm.io.images import (
    FORMATS,
    SUPPORTED_SUFFIXES,
    ImageSpace,
    image_space,
    map_path,
    mismatch_reason,
    read_image,
    read_image_rows,
    read_map,
    read_mask,
    rows_dtype,
    write_map,
)
from blmm.io.tables import read_labels, read_matrix, read_path_list, resolve_path

__all__ = [
    "FORMATS",
    "SUPPORTED_SUFFIXES",
    "ImageError",
    "ImageSpace",
    "InputError",
    "image_space",
    "map_path",
    "mismatch_reason",
    "read_image",
    "read_image_rows",
    "read_labels",
    "read_map",
    "read_mask",
    "read_matrix",
    "read_path_list",
    "resolve_path",
    "rows_dtype",
    "write_map",
]

"""Images as the ``Y`` of ``blmm.fit_lmm``, and maps written back into their space: ``load_images``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from blmm.errors import ImageError
from blmm.io.images import ImageSpace, image_space, read_image_rows, read_mask, write_map


@dataclass(frozen=True, eq=False)
class ImageData:
    """``Y`` (n images x v voxels, float64, NaN = missing) read from image files, and the
    space to write per-voxel results back into.

    ``voxels`` are the flat indices (C order over the image grid, or vertex numbers) of Y's
    columns: all voxels, or those inside the mask ``load_images`` was given.
    """

    Y: np.ndarray
    space: ImageSpace
    voxels: np.ndarray
    paths: tuple[Path, ...]

    @property
    def n_voxels(self) -> int:
        """Columns of Y (voxels or vertices analysed)."""
        return int(self.voxels.size)

    def to_space(self, values: np.ndarray) -> np.ndarray:
        """Per-voxel values, (v,) or (v, k) in Y's column order, placed on the whole grid:
        (n_voxels_of_the_image, k), NaN outside the mask."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape[0] != self.voxels.size:
            raise ValueError(f"{values.shape[0]} values for the {self.voxels.size} voxels of Y")
        full = np.full((self.space.n_voxels,) + values.shape[1:], np.nan)
        full[self.voxels] = values
        return full

    def save_map(self, outdir: str | os.PathLike, name: str, values: np.ndarray,
                 volume_names: Sequence[str] | None = None) -> Path:
        """Write per-voxel ``values`` ((v,) or (v, k), in Y's column order) as ``outdir/name``
        in the images' format (same grid, affine or vertices), NaN outside the mask.  Returns
        the file written, e.g. ``out/age_t.nii.gz``.

        Example::

            images.save_map("out", "age_t", result.t[0].stat)
        """
        return write_map(outdir, name, self.to_space(values), self.space, volume_names=volume_names)


def load_images(paths: Sequence[str | os.PathLike], mask: str | os.PathLike | np.ndarray | None = None,
                zero_is_missing: bool = True) -> ImageData:
    """Read one image per path into ``Y`` (n x v, NaN = missing) for ``blmm.fit_lmm``.

    ``mask``: an image file (non-zero, finite values are in), a boolean array over the grid,
    or None for every voxel.  Non-finite values are missing; so are zeros when
    ``zero_is_missing`` (True, as in the inputs YAML: upstream's convention for values outside
    the brain).  Every image must share the first one's grid (NIfTI, GIfTI, CIFTI, MGH or .dat
    of one format and size).

    Example::

        images = blmm.load_images(sorted(glob.glob("data/sub-*_thickness.nii.gz")), mask="mask.nii.gz")
        fit = blmm.fit_lmm(images.Y, X, [subject])
        images.save_map("out", "beta", fit.beta, volume_names=["(Intercept)", "age"])
    """
    files = [Path(path) for path in paths]
    if not files:
        raise ImageError("load_images: no image paths given")
    space = image_space(files[0])
    if mask is None:
        voxels = np.arange(space.n_voxels)
    else:
        inside = read_mask(mask, space) if isinstance(mask, (str, os.PathLike)) else np.asarray(mask, bool).ravel()
        if inside.size != space.n_voxels:
            raise ImageError(f"load_images: the mask has {inside.size} voxels, the images {space.n_voxels}")
        voxels = np.flatnonzero(inside)
    Y = np.empty((len(files), voxels.size))
    read_image_rows(files, space, voxels, Y)
    Y[~np.isfinite(Y)] = np.nan
    if zero_is_missing:
        Y[Y == 0] = np.nan
    return ImageData(Y, space, voxels, tuple(files))

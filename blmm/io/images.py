"""Brain images in and out, through nibabel.

One analysis "space" is the grid of the first input image: a volume (NIfTI, MGH) or a
list of vertices / grayordinates (GIfTI, CIFTI dscalar, upstream's raw ``.dat``).
Inside blmm every image is a flat float vector over that space, in C order of the
spatial dims; every output map is an (n_voxels, k) array written back in the input's
format, so results open in the same tools as the inputs.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import cifti2, gifti

from blmm.errors import ImageError

FORMATS = ("nifti", "gifti", "cifti", "mgh", "dat")

# Longest suffix first: ".dscalar.nii" must win over ".nii", ".func.gii" over ".gii".
_SUFFIX_FORMATS = (
    (".dscalar.nii", "cifti"),
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".func.gii", "gifti"),
    (".shape.gii", "gifti"),
    (".gii", "gifti"),
    (".mgz", "mgh"),
    (".mgh", "mgh"),
    (".dat", "dat"),
)
SUPPORTED_SUFFIXES = tuple(suffix for suffix, _ in _SUFFIX_FORMATS)

_OUTPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.int32))
_GIFTI_GEOMETRY_INTENTS = (
    nib.nifti1.intent_codes.code["NIFTI_INTENT_POINTSET"],
    nib.nifti1.intent_codes.code["NIFTI_INTENT_TRIANGLE"],
)


@dataclass(frozen=True, eq=False)
class ImageSpace:
    """The analysis grid plus what is needed to write maps in the input's format."""

    format: str  # one of FORMATS
    shape: tuple[int, ...]  # spatial shape; (N,) for surfaces
    extension: str  # suffix outputs get, e.g. ".nii.gz", ".dscalar.nii", ".func.gii"
    affine: np.ndarray | None = None  # NIfTI / MGH voxel-to-world
    header: Any = None  # nibabel header copy (NIfTI-1/2, MGH; CIFTI's NIfTI-2 header)
    nifti_version: int | None = None  # 1 or 2 for NIfTI
    brain_models: Any = None  # CIFTI BrainModelAxis (the grayordinates)
    gifti_meta: dict[str, str] | None = None  # GIfTI file-level metadata
    gifti_array_meta: dict[str, str] | None = None  # metadata of the first GIfTI data array
    n_volumes: int = 1  # maps held in the file the space was read from
    source: Path | None = None  # the file the space was read from

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def describe(self) -> str:
        """Short human description, e.g. 'NIfTI 91x109x91' or 'GIfTI, 32492 vertices'."""
        if self.format in ("nifti", "mgh"):
            kind = f"NIfTI-{self.nifti_version}" if self.format == "nifti" else "MGH"
            text = f"{kind} {'x'.join(str(d) for d in self.shape)}"
        elif self.format == "cifti":
            text = f"CIFTI, {self.n_voxels} grayordinates"
        elif self.format == "gifti":
            text = f"GIfTI, {self.n_voxels} vertices"
        else:
            text = f".dat, {self.n_voxels} values"
        if self.n_volumes != 1:
            text += f", {self.n_volumes} volumes"
        return text


def _suffix_and_format(path: Path) -> tuple[str, str]:
    name = path.name.lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return suffix, fmt
    raise ImageError(
        f"{path}: unsupported image type; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


_COMPRESSED_SUFFIXES = (".gz", ".mgz")


def _truncation(path: Path, offset: int, shape: tuple[int, ...], dtype: Any) -> str | None:
    """Why an uncompressed image file is shorter than its header says (None when it is not)."""
    if path.name.lower().endswith(_COMPRESSED_SUFFIXES):
        return None  # the size of the data is only known by decompressing it (read time)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    expected = int(offset) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size >= expected:
        return None
    return (f"{path}: truncated: the header says {'x'.join(str(d) for d in shape)} {np.dtype(dtype).name} "
            f"values from byte {int(offset)} ({expected} bytes in all), but the file has {size} bytes")


def _check_complete(path: Path, image: Any) -> None:
    """ImageError when the loaded (lazy) image's file is shorter than its header says."""
    proxy = getattr(image, "dataobj", None)
    offset = getattr(proxy, "offset", None)
    if offset is None or not hasattr(proxy, "shape") or not hasattr(proxy, "dtype"):
        return
    problem = _truncation(path, offset, tuple(proxy.shape), proxy.dtype)
    if problem is not None:
        raise ImageError(problem)


def _nib_load(path: Path) -> Any:
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise ImageError(f"{path}: cannot be read as an image, the file may be truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None


def _open(path: str | os.PathLike) -> tuple[ImageSpace, Any]:
    """The file's own space and the loaded (lazy) nibabel image (None for .dat)."""
    path = Path(path)
    suffix, fmt = _suffix_and_format(path)
    if fmt == "dat":
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"{path}: file not found") from None
        if size == 0 or size % 4:
            raise ImageError(
                f"{path}: a .dat image must hold float32 values (4 bytes each), found {size} bytes"
            )
        return ImageSpace("dat", (size // 4,), ".dat", source=path), None

    image = _nib_load(path)
    _check_complete(path, image)
    if isinstance(image, cifti2.Cifti2Image):
        return _cifti_space(path, image), image
    if isinstance(image, nib.Nifti1Image):  # also NIfTI-2 (a subclass)
        full_shape = tuple(int(d) for d in image.shape)
        spatial = full_shape[:3]
        version = 2 if isinstance(image, nib.Nifti2Image) else 1
        space = ImageSpace(
            "nifti", spatial, suffix, affine=np.array(image.affine, dtype=np.float64),
            header=image.header.copy(), nifti_version=version,
            n_volumes=int(np.prod(full_shape[3:], dtype=np.int64)), source=path,
        )
        return space, image
    if isinstance(image, nib.MGHImage):
        full_shape = tuple(int(d) for d in image.shape)
        space = ImageSpace(
            "mgh", full_shape[:3], suffix, affine=np.array(image.affine, dtype=np.float64),
            header=image.header.copy(),
            n_volumes=int(np.prod(full_shape[3:], dtype=np.int64)), source=path,
        )
        return space, image
    if isinstance(image, gifti.GiftiImage):
        return _gifti_space(path, suffix, image), image
    raise ImageError(f"{path}: nibabel read it as {type(image).__name__}, which blmm does not handle")


def _cifti_space(path: Path, image: Any) -> ImageSpace:
    try:
        brain_models = image.header.get_axis(1)
    except Exception as err:
        raise ImageError(f"{path}: CIFTI header has no usable column axis ({err})") from None
    if not isinstance(brain_models, cifti2.BrainModelAxis):
        raise ImageError(
            f"{path}: CIFTI columns are a {type(brain_models).__name__}; "
            "expected dense data over grayordinates (e.g. a .dscalar.nii)"
        )
    return ImageSpace(
        "cifti", (len(brain_models),), ".dscalar.nii", header=image.nifti_header.copy(),
        nifti_version=2, brain_models=brain_models, n_volumes=int(image.shape[0]), source=path,
    )


def _gifti_arrays(path: Path, image: Any) -> list[np.ndarray]:
    """Each data array as (N, columns)."""
    arrays = []
    for index, darray in enumerate(image.darrays):
        if darray.intent in _GIFTI_GEOMETRY_INTENTS:
            raise ImageError(
                f"{path}: data array {index + 1} is surface geometry (points/triangles); "
                "expected a func/shape GIfTI of per-vertex values"
            )
        data = np.asarray(darray.data)
        if data.ndim == 1:
            data = data[:, None]
        elif data.ndim != 2:
            raise ImageError(f"{path}: data array {index + 1} has shape {data.shape}; expected (vertices,)")
        arrays.append(data)
    if not arrays:
        raise ImageError(f"{path}: GIfTI file has no data arrays")
    counts = {array.shape[0] for array in arrays}
    if len(counts) > 1:
        raise ImageError(f"{path}: GIfTI data arrays have different vertex counts {sorted(counts)}")
    return arrays


def _gifti_space(path: Path, suffix: str, image: Any) -> ImageSpace:
    arrays = _gifti_arrays(path, image)
    return ImageSpace(
        "gifti", (arrays[0].shape[0],), suffix,
        gifti_meta=dict(image.meta), gifti_array_meta=dict(image.darrays[0].meta),
        n_volumes=int(sum(array.shape[1] for array in arrays)), source=path,
    )


_CIFTI_INTENTS = range(3000, 3100)  # NIFTI_INTENT_CONNECTIVITY_* codes


def _nifti_space_from_header(path: Path, suffix: str) -> ImageSpace | None:
    """NIfTI space from the first bytes of the file; None when nib.load must decide.

    nib.load costs ~1 ms per file; this is ~5x faster, which matters when validating
    tens of thousands of inputs.  CIFTI files and anything unusual go the slow way.
    """
    try:
        # nibabel's opener decompresses; a plain file opens ~10x faster without it
        with (open(path, "rb") if suffix == ".nii" else nib.openers.ImageOpener(str(path))) as handle:
            start = handle.read(4)
            handle.seek(0)
            if len(start) < 4:
                return None
            size = int.from_bytes(start, "little")
            swapped = int.from_bytes(start, "big")
            if 540 in (size, swapped):
                header_class = nib.Nifti2Header
            elif 348 in (size, swapped):
                header_class = nib.Nifti1Header
            else:
                return None
            raw = handle.read(header_class.sizeof_hdr + 4)  # the header and its extension flag
            known = _SPACE_BY_HEADER_BYTES.get((suffix, raw))
            if known is not None:  # the same bytes as an image already parsed: the same space
                space, offset, shape, dtype = known
                problem = _truncation(path, offset, shape, dtype)
                if problem is not None:
                    raise ImageError(problem)
                return dataclasses.replace(space, source=path)
            handle.seek(0)
            header = header_class.from_fileobj(handle, check=False)
    except ImageError:
        raise
    except Exception:
        return None
    if header["magic"].item() not in (b"n+1", b"n+2") or int(header["intent_code"]) in _CIFTI_INTENTS:
        return None
    problem = _truncation(path, header.get_data_offset(), header.get_data_shape(), header.get_data_dtype())
    if problem is not None:
        raise ImageError(problem)
    offset, data_dtype = header.get_data_offset(), header.get_data_dtype()
    # As nib.load leaves its header: scaling lives in the data proxy, offset set on save.
    header.set_slope_inter(None, None)
    header["vox_offset"] = 0
    full_shape = tuple(int(d) for d in header.get_data_shape())
    space = ImageSpace(
        "nifti", full_shape[:3], suffix, affine=np.array(header.get_best_affine(), dtype=np.float64),
        header=header, nifti_version=2 if header_class is nib.Nifti2Header else 1,
        n_volumes=int(np.prod(full_shape[3:], dtype=np.int64)), source=path,
    )
    if len(_SPACE_BY_HEADER_BYTES) < 16:
        _SPACE_BY_HEADER_BYTES[suffix, raw] = (space, offset, full_shape, data_dtype)
    return space


# (extension, header bytes) -> (space, data offset, shape, dtype) of a NIfTI file already parsed: checking
# 10,000 inputs that share one header then parses it once (~0.3 ms a file otherwise)
_SPACE_BY_HEADER_BYTES: dict[bytes, tuple] = {}


def image_space(path: str | os.PathLike) -> ImageSpace:
    """The space of an image file, from its header only (GIfTI files are parsed whole)."""
    path = Path(path)
    suffix, fmt = _suffix_and_format(path)
    if fmt == "nifti" and path.is_file():
        space = _nifti_space_from_header(path, suffix)
        if space is not None:
            return space
    space, _ = _open(path)
    return space


def all_laid_out_as(paths: Sequence[str | os.PathLike], first: str | os.PathLike) -> bool:
    """Every path an uncompressed NIfTI-1 ``.nii`` whose header bytes (and extension flag) equal
    ``first``'s, a file of one image, and that holds all its data: then each has ``first``'s space, as
    `image_space` finds it for the same bytes, by ~10 us a file against ~50.  False where any is not (or
    ``first`` is not such a file): the caller then checks image by image, naming each problem."""
    if not all(_plain_nii(p) for p in [first, *paths]):
        return False
    try:
        space = image_space(first)  # parses first's header and remembers its bytes
        with open(first, "rb") as fh:
            head = fh.read(_NIFTI1_DATA_OFFSET)
    except (ImageError, OSError):
        return False
    known = _SPACE_BY_HEADER_BYTES.get((".nii", head))  # NIfTI-2's 544 bytes never match
    if known is None or space.format != "nifti" or space.n_volumes != 1:
        return False
    _, offset, shape, dtype = known
    end = int(offset) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        for path in paths:
            with open(path, "rb", buffering=0) as fh:
                if fh.read(_NIFTI1_DATA_OFFSET) != head or os.fstat(fh.fileno()).st_size < end:
                    return False
    except OSError:
        return False
    return True


def _plain_nii(path: str | os.PathLike) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(".nii") and not name.endswith(".dscalar.nii")


def mismatch_reason(found: ImageSpace, expected: ImageSpace) -> str | None:
    """Why an image with space ``found`` cannot be used in ``expected`` (None if it can)."""
    same = found.shape == expected.shape
    # MGH surfaces are (N, 1, 1) while GIfTI / CIFTI are (N,): singleton dims don't matter.
    squeezed = tuple(d for d in found.shape if d != 1) == tuple(d for d in expected.shape if d != 1)
    headerless = "dat" in (found.format, expected.format)
    if not (same or squeezed or (headerless and found.n_voxels == expected.n_voxels)):
        return f"found {found.describe()}, expected {expected.describe()}"
    if found.format == expected.format == "cifti" and found.brain_models != expected.brain_models:
        return "found a CIFTI file with different grayordinates (brain-model axis) than expected"
    return None


def _expected_text(expected: ImageSpace) -> str:
    return f" (analysis space taken from {expected.source})" if expected.source else ""


def _check_space(path: Path, found: ImageSpace, expected: ImageSpace) -> None:
    reason = mismatch_reason(found, expected)
    if reason is not None:
        raise ImageError(f"{path}: does not match the analysis space: {reason}{_expected_text(expected)}")


def _native(array: np.ndarray) -> np.ndarray:
    """Native byte order (MGH data is big-endian on disk)."""
    if array.dtype.byteorder not in ("=", "|"):
        return array.astype(array.dtype.newbyteorder("="))
    return array


def _data_matrix(path: Path, space: ImageSpace, image: Any, dat_dtype: np.dtype | None = None,
                 dat_n_voxels: int | None = None) -> np.ndarray:
    """The file's data as (n_voxels, n_volumes), in its stored dtype (scaled NIfTI: float)."""
    if space.format == "dat":
        dtype = np.dtype(np.float32 if dat_dtype is None else dat_dtype)
        values = np.fromfile(path, dtype=dtype)
        n_voxels = values.size if dat_n_voxels is None else int(dat_n_voxels)
        if n_voxels <= 0 or values.size % n_voxels:
            raise ImageError(
                f"{path}: {values.size} {dtype.name} values cannot be split into maps of "
                f"{n_voxels} voxels"
            )
        return values.reshape(n_voxels, values.size // n_voxels)
    if space.format == "gifti":
        arrays = _gifti_arrays(path, image)
        return _native(arrays[0] if len(arrays) == 1 else np.column_stack(arrays))
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # truncated or corrupt data (zlib, EOF, short reads)
        raise ImageError(f"{path}: its data cannot be read, the file is truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None
    if space.format == "cifti":
        return _native(np.ascontiguousarray(data.T))
    # NIfTI / MGH: C-order ravel of the spatial dims, volumes last.
    return _native(data.reshape(space.shape + (space.n_volumes,)).reshape(space.n_voxels, space.n_volumes))


def read_image(path: str | os.PathLike, space: ImageSpace | None = None,
               voxels: np.ndarray | None = None) -> np.ndarray:
    """One image as a flat float64 vector of length n_voxels (C-order ravel of spatial dims),
    or only its values at ``voxels`` (indices into that vector).

    A file must hold a single image (a singleton 4th NIfTI dim is fine).  With ``space``,
    the image must match it (shape / vertex count), otherwise ImageError.
    """
    path = Path(path)
    known = _read_known_nifti(path, voxels)
    if known is not None:
        own, values = known
        if space is not None:
            _check_space(path, own, space)
        return values
    own, image = _open(path)
    if space is not None:
        _check_space(path, own, space)
    if own.n_volumes != 1:
        raise ImageError(
            f"{path}: holds {own.n_volumes} volumes; blmm needs one image per file "
            "(split 4-D files into one file per image)"
        )
    values = _data_matrix(path, own, image)[:, 0].astype(np.float64, copy=False)
    _remember_nifti_layout(path, own, image)
    return values if voxels is None else values[voxels]


def rows_dtype(paths: Sequence[str | os.PathLike], space: ImageSpace) -> np.dtype:
    """The dtype that holds these images' values without loss: float32 where every file is a ``.dat``
    (float32 by definition), else float64.  Rows of float32 halve the memory a read writes."""
    if space.format == "dat" and all(os.fspath(p).lower().endswith(".dat") for p in paths):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def read_image_rows(paths: Sequence[str | os.PathLike], space: ImageSpace, voxels: np.ndarray | None,
                    out: np.ndarray) -> None:
    """Image i of ``paths`` into ``out[i]``: its values at ``voxels`` (all where None), each file
    checked against ``space`` as `read_image` checks it.  ``out`` is float64, or float32 where
    `rows_dtype` says so.  A ``.dat`` of the space's size is read straight into its row (no
    per-file arrays: ~10 us a file against ~40 us); any other file, or any problem, takes `read_image`,
    which reads it or says what is wrong with it."""
    if out.shape[0] != len(paths):
        raise ValueError(f"read_image_rows: {len(paths)} paths for {out.shape[0]} rows")
    size = 4 * space.n_voxels
    whole = voxels is None or (voxels.size == space.n_voxels and bool(np.all(voxels == np.arange(voxels.size))))
    raw = space.format == "dat" and out.dtype in (np.float32, np.float64)
    direct = raw and whole and out.dtype == np.float32  # the file's bytes are the row's
    scratch = np.empty(space.n_voxels, np.float32) if raw and not direct else None
    for i, path in enumerate(paths):
        if raw and os.fspath(path).lower().endswith(".dat"):
            if _read_dat_into(path, out[i] if direct else scratch, size):
                if not direct:
                    out[i] = scratch if whole else scratch[voxels]
                continue
        out[i] = read_image(path, space, None if whole else voxels)


def _read_dat_into(path: str | os.PathLike, target: np.ndarray, size: int) -> bool:
    """Read a ``.dat`` of exactly ``size`` bytes into ``target`` (float32); False where it cannot
    (missing, another size, a short read): the caller's `read_image` then says why."""
    try:
        with open(path, "rb", buffering=0) as fh:
            if os.fstat(fh.fileno()).st_size != size:
                return False
            view = memoryview(target).cast("B")
            filled = 0
            while filled < size:
                got = fh.readinto(view[filled:])
                if not got:
                    return False
                filled += got
    except OSError:
        return False
    return True


# An uncompressed NIfTI-1 file with no extension holds its header in its first 352 bytes and
# its data right after. nib.load spends ~1.5 ms a file parsing and checking that header, in
# Python (one thread at a time); a file whose 352 bytes equal those of a file nibabel already
# parsed holds its data in the same way, so its data are read with that parse (`_read_known_nifti`).
_NIFTI1_DATA_OFFSET = 352
_KNOWN_NIFTI_LAYOUTS: dict[bytes, tuple[ImageSpace, tuple]] = {}
_MAX_KNOWN_LAYOUTS = 16


def _remember_nifti_layout(path: Path, own: ImageSpace, image: Any) -> None:
    """After nibabel read ``path``: remember its header bytes when they alone say where and how
    its data lie (NIfTI-1, uncompressed, no extension, no scaling, one volume)."""
    if (own.format != "nifti" or own.nifti_version != 1 or path.suffix != ".nii" or own.n_volumes != 1
            or len(_KNOWN_NIFTI_LAYOUTS) >= _MAX_KNOWN_LAYOUTS):
        return
    proxy = getattr(image, "dataobj", None)
    if (getattr(proxy, "offset", None) != _NIFTI1_DATA_OFFSET or getattr(proxy, "order", "F") != "F"
            or not getattr(proxy, "is_proxy", False)):
        return
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if not (slope == 1.0 and inter == 0.0):
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(_NIFTI1_DATA_OFFSET)
    except OSError:
        return
    if len(head) == _NIFTI1_DATA_OFFSET:  # ArrayProxy's spec: (shape, dtype, offset, slope, inter)
        spec = (tuple(int(d) for d in proxy.shape), np.dtype(proxy.dtype), _NIFTI1_DATA_OFFSET, 1.0, 0.0)
        _KNOWN_NIFTI_LAYOUTS[head] = (own, spec)


def _read_known_nifti(path: Path, voxels: np.ndarray | None = None) -> tuple[ImageSpace, np.ndarray] | None:
    """(space, float64 values, all or at ``voxels``) of a NIfTI file laid out as one nibabel
    already read; else None.  Its data are read straight after the header (~15 us a file against
    ~100 us through nibabel's ArrayProxy, which holds the GIL: the read stage's threads then wait)."""
    if not _KNOWN_NIFTI_LAYOUTS or path.suffix != ".nii" or path.name.endswith(".dscalar.nii"):
        return None
    try:
        with open(path, "rb") as fh:
            layout = _KNOWN_NIFTI_LAYOUTS.get(fh.read(_NIFTI1_DATA_OFFSET))
            if layout is None:
                return None
            own, (shape, dtype, _, _, _) = layout
            data = np.empty(int(np.prod(shape, dtype=np.int64)), dtype)  # the file's order: Fortran
            filled = fh.readinto(data)
    except OSError:
        return None  # nibabel says what is wrong
    if filled != data.nbytes:
        raise ImageError(_truncation(path, _NIFTI1_DATA_OFFSET, shape, dtype)
                         or f"{path}: truncated: {filled} of {data.nbytes} bytes of data read")
    if voxels is not None:  # gather from the file's own (Fortran) order: no copy of the whole volume
        return own, data[_fortran_index(voxels, shape)].astype(np.float64)
    values = np.empty(shape)  # float64, C order: the C-order ravel _data_matrix makes
    values[...] = data.reshape(shape, order="F")
    return own, values.reshape(-1)


_FORTRAN_INDEX: tuple = (None, None, None)  # (voxels, shape, their Fortran-order indices): one run's voxels


def _fortran_index(voxels: np.ndarray, shape: tuple) -> np.ndarray:
    """Fortran-order flat indices of C-order flat ``voxels`` in ``shape`` (remembered for the same array)."""
    global _FORTRAN_INDEX
    held, held_shape, index = _FORTRAN_INDEX
    if held is not voxels or held_shape != shape:
        index = np.ravel_multi_index(np.unravel_index(voxels, shape), shape, order="F")
        _FORTRAN_INDEX = (voxels, shape, index)  # one tuple: threads see the old or the new, whole
    return index


def read_mask(path: str | os.PathLike, space: ImageSpace, voxels: np.ndarray | None = None) -> np.ndarray:
    """Boolean (n_voxels,) mask, or its values at ``voxels``: finite non-zero values are in the mask."""
    values = read_image(path, space, voxels)
    return np.isfinite(values) & (values != 0)


def map_path(outdir: str | os.PathLike, name: str, space: ImageSpace) -> Path:
    """Where ``write_map`` puts the map called ``name``."""
    return Path(outdir) / f"{name}{space.extension}"


def _output_dtype(dtype: Any) -> np.dtype:
    resolved = np.dtype(dtype)
    if resolved not in _OUTPUT_DTYPES:
        raise ValueError(f"output maps are float32 or int32, got {resolved}")
    return resolved


def _prepare_data(data: Any, space: ImageSpace, dtype: np.dtype) -> np.ndarray:
    values = np.asarray(data)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != space.n_voxels:
        raise ValueError(
            f"map data must be ({space.n_voxels},) or ({space.n_voxels}, k), got {values.shape}"
        )
    if dtype.kind == "i" and values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise ValueError("an int32 map cannot hold NaN or infinite values")
        values = np.rint(values)
    return np.ascontiguousarray(values, dtype=dtype)


def _write_nifti(target: Path, values: np.ndarray, space: ImageSpace, dtype: np.dtype) -> None:
    k = values.shape[1]
    array = values.reshape(space.shape + ((k,) if k > 1 else ()))
    header = space.header.copy() if space.header is not None else None
    image_class = nib.Nifti2Image if space.nifti_version == 2 else nib.Nifti1Image
    image = image_class(array, space.affine, header)
    image.set_data_dtype(dtype)
    out_header = image.header
    out_header.set_slope_inter(None, None)  # data are stored unscaled
    out_header["cal_min"] = 0  # the input's display range says nothing about a result map
    out_header["cal_max"] = 0
    out_header.set_intent("none", (), "")
    nib.save(image, str(target))


def _write_mgh(target: Path, values: np.ndarray, space: ImageSpace, dtype: np.dtype) -> None:
    k = values.shape[1]
    array = values.reshape(space.shape + ((k,) if k > 1 else ()))
    header = space.header.copy() if space.header is not None else None
    image = nib.MGHImage(array, space.affine, header)
    image.set_data_dtype(dtype)
    nib.save(image, str(target))


def _write_gifti(target: Path, values: np.ndarray, space: ImageSpace, dtype: np.dtype,
                 volume_names: Sequence[str]) -> None:
    datatype = "NIFTI_TYPE_FLOAT32" if dtype == np.float32 else "NIFTI_TYPE_INT32"
    base_meta = dict(space.gifti_array_meta or {})
    darrays = [
        gifti.GiftiDataArray(
            np.ascontiguousarray(values[:, j]), intent="NIFTI_INTENT_NONE", datatype=datatype,
            meta=gifti.GiftiMetaData({**base_meta, "Name": volume_names[j]}),
        )
        for j in range(values.shape[1])
    ]
    image = gifti.GiftiImage(darrays=darrays, meta=gifti.GiftiMetaData(dict(space.gifti_meta or {})))
    nib.save(image, str(target))


def _write_cifti(target: Path, values: np.ndarray, space: ImageSpace, dtype: np.dtype,
                 volume_names: Sequence[str]) -> None:
    scalar_axis = cifti2.ScalarAxis(list(volume_names))
    nifti_header = space.header.copy() if space.header is not None else None
    image = cifti2.Cifti2Image(
        np.ascontiguousarray(values.T), header=(scalar_axis, space.brain_models),
        nifti_header=nifti_header,
    )
    image.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SCALARS")  # marks it a dscalar
    image.set_data_dtype(dtype)
    nib.save(image, str(target))


def write_map(outdir: str | os.PathLike, name: str, data: Any, space: ImageSpace,
              dtype: Any = "float32", volume_names: Sequence[str] | None = None) -> Path:
    """Write an (n_voxels,) or (n_voxels, k) map as ``outdir/name + ext`` in the space's format.

    ``dtype`` is float32 or int32.  ``volume_names`` name the volumes where the format
    can hold names (CIFTI scalar axis, GIfTI ``Name`` metadata); default ``name_0001``...
    The file appears atomically (written under a temporary name, then renamed), so a
    reader never sees a half-written map.  Returns the path written.
    """
    out_dtype = _output_dtype(dtype)
    values = _prepare_data(data, space, out_dtype)
    k = values.shape[1]
    if volume_names is None:
        volume_names = [f"{name}_{j + 1:04d}" for j in range(k)]
    elif len(volume_names) != k:
        raise ValueError(f"map {name!r}: {len(volume_names)} volume names for {k} volumes")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = map_path(outdir, name, space)
    # Same folder as the target so os.replace is a rename; keeps the format suffix for nibabel.
    temporary = outdir / f".{name}.{uuid.uuid4().hex[:12]}.tmp{space.extension}"
    try:
        if space.format == "nifti":
            _write_nifti(temporary, values, space, out_dtype)
        elif space.format == "mgh":
            _write_mgh(temporary, values, space, out_dtype)
        elif space.format == "gifti":
            _write_gifti(temporary, values, space, out_dtype, volume_names)
        elif space.format == "cifti":
            _write_cifti(temporary, values, space, out_dtype, volume_names)
        elif space.format == "dat":
            values.tofile(temporary)  # (N, k) C order: volume index fastest, as upstream
        else:
            raise ValueError(f"unknown image format {space.format!r}")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def read_map(path: str | os.PathLike, n_voxels: int | None = None, dtype: Any = None) -> np.ndarray:
    """A map file as (n_voxels, k), k >= 1, in its stored dtype (the inverse of write_map).

    ``.dat`` files have no header: pass ``n_voxels`` (default: the whole file is one map)
    and ``dtype`` (default float32).  For other formats ``dtype``, if given, converts.
    """
    path = Path(path)
    own, image = _open(path)
    if own.format == "dat":
        return _data_matrix(path, own, image, dat_dtype=dtype, dat_n_voxels=n_voxels)
    values = _data_matrix(path, own, image)
    if n_voxels is not None and values.shape[0] != n_voxels:
        raise ImageError(f"{path}: holds {values.shape[0]} voxels per map, expected {n_voxels}")
    return values if dtype is None else values.astype(dtype)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A volume (X, Y, Z[, k]) reoriented to RAS+ (closest canonical), as float32, and its affine."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float32),
                                                     np.asarray(affine, dtype=float)))
    return np.asanyarray(image.dataobj), image.affine

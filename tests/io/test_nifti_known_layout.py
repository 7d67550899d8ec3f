"""NIfTI files whose header bytes equal those of a file nibabel already read are read directly:
the same values, and the same errors."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

import blmm.io.images as images
from blmm.errors import ImageError
from blmm.io.images import image_space, read_image

SHAPE = (3, 4, 5)  # unequal sides: a Fortran/C order mix-up changes the values
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture(autouse=True)
def no_known_layouts():
    images._KNOWN_NIFTI_LAYOUTS.clear()
    yield
    images._KNOWN_NIFTI_LAYOUTS.clear()


def save(path, values, dtype=np.float32, slope=None):
    image = nib.Nifti1Image(np.asarray(values, dtype).reshape(SHAPE), AFFINE)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    nib.save(image, str(path))
    return path


def test_a_file_laid_out_as_a_known_one_is_read_directly_with_the_same_values(tmp_path):
    rng = np.random.default_rng(0)
    first, second = (save(tmp_path / f"img{i}.nii", rng.normal(size=60)) for i in range(2))
    space = image_space(first)
    read_image(first, space)  # through nibabel: its layout is now known
    assert len(images._KNOWN_NIFTI_LAYOUTS) == 1
    direct = images._read_known_nifti(second)
    assert direct is not None
    expected = np.asarray(nib.load(str(second)).dataobj, np.float64).reshape(-1)  # C-order ravel
    np.testing.assert_array_equal(direct[1], expected)
    np.testing.assert_array_equal(read_image(second, space), expected)


def test_a_truncated_file_with_a_known_header_is_an_image_error(tmp_path):
    first, second = (save(tmp_path / f"img{i}.nii", np.arange(60.0) + i) for i in range(2))
    read_image(first)
    os.truncate(second, second.stat().st_size - 8)
    with pytest.raises(ImageError, match="truncated"):
        read_image(second)


def test_scaled_compressed_and_other_dtype_files_go_through_nibabel(tmp_path):
    scaled = save(tmp_path / "scaled.nii", np.arange(60), dtype=np.int16, slope=0.5)
    np.testing.assert_array_equal(read_image(scaled), np.arange(60).reshape(SHAPE).reshape(-1) * 0.5)
    save(tmp_path / "gz.nii.gz", np.arange(60.0))
    read_image(tmp_path / "gz.nii.gz")
    assert images._KNOWN_NIFTI_LAYOUTS == {}
    ints = save(tmp_path / "ints.nii", np.arange(60), dtype=np.int16)
    read_image(ints)  # int16, unscaled: known, with its own dtype
    other = save(tmp_path / "ints2.nii", np.arange(60) * 2, dtype=np.int16)
    assert images._read_known_nifti(other) is not None
    np.testing.assert_array_equal(read_image(other), np.arange(60.0).reshape(SHAPE).reshape(-1) * 2)


def test_values_at_voxels_equal_the_whole_image_indexed_on_both_paths(tmp_path):
    rng = np.random.default_rng(1)
    first, second = (save(tmp_path / f"img{i}.nii", rng.normal(size=60)) for i in range(2))
    space = image_space(first)
    voxels = np.array([0, 7, 19, 23, 41, 59])
    whole_first = np.asarray(nib.load(str(first)).dataobj, np.float64).reshape(-1)
    np.testing.assert_array_equal(read_image(first, space, voxels), whole_first[voxels])  # through nibabel
    whole_second = np.asarray(nib.load(str(second)).dataobj, np.float64).reshape(-1)
    np.testing.assert_array_equal(read_image(second, space, voxels), whole_second[voxels])  # known layout
    assert images._read_known_nifti(second, voxels) is not None
    mask = save(tmp_path / "mask.nii", (np.arange(60) % 3 == 0).astype(np.float32))
    assert images.read_mask(mask, space, voxels).tolist() == [v % 3 == 0 for v in voxels.tolist()]


def test_a_big_endian_file_is_read_directly_with_its_byte_order(tmp_path):
    # the direct read takes the layout's dtype as nibabel found it, byte order included
    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        header = nib.Nifti1Header(endianness=">")
        header.set_data_dtype(np.float32)
        image = nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), AFFINE, header)
        nib.save(image, str(tmp_path / f"big{i}.nii"))
        paths.append(tmp_path / f"big{i}.nii")
    read_image(paths[0])
    (_, spec), = images._KNOWN_NIFTI_LAYOUTS.values()
    expected = np.asarray(nib.load(str(paths[1])).dataobj, np.float64).reshape(-1)
    direct = images._read_known_nifti(paths[1])
    assert direct is not None
    np.testing.assert_array_equal(direct[1], expected)
    np.testing.assert_array_equal(images._read_known_nifti(paths[1], np.array([0, 7, 59]))[1], expected[[0, 7, 59]])
    assert spec[1] == np.dtype(">f4")  # big-endian on disk, as written

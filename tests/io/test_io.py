"""blmm.io: images in every supported format and small text tables."""
from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2, gifti

from blmm.errors import ImageError, InputError
from blmm.io import images
from blmm.io.images import all_laid_out_as
from blmm.io import (
    image_space,
    map_path,
    read_image,
    read_image_rows,
    read_labels,
    read_map,
    read_mask,
    read_matrix,
    read_path_list,
    rows_dtype,
    write_map,
)

SHAPE = (3, 4, 5)
AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.5, 0, 20], [0, 0, 3.0, -30], [0, 0, 0, 1]])


def _volume(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _save_nifti(path, data, version: int = 1, affine=AFFINE):
    image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    nib.save(image_class(data, affine), str(path))
    return path


def _save_gifti(path, columns):
    darrays = [gifti.GiftiDataArray(np.asarray(c, dtype=np.float32)) for c in columns]
    meta = gifti.GiftiMetaData({"AnatomicalStructurePrimary": "CortexLeft"})
    nib.save(gifti.GiftiImage(darrays=darrays, meta=meta), str(path))
    return path


def _brain_models() -> cifti2.BrainModelAxis:
    cortex = cifti2.BrainModelAxis.from_mask(np.array([1, 1, 0, 1, 1, 1], bool), name="CortexLeft")
    thalamus = cifti2.BrainModelAxis.from_mask(np.ones((2, 1, 2), bool), affine=np.eye(4), name="thalamus_left")
    return cortex + thalamus  # 5 vertices + 4 voxels


def _save_cifti(path, rows, brain_models=None):
    brain_models = brain_models or _brain_models()
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
    names = [f"map{i}" for i in range(rows.shape[0])]
    nib.save(cifti2.Cifti2Image(rows, header=(cifti2.ScalarAxis(names), brain_models)), str(path))
    return path


# ---------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_nifti_space_and_read_image_c_order(tmp_path, suffix, version):
    data = _volume()
    path = _save_nifti(tmp_path / f"img{suffix}", data, version)
    space = image_space(path)
    assert space.format == "nifti"
    assert space.shape == SHAPE and space.n_voxels == 60
    assert space.nifti_version == version and space.extension == suffix
    np.testing.assert_array_equal(space.affine, AFFINE)
    values = read_image(path, space)
    assert values.dtype == np.float64 and values.shape == (60,)
    # C-order ravel: flat index i*20 + j*5 + k is voxel (i, j, k).
    assert values[1 * 20 + 2 * 5 + 3] == pytest.approx(float(data[1, 2, 3]))
    np.testing.assert_array_equal(values, data.astype(np.float64).ravel(order="C"))


@pytest.mark.parametrize("version", [1, 2])
def test_fast_header_space_matches_nibabel_load(tmp_path, version):
    image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    image = image_class(np.linspace(0, 9, 60).reshape(SHAPE), AFFINE)
    image.set_data_dtype(np.int16)
    image.header.set_qform(AFFINE, code=1)
    path = tmp_path / "in.nii.gz"
    nib.save(image, str(path))
    fast = image_space(path)
    slow, _ = images._open(path)
    assert fast.shape == slow.shape and fast.nifti_version == slow.nifti_version == version
    np.testing.assert_array_equal(fast.affine, slow.affine)
    for key in slow.header.keys():
        np.testing.assert_array_equal(fast.header[key], slow.header[key], err_msg=key)


def test_nifti_int16_with_scaling_is_read_scaled(tmp_path):
    # nibabel stores these floats as int16 plus scl_slope / scl_inter.
    data = np.linspace(-3.0, 7.0, 60).reshape(SHAPE)
    image = nib.Nifti1Image(data, AFFINE)
    image.set_data_dtype(np.int16)
    path = tmp_path / "scaled.nii"
    nib.save(image, str(path))
    loaded = nib.load(str(path))
    assert loaded.get_data_dtype() == np.int16
    assert loaded.dataobj.slope != 1.0  # scaled on disk
    values = read_image(path)
    assert values.dtype == np.float64
    np.testing.assert_allclose(values, data.ravel(), atol=1e-3)  # int16 on disk: slope 10/65535, rounding <= slope/2


def test_nifti_singleton_fourth_dim_ok_real_4d_rejected(tmp_path):
    data = _volume()
    single = _save_nifti(tmp_path / "single.nii.gz", data[..., None])
    space = image_space(single)
    assert space.shape == SHAPE and space.n_volumes == 1
    np.testing.assert_array_equal(read_image(single), data.ravel())
    multi = _save_nifti(tmp_path / "multi.nii.gz", np.stack([data, data], axis=-1))
    with pytest.raises(ImageError, match=r"multi\.nii\.gz.*2 volumes"):
        read_image(multi)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("k", [1, 4])
def test_nifti_write_read_roundtrip(tmp_path, suffix, version, k):
    template = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    source = tmp_path / f"in{suffix}"
    image = template(np.linspace(-5, 5, 60).reshape(SHAPE), AFFINE)
    image.set_data_dtype(np.int16)  # stored scaled: the template header has a slope
    image.header["cal_max"] = 999
    image.header["descrip"] = b"input"
    nib.save(image, str(source))
    space = image_space(source)
    values = np.random.default_rng(1).normal(size=(60, k))
    out = write_map(tmp_path / "out", "blmm_vox_beta", values if k > 1 else values[:, 0], space)
    assert out == tmp_path / "out" / f"blmm_vox_beta{suffix}" == map_path(tmp_path / "out", "blmm_vox_beta", space)
    loaded = nib.load(str(out))
    assert isinstance(loaded, nib.Nifti2Image if version == 2 else nib.Nifti1Image)
    assert loaded.shape == (SHAPE if k == 1 else SHAPE + (k,))
    assert loaded.get_data_dtype() == np.float32
    np.testing.assert_allclose(loaded.affine, AFFINE)
    assert nib.load(str(source)).dataobj.slope != 1.0
    assert (loaded.dataobj.slope, loaded.dataobj.inter) == (1.0, 0.0)  # stored unscaled
    assert loaded.header["cal_max"] == 0
    back = read_map(out)
    assert back.shape == (60, k) and back.dtype == np.float32
    np.testing.assert_array_equal(back, values.astype(np.float32))
    # Voxel (i, j, l) of volume v in the file is row i*20+j*5+l, column v of the map.
    np.testing.assert_array_equal(np.asarray(loaded.dataobj).reshape(SHAPE + (k,))[2, 1, 4], back[2 * 20 + 1 * 5 + 4])


def test_nifti_int32_map(tmp_path):
    space = image_space(_save_nifti(tmp_path / "in.nii.gz", _volume()))
    counts = np.arange(60) % 7
    out = write_map(tmp_path, "blmm_vox_n", counts.astype(np.float64), space, dtype="int32")
    loaded = nib.load(str(out))
    assert loaded.get_data_dtype() == np.int32
    back = read_map(out)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back[:, 0], counts)


def test_write_map_int32_rejects_nan(tmp_path):
    space = image_space(_save_nifti(tmp_path / "in.nii", _volume()))
    data = np.zeros(60)
    data[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_map(tmp_path, "bad", data, space, dtype="int32")


def test_write_map_checks_data_shape_and_dtype(tmp_path):
    space = image_space(_save_nifti(tmp_path / "in.nii", _volume()))
    with pytest.raises(ValueError, match=r"\(60,\)"):
        write_map(tmp_path, "bad", np.zeros(59), space)
    with pytest.raises(ValueError, match="float32 or int32"):
        write_map(tmp_path, "bad", np.zeros(60), space, dtype="int16")
    assert not list(tmp_path.glob("bad*"))


def test_write_map_is_atomic(tmp_path, monkeypatch):
    space = image_space(_save_nifti(tmp_path / "in.nii.gz", _volume()))
    outdir = tmp_path / "out"
    first = write_map(outdir, "blmm_vox_sigma2", np.ones(60), space)

    def broken_save(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_map(outdir, "blmm_vox_sigma2", np.full(60, 2.0), space)
    monkeypatch.undo()
    # The old map is intact and no temporary file is left behind.
    assert sorted(p.name for p in outdir.iterdir()) == ["blmm_vox_sigma2.nii.gz"]
    np.testing.assert_array_equal(read_map(first)[:, 0], np.ones(60, np.float32))


def test_nifti_shape_mismatch_names_file_and_shapes(tmp_path):
    space = image_space(_save_nifti(tmp_path / "first.nii.gz", _volume()))
    other = _save_nifti(tmp_path / "other.nii.gz", _volume(shape=(3, 4, 6)))
    with pytest.raises(ImageError) as info:
        read_image(other, space)
    message = str(info.value)
    assert "other.nii.gz" in message
    assert "3x4x6" in message and "3x4x5" in message
    assert "first.nii.gz" in message


def test_read_mask_nonzero_and_shape_checked(tmp_path):
    space = image_space(_save_nifti(tmp_path / "img.nii", _volume()))
    mask_values = np.zeros(SHAPE, np.float32)
    mask_values[0, 1, 2] = 1
    mask_values[2, 3, 4] = 0.5
    mask_values[1, 1, 1] = np.nan
    mask = read_mask(_save_nifti(tmp_path / "mask.nii.gz", mask_values), space)
    assert mask.dtype == bool and mask.sum() == 2
    assert mask[0 * 20 + 1 * 5 + 2] and mask[2 * 20 + 3 * 5 + 4] and not mask[1 * 20 + 1 * 5 + 1]
    with pytest.raises(ImageError, match="small_mask"):
        read_mask(_save_nifti(tmp_path / "small_mask.nii", np.ones((3, 4, 4), np.float32)), space)


# ---------------------------------------------------------------------------
# MGH
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
def test_mgh_roundtrip(tmp_path, suffix):
    data = _volume()
    source = tmp_path / f"in{suffix}"
    nib.save(nib.MGHImage(data, AFFINE), str(source))
    space = image_space(source)
    assert space.format == "mgh" and space.shape == SHAPE and space.extension == suffix
    np.testing.assert_array_equal(read_image(source, space), data.ravel())
    values = np.random.default_rng(2).normal(size=(60, 3))
    out = write_map(tmp_path / "out", "blmm_vox_beta", values, space)
    assert out.name == f"blmm_vox_beta{suffix}"
    loaded = nib.load(str(out))
    assert loaded.shape == SHAPE + (3,)
    np.testing.assert_allclose(loaded.affine, AFFINE)
    back = read_map(out)
    assert back.dtype == np.float32 and back.dtype.isnative
    np.testing.assert_array_equal(back, values.astype(np.float32))
    mask_out = write_map(tmp_path / "out", "blmm_vox_mask", np.arange(60) % 2, space, dtype=np.int32)
    assert nib.load(str(mask_out)).get_data_dtype() == np.dtype(">i4")
    np.testing.assert_array_equal(read_map(mask_out)[:, 0], np.arange(60) % 2)


# ---------------------------------------------------------------------------
# GIfTI
# ---------------------------------------------------------------------------


def test_gifti_roundtrip_one_array_per_volume(tmp_path):
    vertices = np.linspace(0, 1, 7)
    source = _save_gifti(tmp_path / "lh.thick.func.gii", [vertices])
    space = image_space(source)
    assert space.format == "gifti" and space.shape == (7,) and space.extension == ".func.gii"
    np.testing.assert_allclose(read_image(source, space), vertices.astype(np.float32))
    values = np.random.default_rng(3).normal(size=(7, 3))
    out = write_map(tmp_path, "blmm_vox_beta", values, space, volume_names=["b0", "b1", "b2"])
    assert out.name == "blmm_vox_beta.func.gii"
    loaded = nib.load(str(out))
    assert len(loaded.darrays) == 3
    assert [d.meta["Name"] for d in loaded.darrays] == ["b0", "b1", "b2"]
    assert all(d.data.dtype == np.float32 and d.data.shape == (7,) for d in loaded.darrays)
    assert loaded.meta["AnatomicalStructurePrimary"] == "CortexLeft"
    back = read_map(out)
    assert back.shape == (7, 3)
    np.testing.assert_array_equal(back, values.astype(np.float32))
    n_out = write_map(tmp_path, "blmm_vox_n", np.arange(7), space, dtype="int32")
    loaded_n = nib.load(str(n_out))
    assert len(loaded_n.darrays) == 1 and loaded_n.darrays[0].data.dtype == np.int32
    assert loaded_n.darrays[0].meta["Name"] == "blmm_vox_n_0001"
    np.testing.assert_array_equal(read_map(n_out)[:, 0], np.arange(7))


def test_gifti_multiple_arrays_space_and_single_image_rule(tmp_path):
    path = _save_gifti(tmp_path / "two.gii", [np.zeros(5), np.ones(5)])
    space = image_space(path)
    assert space.n_volumes == 2 and space.shape == (5,)
    np.testing.assert_array_equal(read_map(path), np.column_stack([np.zeros(5), np.ones(5)]))
    with pytest.raises(ImageError, match="two.gii.*2 volumes"):
        read_image(path)


def test_gifti_vertex_count_mismatch(tmp_path):
    space = image_space(_save_gifti(tmp_path / "a.gii", [np.zeros(7)]))
    bad = _save_gifti(tmp_path / "b.gii", [np.zeros(8)])
    with pytest.raises(ImageError) as info:
        read_image(bad, space)
    assert "b.gii" in str(info.value)
    assert "8 vertices" in str(info.value) and "7 vertices" in str(info.value)


def test_gifti_geometry_rejected(tmp_path):
    coords = gifti.GiftiDataArray(np.zeros((4, 3), np.float32), intent="NIFTI_INTENT_POINTSET")
    path = tmp_path / "lh.white.surf.gii"
    nib.save(gifti.GiftiImage(darrays=[coords]), str(path))
    with pytest.raises(ImageError, match="geometry"):
        image_space(path)


# ---------------------------------------------------------------------------
# CIFTI
# ---------------------------------------------------------------------------


def test_cifti_roundtrip_map_names_and_brain_models(tmp_path):
    source = _save_cifti(tmp_path / "sub.dscalar.nii", np.arange(9))
    space = image_space(source)
    assert space.format == "cifti" and space.shape == (9,) and space.extension == ".dscalar.nii"
    np.testing.assert_array_equal(read_image(source, space), np.arange(9.0))
    values = np.random.default_rng(4).normal(size=(9, 2))
    out = write_map(tmp_path / "out", "blmm_vox_conT", values, space, volume_names=["age", "sex"])
    assert out.name == "blmm_vox_conT.dscalar.nii"
    loaded = nib.load(str(out))
    assert isinstance(loaded, cifti2.Cifti2Image)
    assert list(loaded.header.get_axis(0).name) == ["age", "sex"]
    assert loaded.header.get_axis(1) == _brain_models()
    assert nib.Nifti2Header.from_fileobj(open(out, "rb"))["intent_code"] == 3006  # dense scalar
    back = read_map(out)
    np.testing.assert_array_equal(back, values.astype(np.float32))
    default_names = write_map(tmp_path / "out", "blmm_vox_mask", np.ones(9), space, dtype="int32")
    loaded = nib.load(str(default_names))
    assert list(loaded.header.get_axis(0).name) == ["blmm_vox_mask_0001"]
    assert loaded.get_data_dtype() == np.int32


def test_cifti_checked_before_plain_nifti(tmp_path):
    # A CIFTI file named .nii (not .dscalar.nii) is still recognised as CIFTI.
    space = image_space(_save_cifti(tmp_path / "odd.nii", np.arange(9)))
    assert space.format == "cifti" and space.extension == ".dscalar.nii"


def test_cifti_grayordinate_mismatch(tmp_path):
    space = image_space(_save_cifti(tmp_path / "a.dscalar.nii", np.arange(9)))
    other_models = cifti2.BrainModelAxis.from_mask(np.ones(9, bool), name="CortexRight")
    other = _save_cifti(tmp_path / "b.dscalar.nii", np.arange(9), brain_models=other_models)
    with pytest.raises(ImageError, match="b.dscalar.nii.*grayordinates"):
        read_image(other, space)


# ---------------------------------------------------------------------------
# Upstream raw .dat
# ---------------------------------------------------------------------------


def test_dat_input_and_upstream_output_layout(tmp_path):
    n_vertices, k = 11, 3
    vertices = np.arange(n_vertices, dtype=np.float32) * 1.5
    source = tmp_path / "lh.y0.dat"
    vertices.tofile(source)
    space = image_space(source)
    assert space.format == "dat" and space.shape == (n_vertices,)
    np.testing.assert_array_equal(read_image(source, space), vertices)
    values = np.random.default_rng(5).normal(size=(n_vertices, k))
    out = write_map(tmp_path / "out", "blmm_vox_beta", values, space)
    assert out.name == "blmm_vox_beta.dat"
    assert out.stat().st_size == n_vertices * k * 4  # no header
    # Upstream layout: (N, k) C order, volume index fastest, native float32.
    np.testing.assert_array_equal(np.fromfile(out, np.float32).reshape(n_vertices, k), values.astype(np.float32))
    np.testing.assert_array_equal(read_map(out, n_voxels=n_vertices), values.astype(np.float32))
    counts = write_map(tmp_path / "out", "blmm_vox_n", np.arange(n_vertices), space, dtype="int32")
    np.testing.assert_array_equal(np.fromfile(counts, np.int32), np.arange(n_vertices))
    back = read_map(counts, n_voxels=n_vertices, dtype="int32")
    assert back.dtype == np.int32 and back.shape == (n_vertices, 1)


def test_dat_mismatch_and_bad_size(tmp_path):
    good = tmp_path / "a.dat"
    np.zeros(10, np.float32).tofile(good)
    space = image_space(good)
    bad = tmp_path / "b.dat"
    np.zeros(12, np.float32).tofile(bad)
    with pytest.raises(ImageError, match=r"b\.dat.*12 values.*10 values"):
        read_image(bad, space)
    odd = tmp_path / "odd.dat"
    odd.write_bytes(b"\0" * 7)
    with pytest.raises(ImageError, match=r"odd\.dat.*7 bytes"):
        image_space(odd)
    with pytest.raises(ImageError, match="cannot be split"):
        read_map(good, n_voxels=3)


def test_image_rows_equal_read_image_for_every_voxel_choice_and_dtype(tmp_path):
    # read_image_rows reads .dat files straight into their rows; read_image is the reference, value for value
    rng = np.random.default_rng(11)
    data = rng.normal(size=(5, 13)).astype(np.float32)
    data[1, 3], data[2, 4], data[3, 0] = np.nan, np.inf, 0.0  # read as they are: the rules come later
    paths = []
    for i, row in enumerate(data):
        row.tofile(tmp_path / f"y{i}.dat")
        paths.append(tmp_path / f"y{i}.dat")
    space = image_space(paths[0])
    assert rows_dtype(paths, space) == np.float32
    for voxels in (None, np.arange(13), np.array([0, 4, 12]), np.array([3, 1])):
        expected = np.stack([read_image(p, space, voxels) for p in paths])
        for dtype in (np.float32, np.float64):
            out = np.full((5, expected.shape[1]), -1.0, dtype)
            read_image_rows(paths, space, voxels, out)
            np.testing.assert_array_equal(out.astype(np.float64), expected)  # float32 holds .dat values exactly


def test_image_rows_of_a_wrong_file_name_it_as_read_image_does(tmp_path):
    good, short, long = tmp_path / "a.dat", tmp_path / "short.dat", tmp_path / "long.dat"
    np.ones(10, np.float32).tofile(good)
    np.ones(9, np.float32).tofile(short)
    np.ones(12, np.float32).tofile(long)
    space = image_space(good)
    for bad, found in ((short, 9), (long, 12)):
        out = np.empty((2, 10), np.float32)
        with pytest.raises(ImageError, match=rf"{bad.name}.*{found} values.*10 values"):
            read_image_rows([good, bad], space, None, out)
    with pytest.raises(ImageError, match=r"gone\.dat: file not found"):
        read_image_rows([good, tmp_path / "gone.dat"], space, None, np.empty((2, 10)))


def test_rows_dtype_is_float64_unless_every_file_is_a_dat(tmp_path):
    # a NIfTI of the same size may sit in a .dat space (upstream allowed it); its values need not be float32
    np.ones(60, np.float32).tofile(tmp_path / "a.dat")
    nifti = _save_nifti(tmp_path / "img.nii", _volume())
    dat_space = image_space(tmp_path / "a.dat")
    assert rows_dtype([tmp_path / "a.dat", nifti], dat_space) == np.float64
    assert rows_dtype([nifti], image_space(nifti)) == np.float64
    out = np.empty((2, 60))
    read_image_rows([tmp_path / "a.dat", nifti], dat_space, None, out)
    np.testing.assert_array_equal(out[1], read_image(nifti, dat_space))


def test_files_laid_out_as_the_first_by_header_bytes_and_size(tmp_path):
    # the config check's one look a file: True only where image_space would find the first's space
    data = _volume()
    paths = [_save_nifti(tmp_path / f"y{i}.nii", data + i) for i in range(4)]
    assert all_laid_out_as(paths[1:], paths[0])
    assert all(image_space(p).shape == image_space(paths[0]).shape for p in paths)
    moved = _save_nifti(tmp_path / "moved.nii", data, affine=AFFINE * 2 + np.eye(4) * -1)  # same shape, other affine
    assert not all_laid_out_as([paths[1], moved], paths[0])
    four_d = _save_nifti(tmp_path / "two.nii", np.stack([data, data], axis=-1))
    assert not all_laid_out_as([four_d], paths[0]) and not all_laid_out_as([paths[1]], four_d)
    short = _save_nifti(tmp_path / "short.nii", data)
    with open(short, "r+b") as fh:
        fh.truncate(short.stat().st_size - 4)  # the same header bytes, one value missing
    assert not all_laid_out_as([short], paths[0])
    with pytest.raises(ImageError, match=r"short\.nii: truncated"):
        image_space(short)
    assert not all_laid_out_as([tmp_path / "gone.nii"], paths[0])
    assert not all_laid_out_as([_save_nifti(tmp_path / "y.nii.gz", data)], paths[0])
    assert not all_laid_out_as(paths[1:], _save_nifti(tmp_path / "first.nii.gz", data))  # compressed: no bytes to compare


def test_dat_mask_for_a_nifti_space(tmp_path):
    # Upstream allowed a raw float32 mask for NIfTI data: same number of voxels is enough.
    space = image_space(_save_nifti(tmp_path / "img.nii", _volume()))
    mask = np.zeros(60, np.float32)
    mask[[0, 59]] = 1
    mask.tofile(tmp_path / "mask.dat")
    assert np.flatnonzero(read_mask(tmp_path / "mask.dat", space)).tolist() == [0, 59]


def test_mgh_surface_matches_gifti_vertices(tmp_path):
    space = image_space(_save_gifti(tmp_path / "lh.gii", [np.zeros(6)]))
    nib.save(nib.MGHImage(np.arange(6, dtype=np.float32).reshape(6, 1, 1), np.eye(4)), str(tmp_path / "lh.mgh"))
    np.testing.assert_array_equal(read_image(tmp_path / "lh.mgh", space), np.arange(6.0))


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(ImageError, match=r"scan\.img.*unsupported"):
        image_space(tmp_path / "scan.img")
    with pytest.raises(ImageError, match=r"absent\.nii\.gz: file not found"):
        read_image(tmp_path / "absent.nii.gz")
    corrupt = tmp_path / "corrupt.nii"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="corrupt.nii"):
        image_space(corrupt)


def test_image_space_pickles(tmp_path):
    # Spaces travel to dask workers.
    for path in (
        _save_nifti(tmp_path / "a.nii.gz", _volume()),
        _save_cifti(tmp_path / "b.dscalar.nii", np.arange(9)),
        _save_gifti(tmp_path / "c.gii", [np.zeros(4)]),
    ):
        space = pickle.loads(pickle.dumps(image_space(path)))
        out = write_map(tmp_path / "out", path.name.split(".")[0], np.ones(space.n_voxels), space)
        assert read_map(out).shape == (space.n_voxels, 1)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def test_matrix_with_header(tmp_path):
    path = tmp_path / "X.csv"
    path.write_text("intercept,age,sex\n1,23.5,0\n1,31,1\n1,40,1\n")
    values, names = read_matrix(path)
    assert names == ["intercept", "age", "sex"]
    np.testing.assert_array_equal(values, [[1, 23.5, 0], [1, 31, 1], [1, 40, 1]])
    assert values.dtype == np.float64


def test_matrix_without_header(tmp_path):
    path = tmp_path / "X.csv"
    path.write_text("1, 2.5e-1, -3\n4, 5, 6\n")
    values, names = read_matrix(path)
    assert names is None
    np.testing.assert_array_equal(values, [[1, 0.25, -3], [4, 5, 6]])


def test_single_column_with_header_is_not_data(tmp_path):
    # Upstream kept this header as a data row; we drop it.
    path = tmp_path / "Z.csv"
    path.write_text("slope\n0.5\n1.5\n2\n")
    values, names = read_matrix(path)
    assert names == ["slope"]
    assert values.shape == (3, 1)
    np.testing.assert_array_equal(values[:, 0], [0.5, 1.5, 2])


def test_single_column_without_header(tmp_path):
    path = tmp_path / "Z.txt"
    path.write_text("1\n1\n1\n\n")
    values, names = read_matrix(path)
    assert names is None and values.shape == (3, 1)


def test_tsv_and_whitespace_tables(tmp_path):
    tsv = tmp_path / "X.tsv"
    tsv.write_text("a\tb\n1\t2\n3\t4\n")
    values, names = read_matrix(tsv)
    assert names == ["a", "b"]
    np.testing.assert_array_equal(values, [[1, 2], [3, 4]])
    spaced = tmp_path / "X.txt"
    spaced.write_text("1   2  3\n4 5\t 6\n")
    values, names = read_matrix(spaced)
    assert names is None
    np.testing.assert_array_equal(values, [[1, 2, 3], [4, 5, 6]])


def test_row_names_and_trailing_delimiter_dropped(tmp_path):
    path = tmp_path / "X.csv"
    path.write_text(",x1,x2,\nsub-01,1,2,\nsub-02,3,4,\n")
    values, names = read_matrix(path)
    assert names == ["x1", "x2"]
    np.testing.assert_array_equal(values, [[1, 2], [3, 4]])


def test_empty_cells_become_nan(tmp_path):
    path = tmp_path / "X.csv"
    path.write_text("1,2\n3,\nNA,4\n")
    values, _ = read_matrix(path)
    assert np.isnan(values[1, 1]) and np.isnan(values[2, 0]) and values[2, 1] == 4


def test_non_numeric_cell_error_names_file_row_column_text(tmp_path):
    path = tmp_path / "X.csv"
    path.write_text("intercept,age\n1,23\n1,twelve\n1,40\n")
    with pytest.raises(InputError) as info:
        read_matrix(path)
    message = str(info.value)
    assert str(path) in message
    assert "row 3" in message and "column 2" in message and "(age)" in message and "'twelve'" in message


def test_non_numeric_first_data_row_without_header(tmp_path):
    path = tmp_path / "X.csv"
    path.write_text("1,abc,3\n4,5,6\n")
    with pytest.raises(InputError, match=r"row 1, column 2: 'abc'"):
        read_matrix(path)


def test_empty_and_ragged_tables(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n \n")
    with pytest.raises(InputError, match=r"empty\.csv: file is empty"):
        read_matrix(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b\n")
    with pytest.raises(InputError, match="no data rows"):
        read_matrix(header_only)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3,4,5\n")
    with pytest.raises(InputError, match="row 2 has 3 columns, expected 2"):
        read_matrix(ragged)
    with pytest.raises(InputError, match="file not found"):
        read_matrix(tmp_path / "absent.csv")


def test_labels_integer_float_and_string(tmp_path):
    ints = tmp_path / "f.csv"
    ints.write_text("site\n3\n1\n3\n2\n")
    labels = read_labels(ints)
    assert labels.dtype == np.int64 and labels.tolist() == [3, 1, 3, 2]
    strings = tmp_path / "g.csv"
    strings.write_text("family\nA\nB\nA\n")
    assert read_labels(strings, n_rows=3).tolist() == ["A", "B", "A"]
    # Without a row count, an all-text file has no header.
    assert read_labels(strings).tolist() == ["family", "A", "B", "A"]
    floats = tmp_path / "h.csv"
    floats.write_text("1.5\n2.5\n")
    assert read_labels(floats).dtype == np.float64
    two_columns = tmp_path / "two.csv"
    two_columns.write_text("1,2\n3,4\n")
    with pytest.raises(InputError, match="one column"):
        read_labels(two_columns)
    missing = tmp_path / "missing.csv"
    missing.write_text("1\nNA\n2\n")
    with pytest.raises(InputError, match="row 2: missing factor level"):
        read_labels(missing)


def test_path_list_resolves_against_list_folder(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    listing = sub / "Y.txt"
    listing.write_text("# images\nimg1.nii.gz\n\n/abs/img2.nii\n'../quoted.nii'\n")
    assert read_path_list(listing) == [sub / "img1.nii.gz", Path("/abs/img2.nii"), tmp_path / "quoted.nii"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="empty"):
        read_path_list(empty)

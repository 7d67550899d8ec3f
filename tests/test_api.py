"""The public Python API (issue 18): images in with ``load_images``, ``fit_lmm``, ``infer`` and maps
back out with ``save_map``; T and F results share ``stat``."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import blmm

GRID = (4, 5, 3)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture()
def images(tmp_path):
    """24 NIfTI images of 12 subjects (two visits each), no zeros, and a mask of about half the grid."""
    rng = np.random.default_rng(1)
    subject = np.repeat(np.arange(12), 2)
    paths = []
    for i in range(subject.size):
        data = 5 + rng.normal(0, 1, 12)[subject[i]] + rng.normal(0, 1, GRID)
        path = tmp_path / f"img{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), path)
        paths.append(path)
    inside = rng.random(GRID) < 0.5
    nib.save(nib.Nifti1Image(inside.astype(np.int16), AFFINE), tmp_path / "mask.nii.gz")
    return paths, tmp_path / "mask.nii.gz", inside, subject


def test_load_images_round_trip_equals_nibabels_data(images, tmp_path):
    paths, mask, inside, _ = images
    loaded = blmm.load_images(paths, mask=mask)
    expected = np.stack([np.asarray(nib.load(p).get_fdata()).ravel()[inside.ravel()] for p in paths])
    np.testing.assert_array_equal(loaded.Y, expected)  # float32 data read into float64: exact
    assert loaded.Y.shape == (len(paths), int(inside.sum()))
    written = loaded.save_map(tmp_path / "out", "first", loaded.Y[0])
    back = np.asarray(nib.load(written).get_fdata())
    np.testing.assert_array_equal(back[inside], expected[0])  # the float32 values written back exactly
    assert np.isnan(back[~inside]).all()
    np.testing.assert_array_equal(nib.load(written).affine, AFFINE)
    everything = blmm.load_images(paths)  # no mask: every voxel, in C order over the grid
    np.testing.assert_array_equal(everything.Y[3], np.asarray(nib.load(paths[3]).get_fdata()).ravel())


def test_zeros_are_missing_as_in_the_yaml_unless_asked_otherwise(images, tmp_path):
    paths, _, _, _ = images
    data = np.asarray(nib.load(paths[0]).get_fdata(), dtype=np.float32)
    data[0, 0, 0] = 0.0
    nib.save(nib.Nifti1Image(data, AFFINE), paths[0])
    assert np.isnan(blmm.load_images(paths).Y[0, 0])
    assert blmm.load_images(paths, zero_is_missing=False).Y[0, 0] == 0.0


def test_fit_and_infer_from_loaded_images_with_one_name_for_t_and_f(images, tmp_path):
    paths, mask, inside, subject = images
    loaded = blmm.load_images(paths, mask=mask)
    time = np.tile([0.0, 1.0], 12)
    X = np.column_stack([np.ones(subject.size), time])
    fit = blmm.fit_lmm(loaded.Y, X, [blmm.RandomFactor("subject", subject, np.ones((subject.size, 1)),
                                                       columns=("(Intercept)",))])
    result = blmm.infer(fit, [blmm.Contrast("time", [[0, 1]]), blmm.Contrast.from_vector("both", [[1, 0], [0, 1]]),
                              blmm.Contrast("intercept", [[1, 0]])])
    t, f = result["time"], result["both"]
    assert t.stat is t.t and f.stat is f.F and (t.kind, f.kind) == ("T", "F")
    assert [r.name for r in result.contrasts] == ["time", "both", "intercept"]  # as given
    # T = Lβ̂ / SE; a few float64 roundings apart at most
    np.testing.assert_allclose(t.stat, fit.beta[:, 1] / np.sqrt(fit.cov_beta[:, 1, 1]), rtol=1e-12)
    written = loaded.save_map(tmp_path / "out", "time_t", t.stat)
    back = np.asarray(nib.load(written).get_fdata())
    np.testing.assert_array_equal(back[inside], t.stat.astype(np.float32))
    with pytest.raises(KeyError, match="no contrast named 'age'; contrasts: time, both, intercept"):
        result["age"]

"""Meshes an analysis names and the layouts read from them (GIfTI, FreeSurfer, templates, CIFTI)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2, gifti

from blmm.errors import GeometryError
from blmm.geometry import surface_layout, vertex_areas, volume_layout
from blmm.io.images import ImageSpace
from blmm.io.surfaces import read_layout, read_mesh

COORDS = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0, 0]], dtype=np.float32)
FACES = np.array([[0, 1, 2], [0, 2, 3], [1, 4, 2]], dtype=np.int32)
AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]])


def _save_gifti_mesh(path, coords=COORDS, faces=FACES):
    image = gifti.GiftiImage(darrays=[
        gifti.GiftiDataArray(coords, intent="NIFTI_INTENT_POINTSET", datatype="NIFTI_TYPE_FLOAT32"),
        gifti.GiftiDataArray(faces, intent="NIFTI_INTENT_TRIANGLE", datatype="NIFTI_TYPE_INT32")])
    nib.save(image, str(path))
    return path


def test_gifti_and_freesurfer_meshes_give_the_same_layout(tmp_path):
    gii = _save_gifti_mesh(tmp_path / "lh.white.surf.gii")
    freesurfer = tmp_path / "lh.white"
    nib.freesurfer.write_geometry(str(freesurfer), COORDS.astype(float), FACES)
    space = ImageSpace("gifti", (5,), ".func.gii")
    kept = np.array([True, True, True, False, True])
    from_gifti = read_layout(space, kept, surface=gii)
    from_freesurfer = read_layout(space, kept, surface=freesurfer)
    expected = surface_layout(COORDS, FACES, 5, kept)
    for layout in (from_gifti, from_freesurfer):
        assert (layout.adjacency != expected.adjacency).nnz == 0
        np.testing.assert_allclose(layout.extents, expected.extents, rtol=1e-7)  # float32 coords
        assert layout.parts[0].name == "left"  # from the file name


def test_a_mesh_of_another_size_names_both_counts(tmp_path):
    gii = _save_gifti_mesh(tmp_path / "lh.pial.gii")
    space = ImageSpace("gifti", (6,), ".func.gii")
    with pytest.raises(GeometryError, match=r"lh.pial.gii has 5 vertices but the data \(GIfTI, 6 vertices\) has 6"):
        read_layout(space, np.ones(6, bool), surface=gii)
    with pytest.raises(GeometryError, match="need a mesh"):
        read_layout(ImageSpace("dat", (6,), ".dat"), np.ones(6, bool))
    with pytest.raises(GeometryError, match="need a mesh"):  # a FreeSurfer overlay, not a volume
        read_layout(ImageSpace("mgh", (6, 1, 1), ".mgz", affine=AFFINE), np.ones(6, bool))


def test_fsaverage5_by_name_is_its_white_surface():
    mesh = read_mesh("fsaverage5", "right")
    assert mesh.n_vertices == 10242 and "white" in mesh.name and mesh.hemi == "right"
    layout = read_layout(ImageSpace("dat", (10242,), ".dat"), np.ones(10242, bool),
                         surface="fsaverage5", hemi="rh")
    np.testing.assert_allclose(layout.extents, vertex_areas(mesh.coords, mesh.faces), rtol=1e-12)


def test_other_templates_come_from_a_freesurfer_subjects_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBJECTS_DIR", raising=False)
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    with pytest.raises(GeometryError, match="fsaverage6 is not available offline.*fsaverage5"):
        read_mesh("fsaverage6", "left")
    surf = tmp_path / "fsaverage6" / "surf"
    surf.mkdir(parents=True)
    nib.freesurfer.write_geometry(str(surf / "lh.white"), COORDS.astype(float), FACES)
    monkeypatch.setenv("SUBJECTS_DIR", str(tmp_path))
    assert read_mesh("fsaverage6", "left").n_vertices == 5
    with pytest.raises(GeometryError, match="unknown.gii not found.*fsaverage5"):
        read_mesh(tmp_path / "unknown.gii")


def test_volume_layout_from_an_image_space():
    mask = np.zeros((4, 3, 2), bool)
    mask[1:, :, 1] = True
    space = ImageSpace("nifti", (4, 3, 2), ".nii.gz", affine=AFFINE)
    layout = read_layout(space, mask.ravel(), connectivity=18)
    expected = volume_layout(mask, 18, AFFINE)
    assert (layout.adjacency != expected.adjacency).nnz == 0
    np.testing.assert_array_equal(layout.coords[0], AFFINE[:3, :3] @ [1, 0, 1] + AFFINE[:3, 3])


def test_cifti_surface_and_volume_parts_together(tmp_path):
    left = _save_gifti_mesh(tmp_path / "left.surf.gii")
    voxels = np.zeros((3, 2, 2), bool)
    voxels[:, 0, 0] = True
    voxels[2, 1, 1] = True  # touches (2, 0, 0) only diagonally (26-, not 6-connected)
    models = (cifti2.BrainModelAxis.from_surface(np.array([0, 1, 2, 4]), 5, "CortexLeft")
              + cifti2.BrainModelAxis.from_mask(voxels, affine=AFFINE, name="thalamus_left"))
    space = ImageSpace("cifti", (len(models),), ".dscalar.nii", brain_models=models)
    kept = np.ones(len(models), bool)
    kept[1] = False  # vertex 1 of the mesh is outside the analysis mask
    layout = read_layout(space, kept, connectivity=6, surface={"left": left})
    assert layout.n_elements == 7 and layout.kind == "cifti"
    # kept grayordinates: vertices 0, 2, 4 then voxels (0,0,0), (1,0,0), (2,0,0), (2,1,1)
    coo = layout.adjacency.tocoo()
    assert set(zip(coo.row.tolist(), coo.col.tolist())) == {
        (0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3), (4, 5), (5, 4)}
    np.testing.assert_allclose(layout.extents[:3], vertex_areas(COORDS, FACES)[[0, 2, 4]], rtol=1e-7)
    np.testing.assert_array_equal(layout.extents[3:], 1.0)
    np.testing.assert_array_equal(layout.coords[6], AFFINE[:3, :3] @ [2, 1, 1] + AFFINE[:3, 3])
    corner = read_layout(space, kept, connectivity=26, surface={"left": left})
    assert corner.adjacency[5, 6] == 1
    with pytest.raises(GeometryError, match="CORTEX_LEFT has 5 vertices; name its mesh"):
        read_layout(space, kept)
    with pytest.raises(GeometryError, match="has 10242 vertices but the CIFTI's left structure has 5"):
        read_layout(space, kept, surface={"left": "fsaverage5"})

"""Surface meshes and templates: FreeSurfer and GIfTI surfaces, nilearn's fsaverage5 and MNI152.

The meshes and the template ship inside the nilearn package and are read offline (nilearn
itself is never imported).  CIFTI cortex structures are mapped to their mesh vertices here
too, so the viewer and the report place grayordinates the same way.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from blmm.errors import ViewerError

HEMISPHERES = ("left", "right")
FSAVERAGE5_N_VERTICES = 10242
# Our names for fsaverage5 surfaces -> the part of nilearn's shipped file names.
FSAVERAGE5_KINDS = {
    "pial": "pial", "white": "white", "inflated": "infl", "infl": "infl",
    "sphere": "sphere", "flat": "flat",
}
MNI152_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
CIFTI_CORTICES = (("CIFTI_STRUCTURE_CORTEX_LEFT", "left"), ("CIFTI_STRUCTURE_CORTEX_RIGHT", "right"))
HEMISPHERE_WORDS = {"lh": "left", "left": "left", "rh": "right", "right": "right"}


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangle surface: vertex coordinates (N, 3) in mm and faces (M, 3) indices."""

    coords: np.ndarray
    faces: np.ndarray
    hemi: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.float32)
        faces = np.asarray(self.faces)
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise ViewerError(f"mesh coords must have shape (N, 3), got {coords.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ViewerError(f"mesh faces must have shape (M, 3), got {faces.shape}")
        if faces.size and (faces.min() < 0 or faces.max() >= len(coords)):
            raise ViewerError(
                f"mesh faces refer to vertex {int(faces.max())}, "
                f"but the mesh has {len(coords)} vertices")
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "faces", faces.astype(np.int32))

    @property
    def n_vertices(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])


def _nilearn_data_dir() -> Path:
    """nilearn's shipped data folder, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ViewerError(
            "the fsaverage5 meshes and MNI152 template come with nilearn: "
            "install the viewer extra (pip install 'blmm[viewer]')")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def normalise_hemi(hemi: str) -> str:
    aliases = {"left": "left", "lh": "left", "l": "left", "right": "right", "rh": "right",
               "r": "right"}
    try:
        return aliases[hemi.lower()]
    except (KeyError, AttributeError):
        raise ViewerError(f"hemisphere must be 'left' or 'right', got {hemi!r}") from None


def _gifti_from_file(path: Path) -> Any:
    import nibabel as nib

    if path.name.endswith(".gz"):
        # nibabel does not open gzipped GIfTI by itself.
        with gzip.open(path, "rb") as stream:
            return nib.gifti.GiftiImage.from_bytes(stream.read())
    return nib.load(path)


def _mesh_from_gifti(image: Any, path: Path, hemi: str | None) -> Mesh:
    import nibabel as nib

    pointset = nib.nifti1.intent_codes.code["NIFTI_INTENT_POINTSET"]
    triangle = nib.nifti1.intent_codes.code["NIFTI_INTENT_TRIANGLE"]
    coords = [array.data for array in image.darrays if array.intent == pointset]
    faces = [array.data for array in image.darrays if array.intent == triangle]
    if not coords or not faces:
        raise ViewerError(f"{path}: GIfTI file has no surface (needs a pointset and a "
                          "triangle array); is it a data file rather than a mesh?")
    return Mesh(coords[0], faces[0], hemi=hemi, name=path.name)


def guess_hemi(file_name: str) -> str | None:
    lowered = file_name.lower()
    if lowered.startswith("lh.") or "left" in lowered or ".l." in lowered or "_lh" in lowered:
        return "left"
    if lowered.startswith("rh.") or "right" in lowered or ".r." in lowered or "_rh" in lowered:
        return "right"
    return None


def load_surface(path: str | os.PathLike, hemi: str | None = None) -> Mesh:
    """A surface mesh from a FreeSurfer geometry file (lh.pial) or a GIfTI (.gii[.gz])."""
    surface_path = Path(path)
    if not surface_path.is_file():
        raise ViewerError(f"{surface_path}: surface file not found")
    hemi = normalise_hemi(hemi) if hemi else guess_hemi(surface_path.name)
    if surface_path.name.endswith((".gii", ".gii.gz")):
        try:
            image = _gifti_from_file(surface_path)
        except Exception as err:  # nibabel raises several types for corrupt XML
            raise ViewerError(f"{surface_path}: cannot read GIfTI surface ({err})") from None
        return _mesh_from_gifti(image, surface_path, hemi)
    import nibabel.freesurfer as freesurfer

    try:
        coords, faces = freesurfer.read_geometry(str(surface_path))
    except Exception as err:  # a non-surface file fails deep inside nibabel
        raise ViewerError(
            f"{surface_path}: not a FreeSurfer surface or GIfTI mesh ({err})") from None
    return Mesh(coords, faces, hemi=hemi, name=surface_path.name)


def fsaverage5_mesh(hemi: str = "left", kind: str = "pial") -> Mesh:
    """The fsaverage5 surface (10242 vertices) shipped with nilearn; read offline."""
    side = normalise_hemi(hemi)
    part = FSAVERAGE5_KINDS.get(kind)
    if part is None:
        raise ViewerError(
            f"unknown fsaverage5 surface {kind!r}; choose one of {', '.join(FSAVERAGE5_KINDS)}")
    path = _nilearn_data_dir() / "fsaverage5" / f"{part}_{side}.gii.gz"
    if not path.is_file():
        raise ViewerError(f"{path}: fsaverage5 mesh missing from the nilearn package")
    mesh = _mesh_from_gifti(_gifti_from_file(path), path, side)
    return Mesh(mesh.coords, mesh.faces, hemi=side, name=f"fsaverage5 {kind} ({side})")


def mni152_template() -> Any:
    """nilearn's shipped MNI152 (2009a sym) T1 template as a nibabel image; read offline."""
    import nibabel as nib

    path = _nilearn_data_dir() / MNI152_TEMPLATE_FILE
    if not path.is_file():
        raise ViewerError(f"{path}: MNI152 template missing from the nilearn package")
    return nib.load(path)


def hemisphere_from_names(*names: str) -> str | None:
    """'left' / 'right' from folder or file names such as ``design1_rh`` or ``lh/Y.txt``."""
    for name in names:
        for part in Path(str(name)).parts[::-1]:
            lowered = part.lower()
            for token in lowered.replace(".", "_").replace("-", "_").split("_"):
                if token in HEMISPHERE_WORDS:
                    return HEMISPHERE_WORDS[token]
    return None


def cifti_cortices(space: Any) -> Iterator[tuple[str, np.ndarray, np.ndarray, int]]:
    """(hemisphere, map rows, their mesh vertices, mesh size) of each cortex of a CIFTI space."""
    axis = space.brain_models
    for structure, hemi in CIFTI_CORTICES:
        for name, rows, model in axis.iter_structures():
            if name == structure:
                rows = np.arange(space.n_voxels)[rows]
                yield hemi, rows, np.asarray(model.vertex), int(axis.nvertices[structure])

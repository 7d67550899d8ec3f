"""Surface meshes and templates: FreeSurfer and GIfTI surfaces, nilearn's fsaverage5 and MNI152.

The meshes and the template ship inside the nilearn package and are read offline (nilearn
itself is never imported).  CIFTI cortex structures are mapped to their mesh vertices here
too, so the viewer and the report place grayordinates the same way.  `read_mesh` and
`read_layout` turn the mesh or mask an analysis names into its `blmm.geometry.SpatialLayout`.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from blmm.errors import GeometryError, ViewerError
from blmm.geometry import SpatialLayout, SurfacePiece, grayordinate_layout, surface_layout, volume_layout

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


# Template meshes by name and their vertex count per hemisphere.
TEMPLATE_MESHES = {"fsaverage": 163842, "fsaverage6": 40962, "fsaverage5": 10242}
# The surface a template name gives for adjacency and vertex areas.
TEMPLATE_AREA_SURFACE = "white"


def _freesurfer_subject_folders(name: str) -> list[Path]:
    """Where a FreeSurfer installation keeps template subject ``name`` ($SUBJECTS_DIR first)."""
    folders = []
    if os.environ.get("SUBJECTS_DIR"):
        folders.append(Path(os.environ["SUBJECTS_DIR"]) / name)
    if os.environ.get("FREESURFER_HOME"):
        folders.append(Path(os.environ["FREESURFER_HOME"]) / "subjects" / name)
    return folders


def template_mesh(name: str, hemi: str, kind: str = TEMPLATE_AREA_SURFACE) -> Mesh:
    """fsaverage, fsaverage5 or fsaverage6 read offline: fsaverage5 from nilearn's package,
    any of them from a FreeSurfer subjects folder ($SUBJECTS_DIR or $FREESURFER_HOME/subjects)."""
    side = normalise_hemi(hemi)
    if name not in TEMPLATE_MESHES:
        raise GeometryError(
            f"surface: unknown mesh name {name!r}; expected a GIfTI or FreeSurfer file, or one "
            f"of {', '.join(TEMPLATE_MESHES)}")
    prefix = "lh" if side == "left" else "rh"
    folders = _freesurfer_subject_folders(name)
    for folder in folders:
        path = folder / "surf" / f"{prefix}.{kind}"
        if path.is_file():
            mesh = load_surface(path, side)
            return Mesh(mesh.coords, mesh.faces, hemi=side, name=f"{name} {kind} ({side}, {path})")
    if name == "fsaverage5":
        return fsaverage5_mesh(side, kind)
    looked = ", ".join(str(folder / "surf" / f"{prefix}.{kind}") for folder in folders)
    raise GeometryError(
        f"surface: {name} is not available offline (nilearn ships only fsaverage5; "
        f"{'no file at ' + looked if looked else 'neither SUBJECTS_DIR nor FREESURFER_HOME is set'}); "
        f"name the mesh file instead (a GIfTI, or FreeSurfer's {prefix}.white), or use fsaverage5")


def read_mesh(spec: str | os.PathLike, hemi: str | None = None) -> Mesh:
    """The mesh an analysis names: a template name (its white surface) or a GIfTI/FreeSurfer file."""
    if str(spec) in TEMPLATE_MESHES:
        if hemi is None:
            raise GeometryError(f"surface: {spec} needs a hemisphere (left or right)")
        return template_mesh(str(spec), hemi)
    path = Path(spec)
    if not path.is_file():
        raise GeometryError(
            f"surface: {path} not found; expected a GIfTI or FreeSurfer mesh file, or one of "
            f"{', '.join(TEMPLATE_MESHES)}")
    try:
        return load_surface(path, hemi)
    except ViewerError as err:
        raise GeometryError(str(err)) from None


def read_layout(space: Any, in_mask: np.ndarray, connectivity: int = 6,
                surface: str | os.PathLike | dict[str, str | os.PathLike] | None = None,
                hemi: str | None = None) -> SpatialLayout:
    """The analysis' layout over its masked elements (``in_mask``: a boolean per voxel of ``space``).

    Element i of the layout is the i-th element of ``np.flatnonzero(in_mask)``.  CIFTI: each
    cortex on the mesh ``surface[hemisphere]`` names, its volume part with ``connectivity``
    neighbours.  GIfTI, .dat, or MGH/NIfTI with one spatial dimension: surface data on the mesh
    ``surface`` names.  Other NIfTI/MGH: a volume with ``connectivity`` neighbours.
    """
    in_mask = np.asarray(in_mask, dtype=bool)
    if in_mask.shape != (space.n_voxels,):
        raise GeometryError(
            f"analysis mask has {in_mask.size} values, the images have {space.n_voxels}")
    if space.format == "cifti":
        meshes = surface if isinstance(surface, dict) else {}
        return _cifti_layout(space, meshes, connectivity).restricted(in_mask)
    # an MGH/NIfTI of shape (N, 1, 1) holds surface data (FreeSurfer's overlays)
    one_dimensional = sum(size > 1 for size in space.shape) <= 1
    if space.format in ("gifti", "dat") or one_dimensional:
        if surface is None or isinstance(surface, dict):
            raise GeometryError(
                f"surface: {space.describe()} data need a mesh: name a GIfTI or FreeSurfer "
                f"file, or one of {', '.join(TEMPLATE_MESHES)}")
        side = hemi or hemisphere_from_names(str(surface), str(space.source or ""))
        mesh = read_mesh(surface, side)
        return surface_layout(mesh.coords, mesh.faces, space.n_voxels, in_mask,
                              name=mesh.hemi or "surface", mesh_name=f"mesh {mesh.name}",
                              data_name=f"the data ({space.describe()})")
    return volume_layout(in_mask.reshape(space.shape), connectivity, space.affine)


def _cifti_layout(space: Any, meshes: dict[str, str | os.PathLike],
                  connectivity: int) -> SpatialLayout:
    axis = space.brain_models
    pieces = []
    for structure, rows, model in axis.iter_structures():
        if model.volume_mask.any():
            continue
        hemi = dict(CIFTI_CORTICES).get(structure)
        n_vertices = int(axis.nvertices[structure])
        spec = meshes.get(hemi) if hemi else None
        if spec is None:
            raise GeometryError(
                f"surface: the CIFTI's {structure} has {n_vertices} vertices; name its mesh "
                f"(surface: {{left: ..., right: ...}}, a file or one of {', '.join(TEMPLATE_MESHES)})")
        mesh = read_mesh(spec, hemi)
        pieces.append(SurfacePiece(hemi, np.arange(space.n_voxels)[rows],
                                   np.asarray(model.vertex), n_vertices, mesh.coords,
                                   mesh.faces, mesh_name=f"mesh {mesh.name}"))
    volume = np.asarray(axis.volume_mask)
    affine = axis.affine if volume.any() else None
    return grayordinate_layout(space.n_voxels, pieces, np.flatnonzero(volume),
                               np.asarray(axis.voxel)[volume], affine, connectivity)

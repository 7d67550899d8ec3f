"""Fast tests of blmm.viewer: maps, meshes, colouring, errors, HTML and the CLI."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")

from blmm import viewer  # noqa: E402
from blmm.cli.view import view_main  # noqa: E402
from blmm.viewer import Mesh, ViewerError  # noqa: E402

N_FS5 = viewer.FSAVERAGE5_N_VERTICES

INPUTS_YML = """\
contrasts:
  - c1:
      name: age effect
      vector: [0, 1, 0]
  - c2:
      name: any group difference
      vector: [[1, 0, 0], [0, 0, 1]]
  - c3:
      name: sex effect
      vector: [0, 0, 1]
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every viewer call must work offline: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def tetrahedron(hemi: str | None = None) -> Mesh:
    coords = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    return Mesh(coords, faces, hemi=hemi)


def smooth_map(mesh: Mesh, k: int = 2) -> np.ndarray:
    """(V, k) values from -6 to 6 along y (anterior-posterior), one column per volume."""
    y = mesh.coords[:, 1]
    span = (y - y.min()) / (y.max() - y.min())
    return np.column_stack([(12 * span - 6) * (1 - 0.5 * col) for col in range(k)])


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """A small blmm output folder: fsaverage5 left-hemisphere maps in .dat and .gii."""
    folder = tmp_path / "out"
    folder.mkdir()
    mesh = viewer.fsaverage5_mesh("left")
    con_t = smooth_map(mesh, 2).astype(np.float32)
    con_t.tofile(folder / "blmm_vox_conT.dat")  # C order, (V, k), volume index fastest
    np.full(N_FS5, 40, dtype=np.int32).tofile(folder / "blmm_vox_n.dat")
    beta = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(column.astype(np.float32)) for column in smooth_map(mesh, 3).T])
    nib.save(beta, folder / "blmm_vox_beta.gii")
    (folder / "inputs.yml").write_text(INPUTS_YML)
    return folder


# ------------------------------------------------------------------------ maps


def test_find_map_accepts_bare_and_prefixed_names(outdir: Path) -> None:
    assert viewer.find_map(outdir, "beta").name == "blmm_vox_beta.gii"
    assert viewer.find_map(outdir, "blmm_vox_beta").name == "blmm_vox_beta.gii"
    assert viewer.find_map(outdir, "conT").name == "blmm_vox_conT.dat"


def test_find_map_error_lists_available_maps(outdir: Path) -> None:
    with pytest.raises(ViewerError) as caught:
        viewer.find_map(outdir, "conF")
    message = str(caught.value)
    assert "blmm_vox_conF" in message
    for name in ("beta", "conT", "n"):
        assert name in message


def test_find_map_does_not_confuse_prefixes(outdir: Path) -> None:
    np.zeros(N_FS5, dtype=np.float32).tofile(outdir / "blmm_vox_conTlp.dat")
    assert viewer.find_map(outdir, "conT").name == "blmm_vox_conT.dat"
    assert viewer.find_map(outdir, "conTlp").name == "blmm_vox_conTlp.dat"


def test_find_map_ambiguous_names_both_files(outdir: Path) -> None:
    np.zeros(N_FS5, dtype=np.float32).tofile(outdir / "blmm_vox_beta.dat")
    with pytest.raises(ViewerError, match=r"ambiguous.*blmm_vox_beta\.dat.*blmm_vox_beta\.gii"):
        viewer.find_map(outdir, "beta")


def test_load_map_reads_dat_and_gifti(outdir: Path) -> None:
    con_t = viewer.load_map(outdir, "conT", n_vertices=N_FS5)
    assert con_t.shape == (N_FS5, 2)
    np.testing.assert_allclose(con_t, smooth_map(viewer.fsaverage5_mesh("left"), 2), atol=1e-5)  # a float32 map of O(1)
    assert viewer.load_map(outdir / "blmm_vox_beta.gii").shape == (N_FS5, 3)
    counts = viewer.load_map(outdir / "blmm_vox_n.dat", n_vertices=N_FS5)
    assert counts.dtype == np.int32 and counts.shape == (N_FS5, 1) and (counts == 40).all()


def test_load_map_dat_without_vertex_count_is_a_clear_error(outdir: Path) -> None:
    with pytest.raises(ViewerError, match="n_vertices"):
        viewer.load_map(outdir, "conT")


# ---------------------------------------------------------------------- meshes


def test_fsaverage5_meshes_come_from_nilearn_offline() -> None:
    for hemi in ("left", "right"):
        for kind in ("pial", "inflated", "white"):
            mesh = viewer.fsaverage5_mesh(hemi, kind)
            assert (mesh.n_vertices, mesh.n_faces) == (N_FS5, 20480)
            assert mesh.hemi == hemi
    assert viewer.fsaverage5_mesh("left").coords[:, 0].mean() < 0 < \
        viewer.fsaverage5_mesh("right").coords[:, 0].mean()
    with pytest.raises(ViewerError, match="inflated"):
        viewer.fsaverage5_mesh("left", "smoothwm")


def test_load_surface_reads_freesurfer_and_gifti(tmp_path: Path) -> None:
    mesh = tetrahedron()
    nib.freesurfer.write_geometry(str(tmp_path / "lh.pial"), mesh.coords.astype(float),
                                  mesh.faces)
    from_freesurfer = viewer.load_surface(tmp_path / "lh.pial")
    assert from_freesurfer.n_vertices == 4 and from_freesurfer.hemi == "left"
    np.testing.assert_array_equal(from_freesurfer.faces, mesh.faces)

    gifti = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(mesh.coords, intent="NIFTI_INTENT_POINTSET"),
        nib.gifti.GiftiDataArray(mesh.faces, intent="NIFTI_INTENT_TRIANGLE")])
    nib.save(gifti, tmp_path / "rh.pial.surf.gii")
    from_gifti = viewer.load_surface(tmp_path / "rh.pial.surf.gii")
    assert from_gifti.n_vertices == 4 and from_gifti.hemi == "right"


def test_load_surface_rejects_a_data_gifti(outdir: Path) -> None:
    with pytest.raises(ViewerError, match="no surface"):
        viewer.load_surface(outdir / "blmm_vox_beta.gii")


# -------------------------------------------------------------------- surfaces


def test_figure_has_one_vertex_per_mesh_vertex(outdir: Path) -> None:
    mesh = viewer.fsaverage5_mesh("left")
    figure = viewer.plot_surface(viewer.load_map(outdir, "beta"), mesh, volume=2)
    (trace,) = figure.data
    assert trace.type == "mesh3d"
    assert len(trace.x) == len(trace.y) == len(trace.z) == mesh.n_vertices
    assert len(trace.intensity) == mesh.n_vertices
    assert len(trace.i) == mesh.n_faces


def test_both_hemispheres_side_by_side_share_one_colour_scale() -> None:
    left, right = viewer.fsaverage5_mesh("left"), viewer.fsaverage5_mesh("right")
    figure = viewer.plot_surfaces(
        {"left": (smooth_map(left), left), "right": (3 * smooth_map(right), right)}, volume=1)
    assert [trace.name for trace in figure.data] == ["left", "right"]
    assert [len(trace.x) for trace in figure.data] == [N_FS5, N_FS5]
    assert figure.data[0].scene == "scene" and figure.data[1].scene == "scene2"
    assert figure.layout.coloraxis.cmax == pytest.approx(9.0)  # 3 * 6 * 0.5, shared
    assert figure.layout.coloraxis.cmin == pytest.approx(-9.0)
    # Each hemisphere is seen from its lateral side.
    assert figure.layout.scene.camera.eye.x < 0 < figure.layout.scene2.camera.eye.x


@pytest.mark.parametrize("kind, n, spacing, titles", [
    ("scene", 1, 0.0, None), ("scene", 2, 0.0, ["left", "right"]), ("xy", 1, 0.1, None),
    ("xy", 2, 0.1, None), ("xy", 3, 0.07, ["sagittal", "", "axial"])])
def test_subplot_row_is_make_subplots_layout(kind: str, n: int, spacing: float, titles: list | None) -> None:
    """The row of subplots the figures build as one dict is plotly's own make_subplots layout,
    exactly (domains are sums of floats, compared as stored)."""
    from plotly.subplots import make_subplots

    reference = make_subplots(rows=1, cols=n, horizontal_spacing=spacing, subplot_titles=titles,
                              specs=[[{"type": kind}] * n]).to_plotly_json()["layout"]
    reference.pop("template")
    assert viewer.subplot_row(kind, n, spacing, titles) == reference


def painted_colours(figure, trace) -> list[tuple[int, int, int]]:
    """The colour the colour axis gives each vertex's intensity (hard stops honoured)."""
    import plotly.colors

    axis = figure.layout.coloraxis
    stops = [float(t) for t, _ in axis.colorscale]
    colours = [plotly.colors.unlabel_rgb(plotly.colors.convert_colors_to_same_type(c)[0][0])
               for _, c in axis.colorscale]
    positions = np.clip((np.asarray(trace.intensity) - axis.cmin) / (axis.cmax - axis.cmin),
                        0, 1)
    painted = []
    for t in positions:
        # Last stop at or below t: a band [a, grey], [b, grey] paints grey on [a, b).
        low = max(i for i, stop in enumerate(stops[:-1]) if stop <= t)
        high = low + 1
        share = 0.0 if stops[high] == stops[low] else (t - stops[low]) / (stops[high] - stops[low])
        painted.append(tuple(round(a + share * (b - a)) for a, b in
                             zip(colours[low], colours[high])))
    return painted


NEUTRAL = (200, 200, 200)


def test_threshold_leaves_sub_threshold_vertices_neutral() -> None:
    mesh = viewer.fsaverage5_mesh("left")
    values = smooth_map(mesh, 1)[:, 0]
    values[:100] = np.nan  # outside the mask
    figure = viewer.plot_surface(values, mesh, threshold=2.5)
    neutral = np.array(painted_colours(figure, figure.data[0])) == NEUTRAL
    neutral = neutral.all(axis=1)
    below = np.abs(values) < 2.5
    below_strictly = below & (np.abs(np.nan_to_num(values)) < 2.45)
    missing = np.isnan(values)
    assert below.sum() > 1000 and (~below & ~missing).sum() > 1000
    assert neutral[below_strictly].all()
    assert neutral[missing].all()
    assert not neutral[~below & ~missing].any()
    # Hover still reports the real value, including "no value" for missing vertices.
    assert np.isnan(np.asarray(figure.data[0].customdata)[:100]).all()


def test_positive_map_threshold_band_sits_at_the_bottom() -> None:
    mesh = viewer.fsaverage5_mesh("right")
    values = np.abs(smooth_map(mesh, 1)[:, 0])
    figure = viewer.plot_surface(values, mesh, threshold=1.3)
    assert figure.layout.coloraxis.cmin == 0.0
    neutral = (np.array(painted_colours(figure, figure.data[0])) == NEUTRAL).all(axis=1)
    assert neutral[values < 1.25].all()
    assert not neutral[values > 1.35].any()


@pytest.mark.parametrize("name", ["RdBu_r", "viridis", "Viridis_r", "balance", "IceFire", "Twilight_r"])
def test_named_colorscale_is_plotlys(name: str) -> None:
    """A plotly scale name (any case, ``_r`` reversed) colours as plotly's own get_colorscale says."""
    import plotly.colors

    reverse = name.endswith("_r")
    expected = plotly.colors.get_colorscale(name[:-2] if reverse else name)
    if reverse:
        expected = [[1.0 - float(t), colour] for t, colour in reversed(expected)]
    assert viewer.colour_range(np.array([-1.0, 2.0]), colorscale=name).colorscale == \
        [[float(t), colour] for t, colour in expected]


def test_unknown_colorscale_is_named() -> None:
    with pytest.raises(ViewerError, match="unknown plotly colorscale 'RdBu_rr'"):
        viewer.colour_range(np.array([-1.0, 2.0]), colorscale="RdBu_rr")


def test_vertex_count_mismatch_names_both_counts() -> None:
    with pytest.raises(ViewerError) as caught:
        viewer.plot_surface(np.zeros(N_FS5 + 7), viewer.fsaverage5_mesh("left"))
    assert f"{N_FS5 + 7}" in str(caught.value) and f"{N_FS5}" in str(caught.value)


def test_volume_out_of_range_says_the_valid_range(outdir: Path) -> None:
    mesh = viewer.fsaverage5_mesh("left")
    beta = viewer.load_map(outdir, "beta")
    with pytest.raises(ViewerError, match=r"volume 3 .*3 volumes.*valid: 0 to 2"):
        viewer.plot_surface(beta, mesh, volume=3)
    with pytest.raises(ViewerError, match=r"valid: 0 to 2"):
        viewer.plot_surface(beta, mesh, volume=-1)


def test_title_names_map_volume_and_contrast(outdir: Path) -> None:
    # c2 is an F contrast, so the second T contrast (volume 1) is c3.
    title = viewer.describe_volume("conT", 1, 2, outdir)
    assert "blmm_vox_conT" in title and "volume 1" in title
    assert "c3" in title and "sex effect" in title
    assert "any group difference" in viewer.describe_volume("blmm_vox_conF", 0, 1, outdir)
    assert "contrast" not in viewer.describe_volume("beta", 1, 3, outdir)
    assert viewer.contrast_names(outdir / "missing") == {"T": [], "F": []}


# ---------------------------------------------------------------------- volumes


def mni_volume(tmp_path: Path) -> Path:
    """A 2 mm MNI-grid NIfTI with two blobs, two volumes."""
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    i, j, k = np.indices((91, 109, 91))
    blob = 6 * np.exp(-((i - 30) ** 2 + (j - 60) ** 2 + (k - 50) ** 2) / 60.0)
    image = nib.Nifti1Image(np.stack([blob, -blob], axis=-1).astype(np.float32), affine)
    image.header.set_sform(affine, code=4)
    path = tmp_path / "blmm_vox_conT.nii.gz"
    nib.save(image, path)
    return path


def test_volume_view_has_three_slices_over_the_template(tmp_path: Path) -> None:
    figure = viewer.plot_volume(mni_volume(tmp_path), volume=1, threshold=1.0)
    assert [trace.type for trace in figure.data] == ["heatmap"] * 6  # underlay + map, x3
    assert [trace.name for trace in figure.data[1::2]] == ["sagittal", "coronal", "axial"]
    axial = np.asarray(figure.data[5].z, dtype=float)
    assert axial.shape == (109, 91)  # rows follow y, columns x
    assert np.isnan(axial).any() and np.nanmax(np.abs(axial)) >= 1.0  # sub-threshold clear
    assert np.nanmax(axial) < 0  # volume 1 is the negative blob
    assert len(figure.layout.sliders) == 3
    assert all(len(slider.steps) >= 45 for slider in figure.layout.sliders)


def test_volume_without_mni_header_or_box_gets_no_underlay() -> None:
    figure = viewer.plot_volume(np.random.default_rng(0).normal(size=(8, 9, 10)),
                                affine=np.eye(4))
    assert len(figure.data) == 3


def test_volume_index_out_of_range_for_volumes(tmp_path: Path) -> None:
    with pytest.raises(ViewerError, match="valid: 0 to 1"):
        viewer.plot_volume(mni_volume(tmp_path), volume=2)


# ------------------------------------------------------------------------ HTML


def test_html_is_self_contained(tmp_path: Path) -> None:
    mesh = viewer.fsaverage5_mesh("left")
    page = viewer.write_html(viewer.plot_surface(smooth_map(mesh), mesh), tmp_path / "p.html")
    html = page.read_text()
    assert "plotly.js v" in html and "Plotly.newPlot" in html  # the library is inline
    assert len(html) > 3_000_000
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert [p.name for p in tmp_path.iterdir()] == ["p.html"]  # no temporary left behind


# ------------------------------------------------------------------------- CLI


def test_cli_writes_a_page_with_a_descriptive_title(outdir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    page = tmp_path / "conT.html"
    assert view_main([str(outdir), "conT", "--volume", "1", "--threshold", "2",
                             "-o", str(page)]) == 0
    html = page.read_text()
    assert "sex effect" in html and "blmm_vox_conT" in html
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_messages_not_tracebacks(outdir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    page = tmp_path / "x.html"
    assert view_main([str(outdir), "conF", "-o", str(page)]) == 2
    error = capsys.readouterr().err
    assert "available maps: beta, conT, n" in error and "Traceback" not in error
    assert view_main([str(outdir), "beta", "--volume", "9", "-o", str(page)]) == 2
    assert "valid: 0 to 2" in capsys.readouterr().err
    assert view_main([str(outdir), "beta", "--surface", "nowhere/lh.pial",
                             "-o", str(page)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not page.exists()


def test_cli_both_hemispheres_from_one_map_and_from_subfolders(tmp_path: Path) -> None:
    left, right = viewer.fsaverage5_mesh("left"), viewer.fsaverage5_mesh("right")
    both = np.vstack([smooth_map(left), smooth_map(right)]).astype(np.float32)
    single = tmp_path / "single"
    single.mkdir()
    nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(c) for c in both.T]),
             single / "blmm_vox_conT.gii")
    assert view_main([str(single), "conT", "-o", str(tmp_path / "a.html")]) == 0
    assert view_main([str(single), "conT", "--hemi", "right",
                             "-o", str(tmp_path / "r.html")]) == 0
    right_page = (tmp_path / "r.html").read_text()
    assert right_page.count('"intensitymode":"vertex"') == 1 and '"name":"right"' in right_page
    split = tmp_path / "split"
    for hemi, values in (("lh", both[:N_FS5]), ("rh", both[N_FS5:])):
        (split / hemi).mkdir(parents=True)
        values.tofile(split / hemi / "blmm_vox_conT.dat")
    assert view_main([str(split), "conT", "--hemi", "both",
                             "-o", str(tmp_path / "b.html")]) == 0
    for page in ("a.html", "b.html"):
        assert (tmp_path / page).read_text().count('"intensitymode":"vertex"') == 2


def test_cli_cifti_dscalar_is_scattered_onto_both_meshes(tmp_path: Path) -> None:
    cifti2 = nib.cifti2
    keep = np.arange(0, N_FS5, 2)  # e.g. a medial-wall-free subset of vertices
    models = (cifti2.BrainModelAxis.from_surface(keep, N_FS5, "CortexLeft")
              + cifti2.BrainModelAxis.from_surface(keep, N_FS5, "CortexRight"))
    scalars = cifti2.ScalarAxis(["conT"])
    values = np.linspace(-5, 5, 2 * keep.size, dtype=np.float32)[None, :]
    header = cifti2.Cifti2Header.from_axes((scalars, models))
    nib.save(cifti2.Cifti2Image(values, header), tmp_path / "blmm_vox_conT.dscalar.nii")
    page = tmp_path / "c.html"
    assert view_main([str(tmp_path), "conT", "-o", str(page)]) == 0
    assert page.read_text().count('"intensitymode":"vertex"') == 2


def test_cli_volume_map(tmp_path: Path) -> None:
    mni_volume(tmp_path)
    page = tmp_path / "v.html"
    assert view_main([str(tmp_path), "conT", "--threshold", "1", "-o", str(page)]) == 0
    html = page.read_text()
    assert all(f'"name":"{view}"' in html for view in ("sagittal", "coronal", "axial"))
    assert '"name":"MNI152"' in html


# ----------------------------------------------------------------------- imports


def test_core_package_imports_without_plotly_or_nilearn() -> None:
    code = (
        "import sys\n"
        "sys.modules['plotly'] = None; sys.modules['nilearn'] = None\n"
        "import blmm, blmm.viewer\n"
        "try:\n"
        "    blmm.viewer.plot_surface([0.0] * 3, blmm.viewer.Mesh([[0, 0, 0], [1, 0, 0],"
        " [0, 1, 0]], [[0, 1, 2]]))\n"
        "except blmm.viewer.ViewerError as err:\n"
        "    print('viewer-error:', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert "blmm[viewer]" in result.stdout


def test_importing_blmm_viewer_does_not_import_plotly() -> None:
    code = "import sys, blmm.viewer; print('plotly' in sys.modules, 'nilearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"]


# ----------------------------------------------------------- thresholds by another map (issue 18)


def test_where_another_map_passes_colours_exactly_those_vertices(outdir: Path) -> None:
    """β where −log10 p > 3: the figure keeps β exactly where conTlp passes, NaN (grey) elsewhere."""
    lp = np.random.default_rng(3).uniform(0, 6, (N_FS5, 2)).astype(np.float32)
    lp[:50, 0] = np.nan  # not fitted: never shown
    lp.tofile(outdir / "blmm_vox_conTlp.dat")
    beta = smooth_map(viewer.fsaverage5_mesh("left"), 3).astype(np.float32)[:, 1]
    figure = viewer.map_figure(viewer.MapView(str(outdir), "beta", volume=1, where="conTlp:0>3"))
    shown = np.asarray(figure.data[0].customdata, dtype=np.float64)
    passes = np.nan_to_num(lp[:, 0], nan=-1) > 3
    assert 0 < passes.sum() < N_FS5
    np.testing.assert_array_equal(np.isnan(shown), ~passes)
    np.testing.assert_array_equal(shown[passes], beta[passes])
    neutral = (np.array(painted_colours(figure, figure.data[0])) == NEUTRAL).all(axis=1)
    np.testing.assert_array_equal(neutral, ~passes)  # hidden vertices grey, every shown one coloured
    assert "where blmm_vox_conTlp (age effect) > 3" in figure.layout.title.text
    # conT where conTlp passes: the same T contrast (volume 1 of both) without naming it
    figure = viewer.map_figure(viewer.MapView(str(outdir), "conT", volume=1, where="conTlp >= 3"))
    shown = np.asarray(figure.data[0].customdata, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(shown), ~(np.nan_to_num(lp[:, 1], nan=-1) >= 3))


def test_where_needs_a_volume_when_the_maps_do_not_match(outdir: Path, tmp_path: Path, capsys) -> None:
    np.zeros((N_FS5, 2), np.float32).tofile(outdir / "blmm_vox_conTlp.dat")
    with pytest.raises(ViewerError, match=r"--where: blmm_vox_conTlp has 2 volumes; say which, e\.g\. "
                                          r"--where 'conTlp:0>3'"):
        viewer.map_figure(viewer.MapView(str(outdir), "beta", where="conTlp>3"))
    with pytest.raises(ViewerError, match=r"expected MAP\[:VOLUME\]>VALUE"):
        viewer.map_figure(viewer.MapView(str(outdir), "beta", where="conTlp=3"))
    assert view_main([str(outdir), "beta", "--where", "conTlp:1>3", "-o", str(tmp_path / "p.html")]) == 0


def test_where_on_a_volume_hides_exactly_the_failing_voxels(tmp_path: Path) -> None:
    path = mni_volume(tmp_path)
    image = nib.load(path)
    lp = np.abs(np.asarray(image.dataobj, dtype=np.float32))  # the blobs' |T| as a stand-in for −log10 p
    nib.save(nib.Nifti1Image(lp, image.affine, image.header), tmp_path / "blmm_vox_conTlp.nii.gz")
    figure = viewer.map_figure(viewer.MapView(str(tmp_path), "conT", volume=0, where="conTlp>3"))
    expected = np.asarray(image.dataobj, dtype=np.float32)[..., 0].copy()
    expected[~(lp[..., 0] > 3)] = np.nan
    reference = viewer.plot_volume(expected, affine=image.affine)
    for ours, theirs in zip(figure.data, reference.data):
        np.testing.assert_array_equal(np.asarray(ours.z, dtype=float), np.asarray(theirs.z, dtype=float))
    assert figure.layout.sliders == reference.layout.sliders  # every slice the same

"""report.html: written at the end of every run, self-contained, and useful without plotly.

Small analyses are simulated with numpy: 40 subjects with 1-3 visits each, a random
intercept per subject and an age effect planted in a fifth of the vertices. Surface data
are raw ``.dat`` vectors of 10242 values (one fsaverage5 hemisphere); volume data a small
NIfTI grid. The browser test (marker ``browser``) opens a report in headless Chromium.
"""
from __future__ import annotations

import base64
import html
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2

from blmm.config import load_config
from blmm.pipeline import run
from blmm.report import (
    REPORT_FILE,
    contrast_text,
    figure_json,
    histogram,
    map_geometry,
    signed_projection,
    summarise_run,
    write_compare_report,
    write_report,
)

N_FS5 = 10242
SUBJECTS = 40
VOLUME_GRID = (7, 8, 6)
CONTRASTS = """\
contrasts:
  - c1:
      name: age
      vector: [0, 1, 0]
  - c2:
      name: group
      vector: [0, 0, 1]
  - c3:
      name: age or group
      vector: [[0, 1, 0], [0, 0, 1]]
"""


def simulate_analysis(root: Path, n_voxels: int = N_FS5, fmt: str = "dat", outdir: str = "out",
                      slope: bool = False, seed: int = 0) -> Path:
    """Images, tables and an inputs YAML for Y = 2 + 0.3·age·patch + b_subject + e."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 4, SUBJECTS)
    subject = np.repeat(np.arange(SUBJECTS), visits)
    n = subject.size
    age = rng.uniform(-1, 1, SUBJECTS)[subject] + np.concatenate([np.arange(k) for k in visits]) * 2.0
    group = (np.arange(SUBJECTS) % 2)[subject].astype(float)
    X = np.column_stack([np.ones(n), age, group])
    patch = np.zeros(n_voxels)
    patch[: n_voxels // 5] = 1.0
    beta = np.vstack([np.full(n_voxels, 2.0), 0.3 * patch, np.zeros(n_voxels)])
    Y = X @ beta + rng.normal(0, 0.5, (SUBJECTS, n_voxels))[subject] + rng.normal(0, 0.5, (n, n_voxels))
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for i, row in enumerate(Y.astype(np.float32)):
        if fmt == "dat":
            path = images / f"y{i:03d}.dat"
            row.tofile(path)
        else:
            path = images / f"y{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(row.reshape(VOLUME_GRID), np.diag([4.0, 4.0, 4.0, 1.0])), path)
        names.append(f"images/{path.name}")
    (root / "Y.txt").write_text("\n".join(names) + "\n")
    np.savetxt(root / "X.csv", X, delimiter=",", header="intercept,age,group", comments="")
    np.savetxt(root / "subject.csv", subject, fmt="%d", header="subject", comments="")
    np.savetxt(root / "Z.csv", np.ones((n, 1)), fmt="%d", header="intercept", comments="")
    np.savetxt(root / "Z_slope.csv", np.column_stack([np.ones(n), age]), delimiter=",",
               header="intercept,age", comments="")
    design = "Z_slope.csv" if slope else "Z.csv"
    yml = root / f"{outdir}.yml"
    yml.write_text(
        f"Y_files: Y.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        f"      design: {design}\n{CONTRASTS}outdir: {outdir}\nreport_threshold: 2\n"
        # A random slope per subject gives q = 80 > n: upstream's safeMode would drop every voxel.
        "safeMode: false\n")
    return yml


def payload(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="blmm-report-data">(.*?)</script>', page, re.S)
    assert found, "no figure data in the page"
    return json.loads(found.group(1))


def typed_length(spec: dict) -> int:
    """Number of values in a base64 typed-array spec (plotly's and the report's)."""
    return len(base64.b64decode(spec["bdata"])) // int(spec["dtype"][1])


def figure_title(figure: dict) -> str:
    title = figure["figure"]["layout"].get("title") or {}
    return title.get("text", "") if isinstance(title, dict) else str(title)


@pytest.fixture(scope="module")
def surface_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("surface")
    yml = simulate_analysis(root / "lh", outdir="out")  # "lh" in the path: the left hemisphere
    run(load_config(yml), log=lambda _: None)
    return root / "lh" / "out"


def test_pipeline_writes_a_self_contained_report(surface_run: Path) -> None:
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    page = (surface_run / REPORT_FILE).read_text()
    record = json.loads((surface_run / "blmm_run.json").read_text())
    # plotly.js once for the whole page, nothing loaded from elsewhere.
    assert page.count("plotly.js v") == 1
    assert "<script src=" not in page and "<link" not in page
    data = payload(page)
    figures = data["figures"]
    surfaces = [f for f in figures if any(f["meshes"])]
    titles = [figure_title(f) for f in surfaces]
    # The iteration map, then one map per contrast (2 T, 1 F).
    assert len(surfaces) == 4
    assert "blmm_vox_nit" in titles[0]
    for name, title in zip(("age", "group", "age or group"), titles[1:]):
        assert f"· {name} (" in title
    for figure in surfaces:
        (trace,) = figure["figure"]["data"]
        assert trace["type"] == "mesh3d" and "x" not in trace  # geometry is shared, stored once
        assert typed_length(trace["intensity"]) == N_FS5
        geometry = data["geometry"][figure["meshes"][0]]
        assert typed_length(geometry["x"]) == N_FS5
    assert list(data["geometry"]) == ["fsaverage5 pial (left)"]
    # Every contrast has its statistic and df histograms.
    histograms = [f for f in figures if f["figure"]["data"][0]["type"] == "bar"]
    assert len(histograms) == 1 + 3
    # The convergence counts of blmm_run.json are in the page.
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.split('<script type="text/javascript">')[0]))
    counts = record["counts"]
    for label, key in (("voxels in the analysis mask", "analysis_mask"), ("fitted", "fitted"),
                       ("converged (llh change and predicted gain < tol)", "converged"),
                       ("not converged (kept in the maps)", "not_converged"),
                       ("boundary fits (singular random-effects covariance)", "boundary")):
        assert re.search(rf"{re.escape(label)}\s+{counts[key]:,}\b", text), label
    assert "Y ~ intercept + age + group + (intercept | subject)" in text
    assert "−log10 p > 2" in text  # the YAML's report_threshold
    # Size: plotly.js (~4.8 MB) plus well under 2 MB of maps and geometry.
    assert len(page) < len(page.split('<script type="text/javascript">')[1].split("</script>")[0]) + 2_000_000


def test_contrast_maps_show_only_voxels_above_the_threshold(surface_run: Path) -> None:
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    figures = payload((surface_run / REPORT_FILE).read_text())["figures"]
    age = next(f for f in figures if "· age (" in figure_title(f))
    trace = age["figure"]["data"][0]
    shown = np.frombuffer(base64.b64decode(trace["customdata"]["bdata"]), np.float32)
    lp = np.fromfile(surface_run / "blmm_vox_conTlp.dat", np.float32).reshape(N_FS5, -1)[:, 0]
    conT = np.fromfile(surface_run / "blmm_vox_conT.dat", np.float32).reshape(N_FS5, -1)[:, 0]
    above = lp > 2
    assert above[: N_FS5 // 5].mean() > 0.9 and above[N_FS5 // 5:].mean() < 0.05  # the planted patch
    np.testing.assert_array_equal(shown[above], conT[above])
    assert np.isnan(shown[~above]).all()


def test_summary_reads_the_model_from_the_output_folder(surface_run: Path) -> None:
    summary = summarise_run(surface_run)
    assert (summary.n, summary.p, summary.q) == (json.loads((surface_run / "blmm_run.json").read_text())["n"],
                                                 3, SUBJECTS)
    assert summary.x_names == ["intercept", "age", "group"]
    assert [(f.name, f.q, f.levels, f.design_names) for f in summary.factors] == \
        [("subject", 1, SUBJECTS, ["intercept"])]
    assert [(c.name, c.kind, c.index) for c in summary.contrasts] == \
        [("age", "T", 0), ("group", "T", 1), ("age or group", "F", 0)]
    assert summary.threshold == 2.0
    assert contrast_text([0, -1, 2], summary.x_names) == "−age + 2·group"
    assert contrast_text([[0, 1, 0], [0, 0, 1]], summary.x_names) == "age; group"


def _table_rows(page: str, anchor: str) -> list[list[str]]:
    """The body rows (cells as text) of the tables under the heading ``anchor``, up to the next h2."""
    section = page[page.index(f'id="{anchor}"'):]
    section = section[:section.find("<h2", 1) if "<h2" in section[1:] else len(section)]
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.S)
    return [[html.unescape(c).strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)] for row in rows
            if "<td>" in row]


def _median_and_range(values: np.ndarray) -> tuple[float, float, float]:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)), float(finite.min()), float(finite.max())


def test_random_effects_table_is_lme4_varcorr_of_the_fitted_d(tmp_path: Path) -> None:
    """Issue 18: the report's random-effects table holds, per term, the median and range over the
    fitted voxels of σ² D_ii, its square root and D_ij / √(D_ii D_jj), from the maps read directly."""
    yml = simulate_analysis(tmp_path, n_voxels=300, slope=True)
    lines: list[str] = []
    run(load_config(yml), log=lines.append)
    out = tmp_path / "out"
    D = np.fromfile(out / "blmm_vox_D.dat", np.float32).reshape(300, 3).astype(np.float64)
    sigma2 = np.fromfile(out / "blmm_vox_sigma2.dat", np.float32).astype(np.float64)
    record = json.loads((out / "blmm_run.json").read_text())
    assert record["volumes"]["D"] == ["subject: intercept", "subject: intercept x age", "subject: age"]
    expected = {  # vech order: D11, D21, D22
        "intercept": sigma2 * D[:, 0], "age": sigma2 * D[:, 2], "": sigma2}
    page = write_report(out).read_text()
    rows = {(group, name): rest for group, name, *rest in _table_rows(page, "random-effects")}
    assert list(rows) == [("subject", "intercept"), ("", "age"), ("Residual", ""), ("subject", "intercept x age")]
    for key, variance in zip(list(rows)[:3], expected.values()):
        var_median, var_range, sd_median, sd_range = rows[key]
        shown = [var_median, *var_range.split(" to "), sd_median, *sd_range.split(" to ")]
        # 4 significant digits on the page; the float32 maps are far more precise than that
        np.testing.assert_allclose([float(v) for v in shown],
                                   [*_median_and_range(variance), *_median_and_range(np.sqrt(variance))], rtol=5e-4)
    correlation = D[:, 1] / np.sqrt(D[:, 0] * D[:, 2])
    corr_median, corr_range = rows[("subject", "intercept x age")]
    np.testing.assert_allclose([float(corr_median), *map(float, corr_range.split(" to "))],
                               _median_and_range(correlation), rtol=5e-4, atol=5e-4)  # 4 digits shown
    medians = {"subject: intercept": np.median(expected["intercept"]), "subject: age": np.median(expected["age"]),
               "Residual": np.median(sigma2)}
    largest = max(medians, key=medians.get)
    summary = "\n".join(lines)
    assert f"largest variance component: {largest} (median variance {medians[largest]:.4g} over 300 voxels" in summary


def block_plotly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import plotly`` fail, as in an install without the viewer extra."""
    for name in [name for name in sys.modules if name == "plotly" or name.startswith("plotly.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "plotly", None)


def test_without_plotly_the_report_has_the_numbers(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    block_plotly(monkeypatch)
    yml = simulate_analysis(tmp_path, n_voxels=300)
    run(load_config(yml), log=lambda _: None)
    page = (tmp_path / "out" / REPORT_FILE).read_text()
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert "<script" not in page
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert "pip install 'blmm[viewer]'" in text
    assert re.search(rf"converged \(llh change and predicted gain < tol\)\s+{record['counts']['converged']:,}\b", text)
    assert re.search(r"voxels with −log10 p > 2 \(one-sided, H1: Lβ > 0\)\s+\d", text)
    assert "Satterthwaite df (min, quartiles, max)" in text
    # The page needs only the output folder: rewritten with the inputs gone, it still has
    # the numbers and X's column names (blmm_run.json records them).
    for path in [*(tmp_path / "images").iterdir(), tmp_path / "X.csv"]:
        path.unlink()
    text = html.unescape(re.sub(r"<[^>]+>", " ", write_report(tmp_path / "out").read_text()))
    assert "Y ~ intercept + age + group + (intercept | subject)" in text
    assert re.search(rf"fitted\s+{record['counts']['fitted']:,}\b", text)
    # A record without names (an older run's) falls back to X's header, here gone: positional names, and why.
    record.pop("x_names")
    (tmp_path / "out" / "blmm_run.json").write_text(json.dumps(record))
    text = html.unescape(re.sub(r"<[^>]+>", " ", write_report(tmp_path / "out").read_text()))
    assert "Y ~ x1 + x2 + x3 + (intercept | subject)" in text
    assert "X has no header row (or could not be read)" in text


def test_unknown_vertex_count_gives_histograms_and_a_note(tmp_path: Path) -> None:
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    yml = simulate_analysis(tmp_path, n_voxels=500)
    run(load_config(yml), log=lambda _: None)
    page = (tmp_path / "out" / REPORT_FILE).read_text()
    figures = payload(page)["figures"]
    assert {f["figure"]["data"][0]["type"] for f in figures} == {"bar"}
    assert len(figures) == 1 + 3
    assert "no known mesh has 500 vertices" in html.unescape(page)


def test_volume_report_draws_slices(tmp_path: Path) -> None:
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    yml = simulate_analysis(tmp_path, n_voxels=int(np.prod(VOLUME_GRID)), fmt="nifti")
    run(load_config(yml), log=lambda _: None)
    page = (tmp_path / "out" / REPORT_FILE).read_text()
    figures = payload(page)["figures"]
    volumes = [f for f in figures if f["figure"]["data"][-1]["type"] == "heatmap"]
    assert len(volumes) == 1 + 3  # iterations and the three contrasts
    names = [trace["name"] for trace in volumes[1]["figure"]["data"]]
    assert names == ["fitted voxels", "sagittal", "fitted voxels", "coronal", "fitted voxels", "axial"]
    sagittal = volumes[1]["figure"]["data"][1]
    assert sagittal["z"]["shape"].replace(" ", "") == f"{VOLUME_GRID[2]},{VOLUME_GRID[1]}"  # (z, y)
    assert "volume 7×8×6 voxels" in html.unescape(page)


def test_geometry_of_surface_files(tmp_path: Path) -> None:
    pytest.importorskip("nilearn", reason="the fsaverage5 meshes come with nilearn")
    both = tmp_path / "blmm_vox_mask.dat"
    np.ones(2 * N_FS5, np.int32).tofile(both)
    geometry = map_geometry(both)
    assert [(p.hemi, p.rows[0], p.rows[-1]) for p in geometry.panels] == \
        [("left", 0, N_FS5 - 1), ("right", N_FS5, 2 * N_FS5 - 1)]
    one = tmp_path / "rh" / "blmm_vox_mask.dat"
    one.parent.mkdir()
    np.ones(N_FS5, np.int32).tofile(one)
    assert [p.hemi for p in map_geometry(one, ("design1_rh",)).panels] == ["right"]
    assert map_geometry(one).note  # no hint: drawn on the left, and the page says so
    # A CIFTI with the left cortex on fsaverage5, medial wall left out.
    vertices = np.arange(0, N_FS5, 2)
    models = cifti2.BrainModelAxis.from_surface(vertices, N_FS5, "CortexLeft")
    cifti = tmp_path / "blmm_vox_mask.dscalar.nii"
    nib.save(cifti2.Cifti2Image(np.ones((1, vertices.size), np.float32),
                                header=(cifti2.ScalarAxis(["mask"]), models)), cifti)
    (panel,) = map_geometry(cifti).panels
    assert panel.hemi == "left" and panel.mesh.n_vertices == N_FS5
    np.testing.assert_array_equal(panel.vertices, vertices)
    np.testing.assert_array_equal(panel.rows, np.arange(vertices.size))
    fs_lr = cifti2.BrainModelAxis.from_surface(np.arange(100), 32492, "CortexLeft")
    nib.save(cifti2.Cifti2Image(np.ones((1, 100), np.float32),
                                header=(cifti2.ScalarAxis(["mask"]), fs_lr)), cifti)
    geometry = map_geometry(cifti)
    assert geometry.kind == "none" and "32492" in geometry.note


def test_signed_projection_keeps_the_strongest_value() -> None:
    values = np.array([[1.0, -4.0, np.nan], [np.nan, np.nan, np.nan], [2.0, 3.0, -1.0]])
    np.testing.assert_array_equal(signed_projection(values, 1), [-4.0, np.nan, 3.0])
    np.testing.assert_array_equal(signed_projection(values, 0), [2.0, -4.0, -1.0])


def test_histogram_bins() -> None:
    counts = histogram(np.array([3.0, 3, 4, 7, np.nan]))
    assert counts["centres"].tolist() == [3, 4, 5, 6, 7] and counts["counts"].tolist() == [2, 1, 0, 0, 1]
    spread = histogram(np.linspace(0, 1, 1001), bins=10, selected=np.linspace(0, 1, 1001) > 0.5)
    assert spread["counts"].sum() == 1001 and spread["selected"].sum() == 500
    assert histogram(np.array([np.nan])) is None


def test_compare_report(surface_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    compare = pytest.importorskip("blmm.compare")
    root = surface_run.parent
    yml = simulate_analysis(root, outdir="out_slope", slope=True)  # same data, random slope on age
    run(load_config(yml), log=lambda _: None)
    result = compare.compare(surface_run, root / "out_slope", tmp_path / "lrt")
    written = write_compare_report(result.outdir)
    page = written.read_text()
    assert page.count("plotly.js v") == 1
    data = payload(page)
    (surface,) = [f for f in data["figures"] if any(f["meshes"])]
    assert typed_length(surface["figure"]["data"][0]["intensity"]) == N_FS5
    assert "blmm_vox_Chi2lp" in figure_title(surface)
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.split('<script type="text/javascript">')[0]))
    assert result.null.label in text
    assert f"tested {result.counts['tested']:,}" in re.sub(r"\s+", " ", text)


# ------------------------------------------------------------------ in a browser


from tests.present.test_viewer_browser import CAPTURE_ERRORS  # noqa: E402  (one error probe for both pages)

REPORT_PROBE = """<script>
window.__probe = {errors: [], figures: []};
""" + CAPTURE_ERRORS + """window.addEventListener('load', function () { setTimeout(function () {
  var report = window.__probe, api = window.blmmReport;
  report.webgl = !!document.createElement('canvas').getContext('webgl');
  report.count = api ? api.count : -1;
  var chain = Promise.resolve();
  for (var i = 0; api && i < api.count; i++) { (function (index) {
    chain = chain.then(function () { return api.render(index); }).then(function () {
      var gd = document.getElementById(api.figures[index].id);
      report.figures.push(gd._fullData.map(function (t) {
        return {type: t.type, n_x: t.x ? t.x.length : null,
                n_intensity: t.intensity ? t.intensity.length : null}; }));
      if (api.figures[index].webgl) { api.purge(index); }
    });
  })(i); }
  chain.catch(function (err) { report.errors.push('probe: ' + err); }).then(function () {
    report.resources = performance.getEntriesByType('resource').map(function (r) { return r.name; });
    var out = document.createElement('pre');
    out.id = 'viewer-probe';
    out.textContent = JSON.stringify(report);
    document.body.appendChild(out);
  });
}, 500); });
</script>"""


@pytest.mark.browser
def test_report_in_chromium_draws_every_figure(surface_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    from tests.present.test_viewer_browser import CHROMIUM, painted_share, probe_page, screenshot

    if CHROMIUM is None:
        pytest.skip("headless Chromium not found (Debian: apt-get install -y chromium)")
    page = surface_run / REPORT_FILE
    report = probe_page(page, tmp_path, REPORT_PROBE)
    assert report["errors"] == []
    assert report["webgl"]
    assert report["count"] == len(report["figures"]) == 8
    meshes = [traces for traces in report["figures"] if traces[0]["type"] == "mesh3d"]
    assert [(t["n_x"], t["n_intensity"]) for traces in meshes for t in traces] == [(N_FS5, N_FS5)] * 4
    assert [name for name in report["resources"] if not name.startswith("file:")] == []

    # Screenshot the first contrast map alone: text and the other figures hidden.
    figures = payload(page.read_text())["figures"]
    first = next(f["id"] for f in figures if "· age (" in figure_title(f))
    style = (f"<style>.blmm-text, h2, h3, .blmm-figure {{ display: none; }} "
             f"#{first} {{ display: block; }}</style>")
    alone = tmp_path / "alone.html"
    alone.write_text(page.read_text().replace("</head>", style + "</head>", 1))
    pixels = screenshot(alone, tmp_path)
    height, width = pixels.shape[:2]
    plot_area = pixels[int(0.1 * height):int(0.75 * height), :int(0.85 * width)]
    painted, coloured = painted_share(plot_area)
    assert painted > 0.1, f"only {painted:.1%} of the plot area is painted"
    assert coloured > 0.01, f"only {coloured:.1%} of the plot area shows map colours"


def test_d_volumes_of_a_yaml_run_without_a_design_header_get_positional_names(tmp_path: Path) -> None:
    """Issue 18: a Z design file without a header names its columns z1, z2, … in the D volumes."""
    yml = simulate_analysis(tmp_path, n_voxels=50, slope=True)
    design = tmp_path / "Z_slope.csv"
    design.write_text("\n".join(design.read_text().splitlines()[1:]) + "\n")  # drop the header row
    run(load_config(yml), log=lambda _: None)
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert record["volumes"]["D"] == ["subject: z1", "subject: z1 x z2", "subject: z2"]
    assert record["factors"][0]["columns"] == ["z1", "z2"]
    rows = _table_rows((tmp_path / "out" / REPORT_FILE).read_text(), "random-effects")
    assert [row[:2] for row in rows] == [["subject", "z1"], ["", "z2"], ["Residual", ""], ["subject", "z1 x z2"]]


def test_figure_json_is_what_plotly_writes_for_the_same_figure() -> None:
    """The report writes its figures' JSON itself (no plotly figure objects); plotly's own
    to_json of the same figure is the reference, value for value once typed arrays are decoded."""
    pio = pytest.importorskip("plotly.io", reason="the viewer extra (plotly) is not installed")
    go = pytest.importorskip("plotly.graph_objects")
    spec = dict(data=[dict(type="heatmap", z=np.arange(6, dtype=np.uint8).reshape(2, 3), x=np.array([1.5, 2.5, 3.5]),
                           y=[0.0, 1.0], zmin=np.float32(0), name="outline"),
                      dict(type="mesh3d", intensity=np.array([1.0, np.nan, 3.0], np.float32),
                           i=np.array([0, 70_000], np.int64), customdata=np.array([True, False]), opacity=None),
                      dict(type="bar", x=[0.5, float("nan")], y=np.array([3, 4]), width=np.float64(0.25))],
                layout=dict(title=dict(text="a · b"), height=np.int64(300)))
    theirs = json.loads(pio.to_json(go.Figure(spec), validate=False))
    ours = json.loads(json.dumps(figure_json(spec), allow_nan=False))  # valid JSON: NaN written as null

    def values(item):
        if isinstance(item, dict) and "bdata" in item:
            kinds = {"f8": "<f8", "f4": "<f4", "i4": "<i4", "i2": "<i2", "u2": "<u2", "i1": "i1", "u1": "u1"}
            array = np.frombuffer(base64.b64decode(item["bdata"]), kinds[item["dtype"]]).astype(np.float64)
            return array.reshape([int(d) for d in item["shape"].split(",")]).tolist() if "shape" in item else array.tolist()
        if isinstance(item, dict):
            return {key: values(value) for key, value in item.items()}
        if isinstance(item, list):
            return [values(value) for value in item]
        return item

    theirs["layout"].pop("template")
    assert json.dumps(values(ours), sort_keys=True) == json.dumps(values(theirs), sort_keys=True)
    assert ours["data"][1]["i"]["dtype"] == "i4"  # int64 has no typed array in plotly.js
    assert ours["data"][0]["z"]["shape"] == "2, 3"

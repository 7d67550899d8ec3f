"""The viewer's pages in a real (headless) Chromium: no JavaScript error, the brain paints.

Run with ``pytest -m browser``; needs the Debian package ``chromium``.
The page is probed by a script injected at the top of a copy of the HTML: it records
JavaScript errors and console errors, then (after plotly has drawn) writes a JSON report
into the DOM, which ``--dump-dom`` prints. A second run takes a ``--screenshot`` whose
pixels are decoded with the stdlib (zlib, struct) and numpy.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")

from blmm import viewer  # noqa: E402
from blmm.cli.view import view_main  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = next((found for name in ("chromium", "chromium-browser")
                 if (found := shutil.which(name))), None)
WINDOW = (1000, 700)
N_FS5 = viewer.FSAVERAGE5_N_VERTICES

# records JavaScript errors, rejections and console errors into window.__probe.errors
CAPTURE_ERRORS = """window.addEventListener('error', function (e) { window.__probe.errors.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) {
  window.__probe.errors.push('rejection: ' + e.reason); });
(function () {
  var original = console.error;
  console.error = function () {
    window.__probe.errors.push('console: ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments); };
})();
"""

PROBE = """<script>
window.__probe = {errors: []};
""" + CAPTURE_ERRORS + """window.addEventListener('load', function () { setTimeout(function () {
  var report = window.__probe;
  try {
    var gd = document.querySelector('.plotly-graph-div');
    report.traces = gd._fullData.map(function (t) {
      return {type: t.type, name: t.name, n_x: t.x ? t.x.length : null,
              n_intensity: t.intensity ? t.intensity.length : null}; });
    var gl = document.createElement('canvas').getContext('webgl');
    report.webgl = !!gl;
    report.no_webgl_notice = !!gd.querySelector('.no-webgl');
    report.resources = performance.getEntriesByType('resource').map(function (r) {
      return r.name; });
    if (report.traces.length && report.traces[report.traces.length - 1].type === 'heatmap') {
      // Move the axial slider one step: slices are restyled from typed arrays.
      var step = gd.layout.sliders[2].steps[3];
      return Plotly.restyle(gd, step.args[0], step.args[1]).then(function () {
        var z = gd._fullData[gd._fullData.length - 1].z;
        report.restyled = [z.length, z[0].length]; finish(report); });
    }
  } catch (err) { report.errors.push('probe: ' + err); }
  finish(report);
}, 500); });
function finish(report) {
  var out = document.createElement('pre');
  out.id = 'viewer-probe';
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
}
</script>"""


def chromium(*arguments: str, user_data: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={user_data}",
        # WebGL without a GPU: Chromium no longer falls back to SwiftShader by itself.
        "--enable-unsafe-swiftshader", "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=15000",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def probe_page(page: Path, tmp_path: Path, probe: str = PROBE) -> dict:
    """Open a copy of ``page`` with ``probe`` injected; the JSON it wrote into the DOM.

    A probe writes its JSON into ``<pre id="viewer-probe">`` (see ``PROBE``).
    """
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + probe, 1))
    result = chromium("--dump-dom", probed.as_uri(), user_data=tmp_path / "profile-dom")
    found = re.search(r'<pre id="viewer-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"probe report missing; chromium said:\n{result.stderr[-3000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<")
                      .replace("&gt;", ">").replace("&amp;", "&"))


def screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    target = tmp_path / f"{page.stem}.png"
    result = chromium(f"--screenshot={target}", page.as_uri(),
                      user_data=tmp_path / "profile-shot")
    assert target.is_file(), f"no screenshot; chromium said:\n{result.stderr[-3000:]}"
    return read_png(target)


def read_png(path: Path) -> np.ndarray:
    """An 8-bit RGB/RGBA PNG as (height, width, channels) uint8, with the stdlib + numpy."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, [], None
    while position < len(blob):
        length, kind = struct.unpack(">I4s", blob[position:position + 8])
        body = blob[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        position += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    rows = raw.reshape(height, stride + 1)
    image = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            current = line
        elif kind == 1:  # Sub: running sum per channel
            current = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            current = (line + previous) % 256
        else:  # Average / Paeth depend on the byte just decoded: plain Python per byte
            line_list, up_list = line.tolist(), previous.tolist()
            decoded = [0] * stride
            for x in range(stride):
                left = decoded[x - channels] if x >= channels else 0
                up = up_list[x]
                if kind == 3:
                    predicted = (left + up) >> 1
                else:
                    corner = up_list[x - channels] if x >= channels else 0
                    estimate = left + up - corner
                    to_left, to_up, to_corner = abs(estimate - left), abs(estimate - up), \
                        abs(estimate - corner)
                    predicted = left if to_left <= to_up and to_left <= to_corner else \
                        up if to_up <= to_corner else corner
                decoded[x] = (line_list[x] + predicted) & 0xFF
            current = np.array(decoded, dtype=np.int32)
        image[y] = current
        previous = current
    return image.reshape(height, width, channels)[:, :, :3]


def painted_share(pixels: np.ndarray) -> tuple[float, float]:
    """Shares of pixels that are not background white, and that are clearly coloured."""
    as_int = pixels.astype(int)
    not_white = (as_int < 240).any(axis=2)
    coloured = (as_int.max(axis=2) - as_int.min(axis=2)) > 60
    return float(not_white.mean()), float(coloured.mean())


@pytest.fixture
def surface_outdir(tmp_path: Path) -> Path:
    """An output folder with a two-volume conT map over both fsaverage5 hemispheres (.gii)."""
    folder = tmp_path / "out"
    folder.mkdir()
    columns = []
    for hemi in ("left", "right"):
        y = viewer.fsaverage5_mesh(hemi).coords[:, 1].astype(np.float64)
        columns.append(np.column_stack([y / 15.0, -y / 20.0]))  # -7..5 front to back
    values = np.vstack(columns).astype(np.float32)
    nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(c) for c in values.T]),
             folder / "blmm_vox_conT.gii")
    (folder / "inputs.yml").write_text(
        "contrasts:\n  - c1:\n      name: age\n      vector: [0, 1]\n"
        "  - c2:\n      name: sex\n      vector: [0, 0, 1]\n")
    return folder


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found (Debian: apt-get install -y chromium)")


@needs_chromium
def test_surface_page_runs_without_errors_and_paints_the_brain(
        surface_outdir: Path, tmp_path: Path) -> None:
    page = tmp_path / "conT.html"
    assert view_main([str(surface_outdir), "conT", "--hemi", "both",
                             "--threshold", "2", "-o", str(page)]) == 0

    report = probe_page(page, tmp_path)
    assert report["errors"] == []
    assert report["webgl"] and not report["no_webgl_notice"]
    assert [(t["type"], t["n_x"], t["n_intensity"]) for t in report["traces"]] == \
        [("mesh3d", N_FS5, N_FS5)] * 2
    assert [name for name in report["resources"] if not name.startswith("file:")] == []

    pixels = screenshot(page, tmp_path)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    # The two hemisphere panels: below the title, left of the colour bar.
    height, width = pixels.shape[:2]
    plot_area = pixels[int(0.12 * height):int(0.75 * height), :int(0.85 * width)]
    painted, coloured = painted_share(plot_area)
    grey = (np.abs(plot_area.astype(int) - 200).max(axis=2) < 45) & \
        ((plot_area.max(axis=2).astype(int) - plot_area.min(axis=2)) < 12)
    assert painted > 0.15, f"only {painted:.1%} of the plot area is painted"
    assert coloured > 0.03, f"only {coloured:.1%} of the plot area shows map colours"
    assert grey.mean() > 0.03, "no neutral (sub-threshold) cortex visible"
    for half in (plot_area[:, :plot_area.shape[1] // 2], plot_area[:, plot_area.shape[1] // 2:]):
        assert painted_share(half)[1] > 0.02, "a hemisphere panel has no map colours"


@needs_chromium
def test_volume_page_runs_without_errors_and_slices_paint(tmp_path: Path) -> None:
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    i, j, k = np.indices((91, 109, 91))
    blob = 6 * np.exp(-((i - 30) ** 2 + (j - 60) ** 2 + (k - 50) ** 2) / 60.0)
    image = nib.Nifti1Image(blob.astype(np.float32), affine)
    image.header.set_sform(affine, code=4)
    nib.save(image, tmp_path / "blmm_vox_conT.nii.gz")
    page = tmp_path / "volume.html"
    assert view_main([str(tmp_path), "conT", "--threshold", "1", "-o", str(page)]) == 0

    report = probe_page(page, tmp_path)
    assert report["errors"] == []
    assert [t["name"] for t in report["traces"]] == \
        ["MNI152", "sagittal", "MNI152", "coronal", "MNI152", "axial"]
    assert report["restyled"] == [109, 91]
    assert [name for name in report["resources"] if not name.startswith("file:")] == []

    pixels = screenshot(page, tmp_path)
    height, width = pixels.shape[:2]
    plot_area = pixels[int(0.12 * height):int(0.6 * height), :int(0.9 * width)]
    painted, coloured = painted_share(plot_area)
    assert painted > 0.3, f"only {painted:.1%} of the slice area is painted"
    assert coloured > 0.01, f"only {coloured:.1%} of the slice area shows map colours"


def test_png_reader_round_trips_all_filter_types(tmp_path: Path) -> None:
    """The stdlib PNG decoder used above, checked on an image with every filter type."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    stride, rows, previous = 7 * 3, [], np.zeros(7 * 3, dtype=np.int32)
    for y, kind in enumerate([0, 1, 2, 3, 4]):
        line = image[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(3, dtype=np.int32), line[:-3]])
        corner = np.concatenate([np.zeros(3, dtype=np.int32), previous[:-3]])
        if kind == 0:
            predicted = np.zeros(stride, dtype=np.int32)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = previous
        elif kind == 3:
            predicted = (left + previous) // 2
        else:
            estimate = left + previous - corner
            a, b, c = np.abs(estimate - left), np.abs(estimate - previous), np.abs(estimate - corner)
            predicted = np.where((a <= b) & (a <= c), left, np.where(b <= c, previous, corner))
        rows.append(bytes([kind]) + ((line - predicted) % 256).astype(np.uint8).tobytes())
        previous = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 5, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    (tmp_path / "t.png").write_bytes(png)
    np.testing.assert_array_equal(read_png(tmp_path / "t.png"), image)

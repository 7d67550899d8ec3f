"""examples/abcd_like/workflow.py top to bottom, small: the planted effects are found.

Marker ``slow`` (about 2 minutes on 2 cores): 60 subjects (114 images, 86 with 2+ visits),
both fsaverage5 hemispheres, six fits, two comparisons and three plots.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from examples.abcd_like import simulate, workflow

pytestmark = pytest.mark.slow

SUBJECTS = 60
V = simulate.FSAVERAGE5_VERTICES


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> workflow.WorkflowResult:
    outdir = tmp_path_factory.mktemp("workflow")
    return workflow.run_workflow(outdir, subjects=SUBJECTS, engine="inline", log=lambda _: None)


def read(folder: Path, stat: str, dtype: type = np.float32) -> np.ndarray:
    return np.fromfile(folder / f"blmm_vox_{stat}.dat", dtype).reshape(V, -1)


def test_every_step_wrote_its_files(finished: workflow.WorkflowResult) -> None:
    assert sorted(finished.fits) == sorted((d, h) for d in workflow.DESIGNS for h in simulate.HEMISPHERES)
    for outdir in finished.fits.values():
        assert (outdir / "report.html").is_file() and (outdir / "blmm_run.json").is_file()
    pytest.importorskip("blmm.compare")
    assert sorted(finished.comparisons) == sorted(simulate.HEMISPHERES)
    for outdir in finished.comparisons.values():
        assert (outdir / "report.html").is_file()
    pytest.importorskip("plotly", reason="the viewer extra (plotly) is not installed")
    assert [page.name for page in finished.pages] == \
        ["beta_nih_score.html", "conT_nih_score.html", "Chi2lp_design2_vs_design1_2plus.html"]
    for page in finished.pages:
        assert page.read_text().count("plotly.js v") == 1


@pytest.mark.parametrize("hemi", simulate.HEMISPHERES)
def test_planted_nih_score_effect_is_detected(finished: workflow.WorkflowResult, hemi: str) -> None:
    truth = np.load(finished.data_dir / "truth.npz")
    effect = truth[f"beta_{hemi}"][simulate.X_NAMES.index("nih_score")]
    patch = effect > 0.5 * effect.max()
    outdir = finished.fits["design1", hemi]
    t_volume = 3  # the fourth T contrast, nih_score
    mlog10p = read(outdir, "conTlp")[:, t_volume]
    assert np.isfinite(mlog10p).all()
    # formula runs report two-sided p (lmerTest's default): the planted effect is positive, so
    # compare one-sided p for H1: beta > 0, p = p2 / 2 where T > 0 and 1 - p2 / 2 elsewhere
    t = read(outdir, "conT")[:, t_volume]
    p_two = 10.0 ** -mlog10p.astype(np.float64)
    one_sided = -np.log10(np.where(t > 0, p_two / 2, 1 - p_two / 2))
    assert one_sided[patch].mean() > one_sided[~patch].mean() + 0.2
    # beta estimates the true effect: correlated over vertices, and unbiased on average.
    beta = read(outdir, "beta")[:, simulate.X_NAMES.index("nih_score")]
    assert np.corrcoef(beta, effect)[0, 1] > 0.15  # 0.27-0.33 with 60 subjects
    assert abs(beta.mean() - effect.mean()) < 0.005


@pytest.mark.parametrize("hemi", simulate.HEMISPHERES)
def test_comparison_is_finite_where_both_converged(finished: workflow.WorkflowResult, hemi: str) -> None:
    pytest.importorskip("blmm.compare")
    compared = finished.comparisons[hemi]
    chi2 = read(compared, "Chi2")[:, 0]
    chi2lp = read(compared, "Chi2lp")[:, 0]
    small, big = (finished.fits[design, hemi] for design in workflow.COMPARED)
    both = (read(small, "converged", np.int32)[:, 0] == 1) & (read(big, "converged", np.int32)[:, 0] == 1)
    assert both.mean() > 0.99
    assert np.isfinite(chi2[both]).all() and (chi2[both] >= 0).all()
    assert np.isfinite(chi2lp[both]).all()
    # The random slope on time exists only where sd_slope > 0: the test is stronger there.
    slope = np.load(finished.data_dir / "truth.npz")[f"sd_slope_{hemi}"] > 0
    assert chi2lp[slope & both].mean() > chi2lp[~slope & both].mean() + 0.05

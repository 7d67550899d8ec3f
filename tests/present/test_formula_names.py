"""Formula runs seen through the tools: blmm_view picks volumes by name, blmm_compare nests by terms."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from blmm.cli.compare import compare_main
from blmm.compare import compare
from blmm.config import load_config
from blmm.errors import CompareError
from blmm.pipeline import run
from blmm.cli.view import view_main
from blmm.viewer import volume_by_name
from tests.pipeline.test_formula_pipeline import make_table_study


def _fit(root: Path, formula: str, outdir: str, contrasts=None, reml: bool = True) -> Path:
    settings = {"data": "participants.tsv", "images": "image_file", "formula": formula,
                "contrasts": contrasts or [{"age": "age"}], "outdir": outdir, "REML": reml}
    path = root / f"{outdir}.yml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    run(load_config(path), log=lambda *a: None)
    return root / outdir


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("formula_tools")
    make_table_study(root, n_vox=10)
    return root


def test_view_by_name(study, tmp_path, capsys):
    pytest.importorskip("plotly")
    out = _fit(study, "~ age + sex + site + time + (1 + time | subject)", "named",
               contrasts=[{"age": "age"}, {"site": "site"}, {"older_vs_male": "age - 2 * sex[T.M]"}])
    assert volume_by_name(out, "beta", "age") == 1
    assert volume_by_name(out, "beta", "sexM") == 2  # R's spelling too
    assert volume_by_name(out, "conT", "older_vs_male") == 1
    assert volume_by_name(out, "D", "subject: time") == 2  # D volumes named by their terms (issue 18)
    assert volume_by_name(out, "D", "subject: (Intercept) x time") == 1
    page = tmp_path / "page.html"
    assert view_main([str(out), "beta:site[T.c]", "-o", str(page)]) == 0
    text = page.read_text()
    assert "volume 4" in text and "site[T.c]" in text
    assert view_main([str(out), "conF", "--volume", "site", "-o", str(page)]) == 0
    assert view_main([str(out), "D:subject: time", "-o", str(page)]) == 0  # a D volume by its term
    assert "subject: time" in page.read_text()  # the title names the term
    assert view_main([str(out), "beta:agee", "-o", str(page)]) == 2  # bad input
    err = capsys.readouterr().err
    assert "no volume named 'agee'; did you mean 'age' (volume 1)?" in err
    # issue 18: 'conTlp:site' suggested 'sexM'; site is an F contrast, in conFlp
    assert view_main([str(out), "conTlp:site", "-o", str(page)]) == 2
    err = capsys.readouterr().err
    assert "'site' is an F contrast, shown by blmm_vox_conFlp" in err and "conFlp:site" in err and "sexM" not in err


def test_compare_nesting_from_terms(study, tmp_path, capsys):
    small = _fit(study, "~ age + time + (1 | subject)", "small")
    big = _fit(study, "~ age + time + (1 + time | subject)", "big")
    result = compare(big, small, tmp_path / "cmp")  # either order
    assert result.swapped and result.small.outdir == small
    assert result.record["small"]["formula"] == "~ age + time + (1 | subject)"
    other = _fit(study, "~ age + sex + (1 | subject)", "other")
    with pytest.raises(CompareError) as caught:
        compare(small, other, tmp_path / "cmp2")
    text = str(caught.value)
    assert "the formulas are not nested" in text
    assert "fixed term(s) 'time'" in text and "fixed term(s) 'sex'" in text
    crossed = _fit(study, "~ age + time + (1 | site)", "crossed")
    with pytest.raises(CompareError, match=r"random term \(1 \| site\) .* no counterpart grouped by 'site'"):
        compare(crossed, big, tmp_path / "cmp3")
    assert compare_main([str(small), str(small), str(tmp_path / "cmp4")]) != 0
    assert "same terms" in capsys.readouterr().err

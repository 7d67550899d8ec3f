"""One exit-status convention for every command (blmm.cli.common): 0 done, 2 bad input, 1 a failure
during the run (issue 18: blmm used 2, blmm_view and blmm_compare 1 for the same kind of problem)."""
from __future__ import annotations


import pytest

import blmm.cli.report as report_cli
import blmm.compare
import blmm.pipeline
import blmm.viewer.figures
from blmm.cli import compare_main, main, view_main
from blmm.cli.common import BAD_INPUT, RUN_FAILED
from tests.pipeline.test_formula_pipeline import make_table_study

COMMANDS = {
    "blmm": (main, lambda tmp: [str(tmp / "missing.yml")]),
    "blmm_compare": (compare_main, lambda tmp: [str(tmp / "a"), str(tmp / "b"), str(tmp / "cmp")]),
    "blmm_view": (view_main, lambda tmp: [str(tmp / "nothing"), "beta", "-o", str(tmp / "page.html")]),
    "python -m blmm.report": (report_cli.main, lambda tmp: [str(tmp / "nothing")]),
}


def test_the_convention_itself():
    assert (BAD_INPUT, RUN_FAILED) == (2, 1)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_is_2_with_one_line(command, tmp_path, capsys):
    entry, argv = COMMANDS[command]
    assert entry(argv(tmp_path)) == BAD_INPUT
    err = capsys.readouterr().err
    assert ": error: " in err and "Traceback" not in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_usage_errors_are_2(command, capsys):
    entry, _ = COMMANDS[command]
    assert entry(["--no-such-flag"]) == BAD_INPUT
    assert "usage:" in capsys.readouterr().err


def _fail(*args, **kwargs):
    raise RuntimeError("disk controller on fire")


def test_a_failure_during_the_run_is_1(tmp_path, monkeypatch, capsys):
    make_table_study(tmp_path)
    monkeypatch.setattr(blmm.pipeline, "run", _fail)
    code = main(["--data", str(tmp_path / "participants.tsv"), "--images", "image_file", "--formula",
                 "~ age + (1 | subject)", "--contrast", "age", "-o", str(tmp_path / "out")])
    assert code == RUN_FAILED
    assert "blmm: unexpected error: RuntimeError: disk controller on fire" in capsys.readouterr().err

    folder = tmp_path / "folder"
    folder.mkdir()
    monkeypatch.setattr(report_cli, "write_report", _fail)
    assert report_cli.main([str(folder)]) == RUN_FAILED

    monkeypatch.setattr(blmm.compare, "compare", _fail)
    assert compare_main([str(folder), str(folder), str(tmp_path / "cmp")]) == RUN_FAILED

    monkeypatch.setattr(blmm.viewer.figures, "write_html", _fail)
    monkeypatch.setattr("blmm.viewer.show.map_figure", lambda view: None)
    monkeypatch.setattr("blmm.viewer.show.MapView", lambda **options: None)
    assert view_main([str(folder), "beta", "-o", str(tmp_path / "p.html")]) == RUN_FAILED
    assert "Traceback" not in capsys.readouterr().err

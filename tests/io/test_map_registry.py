"""io.outdir.MAPS, the one registry of output maps, against the docs' map tables and its readers."""
from __future__ import annotations

import re
from pathlib import Path

from blmm.io.outdir import (
    COMPARE,
    CORRECTION,
    FIT,
    INT32_DAT_MAPS,
    MAPS,
    maps_written_by,
    per_contrast_maps,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\| ((?:`blmm_vox_\w+`(?:, )?)+) \| ([^|]+) \|", re.M)


def _documented(page: str) -> dict[str, str]:
    """Map stat -> the second column of every row of the page's map table naming blmm_vox_ maps."""
    found: dict[str, str] = {}
    for names, second in ROW.findall((DOCS / page).read_text(encoding="utf-8")):
        stats = re.findall(r"`blmm_vox_(\w+)`", names)
        columns = [c.strip() for c in second.split(",")]
        for i, stat in enumerate(stats):
            found[stat] = columns[i] if len(columns) == len(stats) else second.strip()
    return found


def test_outputs_md_documents_every_run_map_with_its_volumes():
    documented = _documented("outputs.md")
    run_maps = {kind.stat: kind.volumes for kind in maps_written_by(FIT) + maps_written_by(CORRECTION)}
    assert set(documented) == set(run_maps)  # every map documented, no stale row
    assert documented == run_maps


def test_compare_md_documents_every_compare_map_with_its_dtype():
    documented = _documented("compare.md")
    compare_maps = {kind.stat: kind.dtype for kind in maps_written_by(COMPARE)}
    assert set(documented) == set(compare_maps)
    assert {stat: text.split(":")[0] for stat, text in documented.items()} == compare_maps


def test_registry_kinds():
    assert INT32_DAT_MAPS == {"n", "mask", "edf", "converged", "nit", "conT_cluster", "conF_cluster"}
    assert per_contrast_maps("T") == {"con", "conSE", "conT", "conTlp", "conT_swedf", "conTlp_fdr", "conTlp_fwe",
                                      "conT_tfce", "conTlp_tfce_fwe", "conT_cluster", "conTlp_cluster_fwe"}
    assert len(per_contrast_maps("F")) == 4 + 6
    assert all(kind.written_by and kind.meaning and kind.dtype in ("float32", "int32") for kind in MAPS.values())


def test_outputs_md_names_the_int32_maps():
    line = next(line for line in (DOCS / "outputs.md").read_text(encoding="utf-8").splitlines()
                if "or int32 for" in line)
    named = set(re.findall(r"`(\w+)`", line.split("or int32 for", 1)[1].split(":", 1)[0]))
    assert named == INT32_DAT_MAPS

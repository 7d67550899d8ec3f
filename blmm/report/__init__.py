"""``report.html``: one self-contained page that shows what a blmm run (or comparison) found.

``summary`` reads what the run left in its outdir (through ``blmm.io.outdir``) into plain
objects; ``page`` turns them into HTML and figures;
the page's CSS and JavaScript are files in ``assets/`` (package data).
``python -m blmm.report OUTDIR`` rewrites a folder's report (``blmm.cli.report``).
"""
from blmm.report.page import (
    REPORT_FILE,
    ReportPage,
    add_histograms,
    add_map_figure,
    build_compare_report,
    build_report,
    figure_json,
    plot_projections,
    plotly_available,
    signed_projection,
    write_compare_report,
    write_report,
)
from blmm.report.summary import (
    DEFAULT_REPORT_THRESHOLD,
    ContrastSummary,
    FactorSummary,
    MapGeometry,
    RunDescription,
    SurfacePanel,
    contrast_numbers,
    contrast_text,
    histogram,
    map_geometry,
    model_formula,
    read_report_map,
    summarise_run,
)

__all__ = [
    "ContrastSummary",
    "DEFAULT_REPORT_THRESHOLD",
    "FactorSummary",
    "MapGeometry",
    "REPORT_FILE",
    "ReportPage",
    "RunDescription",
    "SurfacePanel",
    "add_histograms",
    "add_map_figure",
    "build_compare_report",
    "build_report",
    "figure_json",
    "contrast_numbers",
    "contrast_text",
    "histogram",
    "map_geometry",
    "model_formula",
    "plot_projections",
    "plotly_available",
    "read_report_map",
    "signed_projection",
    "summarise_run",
    "write_compare_report",
    "write_report",
]

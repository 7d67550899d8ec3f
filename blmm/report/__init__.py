"""``report.html``: one self-contained page that shows what a blmm run (or comparison) found.

``page`` builds it from what the run left in its outdir (read through ``blmm.io.outdir``);
the page's CSS and JavaScript are files in ``assets/`` (package data).
``python -m blmm.report OUTDIR`` rewrites a folder's report (``blmm.cli.report``).
"""
from blmm.report.page import (
    ContrastSummary,
    DEFAULT_REPORT_THRESHOLD,
    FactorSummary,
    MapGeometry,
    REPORT_FILE,
    ReportPage,
    RunDescription,
    SurfacePanel,
    add_histograms,
    add_map_figure,
    build_compare_report,
    build_report,
    contrast_numbers,
    contrast_text,
    histogram,
    map_geometry,
    model_formula,
    plot_projections,
    plotly_available,
    read_report_map,
    signed_projection,
    summarise_run,
    write_compare_report,
    write_report,
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

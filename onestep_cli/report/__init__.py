"""`onestep compare` as a library: read runs, checkpoints and eval results; tabulate, plot and write them.

    comparison = compare(["runs/sim", "runs/sid", "evals/teacher.json"])
    write_report(comparison, "report/", grid_seeds=range(16), html=True)
"""

from .comparison import Comparison, compare, config_differences, measurement_differences, unique_labels
from .grids import GridFiles, Grids, GridSkip, combined_grid, model_images, sample_grids, write_grids
from .page import render_html
from .plots import curve_metrics, metric_figure, plot_metric_curves, y_scale
from .sources import ReportError, Source, load_source
from .table import (format_number, render_config_table, render_measurement_table, render_rich_table, to_csv, to_json,
                    to_markdown)
from .write import write_report

__all__ = [
    "Comparison", "GridFiles", "GridSkip", "Grids", "ReportError", "Source", "combined_grid", "compare",
    "config_differences", "curve_metrics", "format_number", "load_source", "measurement_differences",
    "metric_figure", "model_images", "plot_metric_curves", "render_config_table", "render_html",
    "render_measurement_table", "render_rich_table", "sample_grids", "to_csv", "to_json",
    "to_markdown", "unique_labels", "write_grids", "write_report", "y_scale",
]

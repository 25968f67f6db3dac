"""`onestep compare` as a library: read runs, checkpoints and eval results; tabulate, plot and write them.

    comparison = compare(["runs/sim", "runs/sid", "evals/teacher.json"])
    write_report(comparison, "report/")
"""

from .comparison import Comparison, compare, config_differences, unique_labels
from .plots import curve_metrics, metric_figure, plot_metric_curves, y_scale
from .sources import ReportError, Source, load_source
from .table import format_number, render_config_table, render_rich_table, to_csv, to_json, to_markdown
from .write import write_report

__all__ = [
    "Comparison", "ReportError", "Source", "compare", "config_differences", "curve_metrics", "format_number",
    "load_source", "metric_figure", "plot_metric_curves", "render_config_table", "render_rich_table", "to_csv",
    "to_json", "to_markdown", "unique_labels", "write_report", "y_scale",
]

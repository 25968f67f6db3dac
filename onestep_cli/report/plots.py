"""Metric-versus-kimg curves: a line per run, a marker per checkpoint, a dashed reference line per eval result."""

from __future__ import annotations

import math
import re
from pathlib import Path

# Figure + the Agg canvas instead of pyplot: no global figure state, and the caller's backend is left alone.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .comparison import Comparison

LOG_SPAN = 10.0  # Use a log y axis once all-positive values span more than this factor.
FIGURE_SIZE_INCHES = (6.4, 4.0)
DPI = 120


def curve_metrics(comparison: Comparison) -> list[str]:
    """Sorted names of the metrics that at least one run recorded during training."""
    return sorted({
        name for s in comparison.sources if s.kind == "run" for _, metrics in s.history for name in metrics
    })


def y_scale(values: list[float]) -> str:
    """'log' when every finite value is positive and they span more than LOG_SPAN, else 'linear'."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > LOG_SPAN:
        return "log"
    return "linear"


def metric_figure(comparison: Comparison, metric: str) -> Figure:
    """One metric against kimg for every source that has it; each source keeps its colour across figures."""
    figure = Figure(figsize=FIGURE_SIZE_INCHES, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    plotted = []
    for index, s in enumerate(comparison.sources):
        color = f"C{index}"
        if s.kind == "run":
            points = [(kimg, metrics[metric]) for kimg, metrics in s.history if metric in metrics]
            if points:
                kimgs, values = zip(*points)
                axes.plot(kimgs, values, marker="o", markersize=3, color=color, label=s.label)
                plotted += values
        elif metric in s.metrics and s.kind == "checkpoint" and s.kimg is not None:
            axes.plot([s.kimg], [s.metrics[metric]], marker="D", linestyle="none", color=color, label=s.label)
            plotted.append(s.metrics[metric])
        elif metric in s.metrics and s.kind == "eval":
            axes.axhline(s.metrics[metric], linestyle="--", color=color, label=s.label)
            plotted.append(s.metrics[metric])
    axes.set_yscale(y_scale(plotted))
    axes.set_xlabel("kimg (thousands of generated samples)")
    axes.set_ylabel(metric)
    axes.set_title(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def plot_metric_curves(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """Write curve-<metric>.png into out_dir for each metric a run has history for; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in curve_metrics(comparison):
        path = out_dir / f"curve-{_file_safe(metric)}.png"
        metric_figure(comparison, metric).savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)

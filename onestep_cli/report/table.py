"""A comparison as tables: rich (terminal), Markdown, CSV and a JSON-ready dict."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from rich.table import Table

from .comparison import Comparison
from .sources import Source

MISSING = "—"
METRIC_FORMAT = ".4g"  # Four significant digits: enough to rank runs, few enough to read.
KIMG_FORMAT = ".6g"  # kimg runs to 10^5 on large runs; keep it out of exponent notation.


def format_number(value: float | None, spec: str = METRIC_FORMAT) -> str:
    """A number as shown in tables (four significant digits by default); '—' when missing."""
    return MISSING if value is None else format(value, spec)


def metric_header(comparison: Comparison) -> list[str]:
    """Column names of the metrics table."""
    return ["source", "kind", "kimg", *comparison.metrics]


def metric_rows(comparison: Comparison) -> list[list[str]]:
    """One formatted row per source: label, kind, kimg, then each metric of `comparison.metrics`."""
    return [
        [s.label, _kind(s), format_number(s.kimg, KIMG_FORMAT),
         *(format_number(s.metrics.get(m)) for m in comparison.metrics)]
        for s in comparison.sources
    ]


def config_header(comparison: Comparison) -> list[str]:
    """Column names of the config-differences table: the key, then each source that has a config."""
    return ["key", *(s.label for s in comparison.sources if s.kind != "eval")]


def config_rows(comparison: Comparison) -> list[list[str]]:
    """One formatted row per differing config key, with each configured source's value ('—' where it lacks it)."""
    labels = config_header(comparison)[1:]
    return [
        [key, *(_format_config_value(values[label]) if label in values else MISSING for label in labels)]
        for key, values in comparison.config_differences.items()
    ]


def measurement_header(comparison: Comparison) -> list[str]:
    """Column names of the measurement-differences table: metric, provenance key, then every source."""
    return ["metric", "key", *(s.label for s in comparison.sources)]


def measurement_rows(comparison: Comparison) -> list[list[str]]:
    """One row per (metric, provenance key) measured differently, each source's value ('—' where it has none)."""
    labels = measurement_header(comparison)[2:]
    return [[metric, key, *(_format_config_value(values[label]) if label in values else MISSING for label in labels)]
            for metric, keys in comparison.measurement_differences.items() for key, values in keys.items()]


def render_measurement_table(comparison: Comparison) -> Table:
    """The metrics whose sources measured them differently (precision, weights, preprocessing...), per key."""
    return _rich_table("Measured differently", measurement_header(comparison), measurement_rows(comparison),
                       overflow="fold")


def render_rich_table(comparison: Comparison) -> Table:
    """The metrics table for a terminal: rows are sources, columns are metrics."""
    table = Table(title="Metrics")
    for name in metric_header(comparison):
        table.add_column(name, justify="left" if name in ("source", "kind") else "right")
    for row in metric_rows(comparison):
        table.add_row(*row)
    return table


def render_config_table(comparison: Comparison) -> Table:
    """The config keys on which the runs differ, one row per key, one column per run or checkpoint."""
    return _rich_table("Config differences", config_header(comparison), config_rows(comparison))


def _rich_table(title: str, header: list[str], rows: list[list[str]], **column) -> Table:
    """A rich table of text cells: `header` as columns (with `column`'s rich options), then `rows`."""
    table = Table(title=title)
    for name in header:
        table.add_column(name, **column)
    for row in rows:
        table.add_row(*row)
    return table


def to_markdown(comparison: Comparison) -> str:
    """The metrics table and, when two or more sources have configs, their differences, as Markdown."""
    parts = ["## Metrics", "", *_markdown_table(metric_header(comparison), metric_rows(comparison), numeric_from=2)]
    if len(config_header(comparison)) > 2:
        parts += ["", "## Config differences", ""]
        if comparison.config_differences:
            parts += _markdown_table(config_header(comparison), config_rows(comparison))
        else:
            parts.append("The configs are identical.")
    if comparison.measurement_differences:
        parts += ["", "## Measured differently", "",
                  *_markdown_table(measurement_header(comparison), measurement_rows(comparison))]
    return "\n".join(parts) + "\n"


def to_csv(comparison: Comparison) -> str:
    """The metrics table as CSV with full-precision numbers; empty cells where a metric is missing."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["source", "kind", "path", "kimg", *comparison.metrics])
    for s in comparison.sources:
        cells = [s.kimg, *(s.metrics.get(m) for m in comparison.metrics)]
        writer.writerow([s.label, s.kind, str(s.path), *("" if v is None else repr(v) for v in cells)])
    return out.getvalue()


def to_json(comparison: Comparison) -> dict:
    """The comparison as a JSON-serialisable dict: sources (with metrics and provenance), metrics, config_differences,
    measurement_differences.

    Non-finite numbers become null, as strict JSON has no NaN; a metric a source lacks is absent from its metrics.
    """
    return {
        "sources": [
            {"label": s.label, "kind": s.kind, "path": str(s.path),
             "metrics": {name: _json_number(v) for name, v in s.metrics.items()}, "kimg": _json_number(s.kimg),
             "provenance": s.provenance}
            for s in comparison.sources
        ],
        "metrics": list(comparison.metrics),
        "config_differences": {key: dict(values) for key, values in comparison.config_differences.items()},
        "measurement_differences": {metric: {key: dict(values) for key, values in keys.items()}
                                    for metric, keys in comparison.measurement_differences.items()},
    }


def _kind(source: Source) -> str:
    return f"{source.kind} (running)" if source.status == "running" else source.kind


def _format_config_value(value: Any) -> str:
    return "null" if value is None else str(value)


def _json_number(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _markdown_table(header: list[str], rows: list[list[str]], numeric_from: int | None = None) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(header))]
    return [line(header), line(align), *(line(row) for row in rows)]

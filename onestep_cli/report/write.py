"""A comparison written to a folder: table.md, table.csv, compare.json and the metric curves."""

from __future__ import annotations

import json
from pathlib import Path

from .comparison import Comparison
from .plots import plot_metric_curves
from .sources import ReportError
from .table import to_csv, to_json, to_markdown


def write_report(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write the tables, compare.json and one curve PNG per metric into out_dir; return file name -> path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir} is a file; pass a folder (new or existing) to write the report into.")
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "table.md": to_markdown(comparison),
        "table.csv": to_csv(comparison),
        "compare.json": json.dumps(to_json(comparison), indent=2) + "\n",
    }
    written = {}
    for name, text in texts.items():
        written[name] = out_dir / name
        written[name].write_text(text)
    for path in plot_metric_curves(comparison, out_dir):
        written[path.name] = path
    return written

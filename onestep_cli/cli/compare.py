"""`onestep compare`: runs, checkpoints and eval results side by side; tables, config differences, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import print_json, reports_errors, stdout


@reports_errors
def compare_command(
    sources: list[Path] = typer.Argument(..., help="Run directories, checkpoint folders and eval JSON files."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write table.md, table.csv, compare.json and curves here."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
):
    """Compare sources: a table of metrics and of config differences; metric-vs-kimg plots under --out."""
    from ..report import compare, render_config_table, render_rich_table, to_json, write_report

    comparison = compare(sources)
    written = write_report(comparison, out) if out is not None else {}
    if as_json:
        print_json({**to_json(comparison), "written": {k: str(v) for k, v in written.items()}})
        return
    stdout.print(render_rich_table(comparison))
    if comparison.config_differences:
        stdout.print(render_config_table(comparison))
    if out is not None:
        stdout.print(f"Report written to {out}.", highlight=False)

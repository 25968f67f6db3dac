"""`onestep compare`: runs, checkpoints and eval results side by side; tables, config differences, curves, image
grids on the same seeds and one self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import info, output_folder, print_json, reports_errors, stdout


@reports_errors
def compare_command(
    sources: list[Path] = typer.Argument(..., help="Run directories, checkpoint folders and eval JSON files."),
    out: Optional[str] = typer.Option(None, "--out", help="Write table.md, table.csv, compare.json, curves, grids/ "
                                       "and report.html here."),
    grid_seeds: str = typer.Option("0-15", "--grid-seeds", help="Seeds of the image grids under --out, the same for "
                                   "every generator, e.g. 0-15 or 0,5,10-12."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
):
    """Compare sources: a table of metrics and of config differences; under --out, metric-vs-kimg plots, a grid of
    every image generator on the same seeds and report.html holding them all (opens offline)."""
    from ..runtime.precision import resolve_device
    from ..report import (compare, render_config_table, render_measurement_table, render_rich_table, to_json,
                          write_report)
    from ..sampling import parse_seeds

    seeds = parse_seeds(grid_seeds)
    out = output_folder(out) if out is not None else None
    comparison = compare(sources)
    written = {}
    if out is not None:
        written = write_report(comparison, out, grid_seeds=seeds, html=True, device=resolve_device("auto"),
                               log=info)
    if as_json:
        print_json({**to_json(comparison), "written": {k: str(v) for k, v in written.items()}})
        return
    stdout.print(render_rich_table(comparison))
    if comparison.config_differences:
        stdout.print(render_config_table(comparison))
    if comparison.measurement_differences:
        stdout.print(render_measurement_table(comparison))
    if out is not None:
        stdout.print(f"Report written to {out}; open {written['report.html']} in a browser.", highlight=False,
                     markup=False)

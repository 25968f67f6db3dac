"""`onestep demo`: the README's main job on the embedded default, ending in a result table."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import reports_errors, stderr, stdout


@reports_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the runs, samples and report."),
    objectives: str = typer.Option("sim,sid", "--objectives", help="Comma-separated objectives to distil with."),
):
    """Distil the embedded default teacher, sample, evaluate against the teacher and print the comparison."""
    from ..demo import run_demo
    from ..report import render_config_table, render_rich_table

    result = run_demo(out, [o.strip() for o in objectives.split(",") if o.strip()],
                      log=lambda m: stderr.print(m, highlight=False, markup=False))
    stdout.print(render_rich_table(result["comparison"]))
    stdout.print(render_config_table(result["comparison"]))
    stdout.print(f"Report: {result['report']}   wall time: {result['wall_seconds']:.1f} s", highlight=False)

"""`onestep demo`: the README's main job on the embedded default, ending in a result table."""

from __future__ import annotations

from pathlib import Path

import typer

from ..demo import DEMO_METRICS, DEMO_SAMPLES, DEMO_STEPS
from .common import reports_errors, stderr, stdout


@reports_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the runs, samples and report."),
    objectives: str = typer.Option("sim", "--objectives", help="Comma-separated objectives to distil with "
                                   "(sim, sid, dmd, di)."),
    steps: int = typer.Option(DEMO_STEPS, "--steps", min=1, help="Generator updates per objective (the CPU "
                              "budget; the digits presets train longer)."),
    num: int = typer.Option(DEMO_SAMPLES, "--num", min=2, help="Samples per model, seeds 0..N-1."),
    metrics: str = typer.Option(",".join(DEMO_METRICS), "--metrics", help="Image metrics to compare (fid runs at "
                                "5-8 images/s on a CPU)."),
):
    """Distil the shipped digits teacher with SIM, evaluate the student and the teacher's 35-NFE samples on the same
    seeds, and print the comparison."""
    from ..demo import run_demo
    from ..report import render_config_table, render_rich_table

    result = run_demo(out, [o.strip() for o in objectives.split(",") if o.strip()], steps, num,
                      [m.strip() for m in metrics.split(",") if m.strip()],
                      log=lambda m: stderr.print(m, highlight=False, markup=False))
    stdout.print(render_rich_table(result["comparison"]))
    if result["comparison"].config_differences:
        stdout.print(render_config_table(result["comparison"]))
    stdout.print(f"Report: {result['report'] / 'report.html'}   wall time: {result['wall_seconds']:.1f} s",
                 highlight=False)

"""`onestep demo`: the README's main job on the embedded default, ending in a result table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import MAX_SEEDS
from ..demo import DEMO_METRICS, DEMO_SAMPLES, DEMO_STEPS
from ..demo_t2i import T2I_METRICS, T2I_STEPS
from .common import info, output_folder, reports_errors, stdout


@reports_errors
def demo_command(
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the runs, samples and report (default "
                                       "runs/demo, or runs/demo-t2i with --t2i)."),
    objectives: str = typer.Option("sim", "--objectives", help="Comma-separated objectives to distil with "
                                   "(sim, sid, dmd, di; with --t2i: sim, sid, dmd)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help=f"Generator updates per objective (the CPU "
                                        f"budget; default {DEMO_STEPS}, or {T2I_STEPS} with --t2i)."),
    num: Optional[int] = typer.Option(None, "--num", min=1, max=MAX_SEEDS, help=f"Samples per model, seeds 0..N-1 "
                                      f"(default {DEMO_SAMPLES}); with --t2i, seeds per held-out prompt (default 1)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help=f"Image metrics to compare (default "
                                          f"{','.join(DEMO_METRICS)}, or {','.join(T2I_METRICS)} with --t2i; fid "
                                          "runs at 5-8 images/s on a CPU)."),
    t2i: bool = typer.Option(False, "--t2i", help="The text-to-image path instead: distil the shipped SD-style "
                             "digits teacher and score how well each model follows held-out prompts."),
):
    """Distil the shipped digits teacher with SIM, evaluate the student and the teacher's 35-NFE samples on the same
    seeds, and print the comparison (--t2i: the same for the text-to-image digits teacher and held-out prompts)."""
    from ..report import render_config_table, render_rich_table

    out = output_folder(out) if out is not None else None
    chosen = [o.strip() for o in objectives.split(",") if o.strip()]
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    if t2i:
        from ..demo_t2i import run_t2i_demo

        result = run_t2i_demo(out or Path("runs/demo-t2i"), chosen, steps or T2I_STEPS,
                              list(range(num or 1)), names or T2I_METRICS, log=info)
    else:
        from ..demo import run_demo

        result = run_demo(out or Path("runs/demo"), chosen, steps or DEMO_STEPS, num or DEMO_SAMPLES,
                          names or DEMO_METRICS, log=info)
    stdout.print(render_rich_table(result["comparison"]))
    if result["comparison"].config_differences:
        stdout.print(render_config_table(result["comparison"]))
    stdout.print(f"Report: {result['report'] / 'report.html'}   wall time: {result['wall_seconds']:.1f} s",
                 highlight=False)

"""`onestep export`: write a run's generator as a diffusers folder (text-to-image runs) or safetensors + JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import output_folder, print_json, reports_errors, stdout


@reports_errors
def export_command(
    source: Path = typer.Argument(..., help="Run directory or checkpoint folder."),
    out: str = typer.Option(..., "--out", help="New folder to write the export into."),
    format: str = typer.Option("diffusers", "--format", help="diffusers (a pipeline folder that runs the generator "
                               "in one step) or safetensors (weights + generator.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Export the (EMA) generator for inference outside onestep."""
    from ..export import export_run

    written = export_run(source, output_folder(out), format)
    if as_json:
        print_json(written)
    else:
        how = f" Load it with {written['call']}." if "call" in written else ""
        stdout.print(f"Wrote the step-{written['step']} generator as {written['format']} to {out}.{how}",
                     highlight=False)

"""`onestep export`: write a run's generator as a diffusers folder or LoRA adapter (text-to-image runs), or as
safetensors + JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import output_folder, print_json, reports_errors, stdout


@reports_errors
def export_command(
    source: Path = typer.Argument(..., help="Run directory or checkpoint folder."),
    out: str = typer.Option(..., "--out", help="New folder to write the export into."),
    format: str = typer.Option("diffusers", "--format", help="diffusers (a pipeline folder that runs the generator "
                               "in one step), lora (LoRA runs: the adapter alone, for the teacher's pipeline's "
                               "load_lora_weights, with the one-step scheduler and a README.md) or safetensors "
                               "(weights + generator.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Export the (EMA) generator for inference outside onestep."""
    from ..export import export_run

    written = export_run(source, output_folder(out), format)
    if as_json:
        print_json(written)
    else:
        if written["format"] == "lora":
            stdout.print(f"Wrote the step-{written['step']} generator's rank-{written['rank']} LoRA adapter for "
                         f"{written['teacher']} to {out}; its README.md shows how to load it.", highlight=False)
            return
        how = f" Load it with {written['call']}." if "call" in written else ""
        stdout.print(f"Wrote the step-{written['step']} generator as {written['format']} to {out}.{how}",
                     highlight=False)

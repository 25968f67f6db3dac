"""`onestep eval`: metrics of a run, checkpoint, sample folder or .npz, with provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..sampling import parse_seeds
from .common import print_json, reports_errors, stdout


@reports_errors
def eval_command(
    source: Path = typer.Argument(..., help="Run directory, checkpoint folder, samples folder or .npz."),
    metrics: str = typer.Option("swd,mode_coverage", "--metrics", help="Comma-separated metric names."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference: a run directory, preset or config naming the teacher."),
    num: Optional[int] = typer.Option(None, "--num", min=1, help="Samples to evaluate (generated, or the first N stored)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds to generate with (generator sources)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
):
    """Evaluate samples; runs keep the result under RUN/eval/."""
    from ..evaluation import evaluate, store_result

    names = [m.strip() for m in metrics.split(",") if m.strip()]
    result = evaluate(source, names, num, parse_seeds(seeds) if seeds else None, ref)
    store_result(result, source)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    if as_json:
        print_json(result)
        return
    table = Table(title=f"eval {source}", box=None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4g}")
    stdout.print(table)

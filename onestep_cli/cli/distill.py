"""`onestep distill`: resolve the config (preset, --config, --set), then train or resume a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_PRESET, config_to_yaml, resolve_config
from .common import print_json, reports_errors, stderr, stdout


@reports_errors
def distill_command(
    preset: Optional[str] = typer.Option(None, "--preset", help=f"Named recipe (default {DEFAULT_PRESET}); see `onestep presets`."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file merged over the preset."),
    overrides: list[str] = typer.Option([], "--set", help="key.path=value, applied last; repeatable."),
    out: Path = typer.Option(Path("runs/distill"), "--out", help="Run directory; an existing run there is resumed."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Processes (one per GPU)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the dry-run config) as JSON on stdout."),
):
    """Distil a teacher into a one-step generator (SIM, SiD, DMD or DI)."""
    config = resolve_config(preset, config_file, overrides)
    if dry_run:
        if as_json:
            print_json(config.model_dump(mode="json"))
        else:
            stdout.print(config_to_yaml(config), highlight=False, markup=False, end="")
        return
    if gpus > 1:
        raise RuntimeError(f"--gpus {gpus}: multi-process distillation is not available in this version yet; "
                           "run with --gpus 1.")
    from ..engine.loop import distill

    summary = distill(config, out, log=lambda m: stderr.print(m, highlight=False, markup=False))
    result = {"out": str(summary.out_dir), "step": summary.step, "kimg": summary.kimg,
              "wall_seconds": round(summary.wall_seconds, 3), "resumed_from": summary.resumed_from,
              "metrics": summary.final_metrics}
    if as_json:
        print_json(result)
    else:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary.final_metrics.items())
        stdout.print(f"Finished {summary.out_dir}: step {summary.step}, {summary.kimg:.1f} kimg, "
                     f"{summary.wall_seconds:.1f} s. {metrics}", highlight=False)

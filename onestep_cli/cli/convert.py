"""`onestep convert`: an EDM/SiD `.pkl` snapshot to safetensors + JSON, read without running code from the file."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import MissingFileError
from .common import output_folder, reports_errors, stdout


@reports_errors
def convert_command(
    snapshot: Path = typer.Argument(..., help="EDM or SiD network-snapshot .pkl."),
    out: str = typer.Argument(..., help="Output folder (model.safetensors + config.json)."),
    key: str = typer.Option("ema", "--key", help="Which network of the snapshot's dict to convert."),
):
    """Convert an EDM-format snapshot into model.safetensors + config.json."""
    from ..denoisers.edm import convert_snapshot

    if not snapshot.is_file():
        raise MissingFileError(f"Snapshot {snapshot} does not exist; pass the path of an EDM/SiD .pkl file.")
    written = convert_snapshot(snapshot, output_folder(out, "OUT"), key=key)
    stdout.print(f"Wrote {written}.", highlight=False)

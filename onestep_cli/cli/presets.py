"""`onestep presets`: list the shipped recipes, or show one."""

from __future__ import annotations

import typer
from rich.table import Table

from ..config import PRESET_DIR, list_presets, read_preset
from .common import reports_errors, stdout

presets_app = typer.Typer(help="List the shipped presets, or show one.", no_args_is_help=False)


@presets_app.callback(invoke_without_command=True)
def presets_list(ctx: typer.Context):
    """List presets, one line each."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("preset")
    table.add_column("description")
    for name, description in list_presets().items():
        table.add_row(name, description)
    stdout.print(table)


@presets_app.command("show")
@reports_errors
def presets_show(name: str = typer.Argument(..., help="Preset name.")):
    """Print one preset's YAML."""
    read_preset(name)  # Raises a did-you-mean error for unknown names.
    stdout.print((PRESET_DIR / f"{name}.yaml").read_text(), highlight=False, markup=False, end="")

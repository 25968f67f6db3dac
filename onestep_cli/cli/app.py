"""The Typer application: `onestep distill | sample | eval | compare | presets | demo`."""

from __future__ import annotations

import typer

from ..version import __version__
from .bench import bench_command
from .common import set_debug_option, set_quiet_option
from .compare import compare_command
from .convert import convert_command
from .demo import demo_command
from .distill import distill_command
from .eval import eval_command
from .export import export_command
from .presets import presets_app
from .sample import sample_command
from .weights import weights_app

app = typer.Typer(
    name="onestep",
    help="Distil pretrained diffusion models into one-step generators, then sample, evaluate and compare them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("distill")(distill_command)
app.command("sample")(sample_command)
app.command("eval")(eval_command)
app.command("compare")(compare_command)
app.command("demo")(demo_command)
app.command("convert")(convert_command)
app.command("export")(export_command)
app.command("bench")(bench_command)
app.add_typer(presets_app, name="presets")
app.add_typer(weights_app, name="weights")


def _version(value: bool):
    if value:
        print(f"onestep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version."),
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of every error, also of those "
                                     "reported as one sentence (as ONESTEP_DEBUG=1 does)."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info lines on stderr; results, "
                                     "warnings and errors still print.")):
    set_debug_option(debug)
    set_quiet_option(quiet)


def main():
    app()

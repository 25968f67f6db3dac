"""`onestep weights list | path | verify | fetch`: the files metrics load, in one cache (ONESTEP_HOME)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from .common import info, print_json, reports_errors, stderr, stdout

weights_app = typer.Typer(help="The metric weight cache (ONESTEP_HOME): list, path, verify, fetch.",
                          no_args_is_help=False, invoke_without_command=True)


def _keys(keys: Optional[List[str]], everything: bool = True) -> list[str]:
    from ..eval.weights import WEIGHT_SETS, get_weight_set

    if not keys:
        return list(WEIGHT_SETS) if everything else []
    return [get_weight_set(k).key for k in keys]


@weights_app.callback()
def _default(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        list_command(as_json=False)


@weights_app.command("list")
@reports_errors
def list_command(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Every weight set, the metrics that need it, and whether it is here."""
    from ..eval.weights import WEIGHT_SETS, status, weights_home

    rows = [status(key) for key in WEIGHT_SETS]
    if as_json:
        print_json({"home": str(weights_home()), "weights": rows})
        return
    table = Table(title=f"weights in {weights_home()}", box=None)
    for column in ("key", "metrics", "status", "size"):
        table.add_column(column, overflow="fold")
    for row in rows:
        state = {"cache": "[green]present[/]", "installed package": "[green]installed package[/]",
                 "missing": "[red]missing[/]"}[row["where"]]
        table.add_row(row["key"], ", ".join(row["metrics"]), state, f"~{row['approx_mb']:g} MB")
    stdout.print(table)
    stdout.print("`onestep weights path KEY` shows where files go; `onestep weights fetch KEY` downloads them.",
                 highlight=False)


@weights_app.command("path")
@reports_errors
def path_command(key: str = typer.Argument(..., help="Weight set key (see `onestep weights list`)."),
                 as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Where a weight set's files are (or must be put)."""
    from ..eval.weights import status

    row = status(_keys([key])[0])
    if as_json:
        print_json(row)
        return
    for f in row["files"]:
        stdout.print(f["path"], highlight=False, markup=False)
    if row["where"] == "installed package":
        stderr.print(f"(not in the cache; an installed copy is used: {row['installed_copy']})", highlight=False)


@weights_app.command("verify")
def verify_command(keys: Optional[List[str]] = typer.Argument(None, help="Weight sets (default: those present)."),
                   as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Hash the files and compare them with the expected SHA-256; exit 1 if any differs or is missing."""
    # typer.Exit is a RuntimeError, which reports_errors would turn into an error message: exit out here.
    if not _verify(keys, as_json):
        raise typer.Exit(1)


@reports_errors
def _verify(keys: Optional[List[str]], as_json: bool) -> bool:
    from ..eval.weights import status, verify

    chosen = _keys(keys)
    if not keys:
        chosen = [k for k in chosen if status(k)["available"]]
    reports = [verify(k) for k in chosen]
    if as_json:
        print_json({"ok": all(r["ok"] for r in reports), "weights": reports})
    else:
        table = Table(title="verify", box=None)
        for column in ("key", "file", "state", "sha256"):
            table.add_column(column, overflow="fold")
        for report in reports:
            for row in report["files"]:
                table.add_row(report["key"], row["file"], row["state"], (row.get("sha256") or "")[:16])
        stdout.print(table if reports else "No weight set is present; nothing to verify.")
    return all(r["ok"] for r in reports)


@weights_app.command("fetch")
@reports_errors
def fetch_command(keys: Optional[List[str]] = typer.Argument(None, help="Weight sets to download."),
                  everything: bool = typer.Option(False, "--all", help="Every weight set."),
                  force: bool = typer.Option(False, "--force", help="Download again even if present.")):
    """Download weight sets into the cache (needs internet; pinned hashes are checked, others recorded)."""
    from ..eval import MetricError
    from ..eval.weights import fetch

    if not keys and not everything:
        raise MetricError("Name the weight sets to fetch (see `onestep weights list`) or pass --all.")
    for key in _keys(keys if not everything else None):
        written = fetch(key, force=force, log=info)
        stdout.print(f"{key}: {len(written)} file(s) downloaded.", highlight=False)

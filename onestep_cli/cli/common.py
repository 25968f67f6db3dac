"""What every verb shares: consoles (results on stdout, everything else on stderr) and error reporting."""

from __future__ import annotations

import functools
import json

import typer
from rich.console import Console

from ..config import ConfigError
from ..runs.checkpoint import CheckpointError
from ..denoisers.edm import EDMLoadError
from ..eval import MetricError

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

# Errors a user can fix by changing the command line or the config: exit code 2. Anything else expected: 1.
USAGE_ERRORS = (ConfigError, MetricError)
RUN_ERRORS = (CheckpointError, EDMLoadError, FileNotFoundError, RuntimeError, ValueError)


def fail(message: str, code: int = 1):
    stderr.print(f"[bold red]Error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def reports_errors(fn):
    """Turn the library's expected errors into one sentence on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:  # click's Exit is a RuntimeError: let deliberate exits through untouched.
            raise
        except USAGE_ERRORS as exc:
            fail(_escape(str(exc)), 2)
        except RUN_ERRORS as exc:
            fail(_escape(str(exc)), 1)

    return wrapper


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_json(data) -> None:
    """Exactly one JSON object on stdout (for scripts)."""
    print(json.dumps(data, indent=1, default=str))

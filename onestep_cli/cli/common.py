"""What every verb shares: consoles (results on stdout, everything else on stderr) and error reporting."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback

import typer
from rich.console import Console

from ..errors import OnestepError

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

DEBUG_ENV = "ONESTEP_DEBUG"
REPORT_BUG = ("This is a bug in onestep or in a library it uses, not a mistake in the command: please report it with "
              "the traceback above and the output of `onestep --version`.")
REPORT_OOM = ("The GPU ran out of memory: a smaller batch (train.batch_gpu, --batch) or train.gradient_checkpointing "
              "may fit. If these sizes should fit, report it with the traceback above and the output of "
              "`onestep --version`.")


def fail(message: str, code: int = 1):
    stderr.print(f"[bold red]Error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


_debug_option = False  # `onestep --debug`, set by the app's callback on every invocation.


def set_debug_option(on: bool) -> None:
    global _debug_option
    _debug_option = on


def debug_enabled() -> bool:
    """`onestep --debug VERB ...` or ONESTEP_DEBUG=1: show the traceback of every error, a fixable one included."""
    return _debug_option or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def worker_command(command: list[str]) -> list[str]:
    """The command line a worker of `--gpus N` runs: `command`, with --debug when this process has it."""
    return ["--debug", *command] if debug_enabled() else list(command)


def reports_errors(fn):
    """Report what `fn` raises: an OnestepError (an error the user can fix) as its sentence alone on stderr with the
    error's exit code (2: change the command line or config; 1: anything else), any other exception (a bug here or in
    a library) with its traceback and how to report it, exit code 1. With --debug or ONESTEP_DEBUG=1 every error shows
    its traceback.

    In a multi-process run (torchrun, srun, --gpus N) every rank raises an OnestepError alike, so rank 0 alone prints
    it; the other ranks exit with 0, so that the launcher does not stop rank 0 before it has printed. Errors about one
    rank's own place in the launch (`every_rank = False`) and bugs are printed by the rank that raises them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # Deliberate exits and click's own usage errors (typer.Exit is a RuntimeError).
        except OnestepError as exc:
            debug = debug_enabled()
            if exc.every_rank and _worker_rank() not in (None, 0) and not debug:
                raise typer.Exit(0) from None  # Rank 0 raised the same error and prints it.
            if debug:
                traceback.print_exc(file=sys.stderr)
            fail(_escape(str(exc)), exc.exit_code)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            rank = _worker_rank()
            where = f"(rank {rank}) " if rank is not None else ""
            stderr.print(where + (REPORT_OOM if _out_of_memory(exc) else REPORT_BUG), highlight=False, markup=False)
            raise typer.Exit(1) from None

    return wrapper


def _worker_rank() -> int | None:
    """This process's rank when it is one of several processes of a launch (torchrun, srun, --gpus N), else None."""
    if not any(key in os.environ for key in ("RANK", "SLURM_PROCID")):  # Spares the torch import in one process.
        return None
    from ..runtime.distributed import launcher_env

    env = launcher_env()
    return env.rank if env is not None and env.world_size > 1 else None


def _out_of_memory(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" and type(error).__module__.startswith("torch")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_json(data) -> None:
    """Exactly one JSON object on stdout (for scripts)."""
    print(json.dumps(data, indent=1, default=str))

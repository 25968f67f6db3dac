"""What every verb shares: consoles (results on stdout, everything else on stderr), --quiet and error reporting."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console

from ..errors import OnestepError, UsageError
from ..jsonio import to_json

_results = None  # The stdout a verb started with, while it runs (see `reports_errors`); None outside verbs.


class _ResultStream:
    """Where results go: the stdout a running verb started with; sys.stdout, which the verb points at stderr so that
    no library's print or progress bar lands among its results, otherwise."""

    def _target(self):
        return _results if _results is not None else sys.stdout

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()


# Created at import, so that rich reads NO_COLOR (and the terminal size) as the process starts.
stdout = Console(file=_ResultStream(), soft_wrap=True)
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
_quiet_option = False  # `onestep --quiet`, likewise.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def set_debug_option(on: bool) -> None:
    global _debug_option
    _debug_option = on


def set_quiet_option(on: bool) -> None:
    """`onestep --quiet`: no progress bars or info lines (the hub's, transformers' and diffusers' included), only
    results, warnings and errors. The libraries read their settings when first imported, after this callback."""
    global _quiet_option
    _quiet_option = on
    if on:
        os.environ.update(QUIET_ENV)


def quiet() -> bool:
    return _quiet_option


def info(message: str) -> None:
    """A line about what the verb is doing, on stderr; --quiet drops it."""
    if not _quiet_option:
        stderr.print(message, highlight=False, markup=False)


def warn(message: str) -> None:
    """A warning or an error on stderr, printed even with --quiet."""
    stderr.print(message, highlight=False, markup=False)


def debug_enabled() -> bool:
    """`onestep --debug VERB ...` or ONESTEP_DEBUG=1: show the traceback of every error, a fixable one included."""
    return _debug_option or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def worker_command(command: list[str]) -> list[str]:
    """The command line a worker of `--gpus N` runs: `command`, with --debug and --quiet when this process has them."""
    return [*(["--debug"] if debug_enabled() else []), *(["--quiet"] if _quiet_option else []), *command]


def reports_errors(fn):
    """Report what `fn` raises: an OnestepError (an error the user can fix) as its sentence alone on stderr with the
    error's exit code (2: change the command line or config; 1: anything else), any other exception (a bug here or in
    a library) with its traceback and how to report it, exit code 1. With --debug or ONESTEP_DEBUG=1 every error shows
    its traceback.

    In a multi-process run (torchrun, srun, --gpus N) every rank raises an OnestepError alike, so rank 0 alone prints
    it; the other ranks exit with 0, so that the launcher does not stop rank 0 before it has printed. Errors about one
    rank's own place in the launch (`every_rank = False`) and bugs are printed by the rank that raises them.

    While `fn` runs, sys.stdout points at stderr: results reach the real stdout only through `stdout` and `print_json`,
    so that a library's print or progress bar never mixes into them (`onestep eval --json > result.json`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _results
        outer = _results
        _results = sys.stdout if outer is None else outer
        try:
            with contextlib.redirect_stdout(sys.stderr):
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
        finally:
            _results = outer

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


def output_folder(text: str, option: str = "--out") -> Path:
    """The folder an option names to write into: named (an empty name would mean the current folder) and a folder,
    new or existing, whose parents are folders too."""
    path = _named(text, option)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {text} is a file; name a folder (new or existing) to write into.")
    _check_parents(path, text, option)
    return path


def output_file(text: str, option: str = "--out") -> Path:
    """The file an option names to write: named, not a folder, with folders (new or existing) above it."""
    path = _named(text, option)
    if path.is_dir():
        raise UsageError(f"{option} {text} is a folder; name a file to write.")
    _check_parents(path, text, option)
    return path


def _named(text: str, option: str) -> Path:
    if not text.strip():
        raise UsageError(f"{option} is empty; name where to write (an empty name would mean the current folder).")
    return Path(text)


def _check_parents(path: Path, text: str, option: str) -> None:
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{option} {text} lies inside {blocking}, which is a file; choose another place.")


def print_json(data) -> None:
    """Exactly one JSON object on stdout (for scripts); NaN and infinities as null (jsonio.py)."""
    stream = _ResultStream()
    stream.write(to_json(data, indent=1) + "\n")
    stream.flush()

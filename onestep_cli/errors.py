"""The errors a user can fix, and how the CLI tells them from bugs.

An `OnestepError` is an error the user can fix: its message is one sentence naming the file, key or value at fault and
what to do about it. The CLI prints that sentence alone and exits with `exit_code`. Any other exception is a bug in
onestep or in a library it uses (a shape mismatch, CUDA running out of memory inside torch): the CLI shows its
traceback and says how to report it. `onestep --debug` or `ONESTEP_DEBUG=1` show the traceback of every error.

Each part of the package keeps its own subclasses (ConfigError, MetricError, CheckpointError...); the generic ones
below serve raise sites that have no more specific class. They also derive from the built-in exception that code
raised before (ValueError, FileNotFoundError, RuntimeError), so that `except ValueError` keeps catching them.

This module is the lowest layer: it imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path


class OnestepError(Exception):
    """An error the user can fix; its message is one sentence naming the file/key/value and what to do."""

    exit_code = 1  # The CLI's exit code: 2 for a command line or config to change (usage errors), 1 otherwise.
    # In a multi-process run every rank raises this error alike (same config, same files), so rank 0 alone prints it.
    # False for errors about one process's own place in the launch (its GPU), which only the rank that has it knows.
    every_rank = True


class UsageError(OnestepError, ValueError):
    """A command-line option or argument the command cannot use (exit code 2, like a config mistake)."""

    exit_code = 2


class InputError(OnestepError, ValueError):
    """Data the user gave (images, labels, prompts, a file's contents) that the operation cannot use."""


class MissingFileError(OnestepError, FileNotFoundError):
    """A file or folder the user named does not exist; the message names it and what was expected there."""


class DeviceError(OnestepError, RuntimeError):
    """The device or precision asked for is not available on this machine (no CUDA device, too few GPUs)."""


class LaunchError(DeviceError):
    """This process's place in a multi-process launch does not work (no GPU for its local rank, no rendezvous
    address); the other ranks may not share it, so the rank that raises it prints it."""

    every_rank = False



class DiskFullError(OnestepError, OSError):
    """A write refused for lack of disk space or quota; the message names the folder and says to free space there.

    The disk may be one node's own, so the rank that meets it prints it."""

    every_rank = False


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or an error it wraps, is a write refused for lack of space or quota: an OSError, or one that a
    library reports as text (safetensors: `... (os error 28)`) or per rank (torch.distributed.checkpoint)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if any(f"(os error {code})" in str(error) for code in NO_SPACE):
            return True
        failures = getattr(error, "failures", None)  # CheckpointException: {rank: error or (error, traceback)}.
        if isinstance(failures, dict) and any(is_out_of_space(f[0] if isinstance(f, tuple) else f)
                                              for f in failures.values()):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_space(folder: Path, what: str, advice: str):
    """Turn a write inside the block that fails for lack of space into a DiskFullError naming `folder` and `what` was
    being written, followed by `advice` (what is intact, what to run once space is freed)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_out_of_space(error):
            raise
        raise DiskFullError(f"The disk of {folder} is full (no space left, or the quota is used up): writing {what} "
                            f"failed. {advice}") from error

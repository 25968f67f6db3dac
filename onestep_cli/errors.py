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


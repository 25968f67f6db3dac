"""The run directory's lock: one process at a time trains in a run directory (two would interleave their records and
delete each other's checkpoints)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import OnestepError

LOCK_FILE = ".lock"
# Set by the `--gpus` launcher for its workers: the run directory whose lock it holds for them.
LOCK_HELD_ENV = "ONESTEP_RUN_LOCK_HELD"


class RunInUseError(OnestepError, RuntimeError):
    """Another process holds the run directory's lock: two runs writing one folder would interleave and delete each
    other's checkpoints."""


class RunLock:
    """The run directory's lock file, held with flock for a run's life by the one process that owns the run (one
    process, or the `--gpus` launcher, or rank 0 under torchrun/srun).

    The kernel releases a flock when its holder dies, however it dies, so a lock left by a killed run is taken over
    at once; the file only records who holds it (PID, host, start time) for the message a second run prints."""

    def __init__(self, folder: Path, warn=print):
        self.folder, self.warn = Path(folder), warn
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunInUseError(
                    f"{self.folder} is in use by another onestep run ({holder}); two runs in one folder would mix "
                    "their records and delete each other's checkpoints. Wait for it to finish or stop it, or pass "
                    "another --out.") from None
            except OSError as error:  # A file system without locks (some NFS or Lustre mounts).
                os.close(fd)
                self.warn(f"Warning: {self.path} cannot be locked ({error.strerror}); nothing stops a second run "
                          "from using this folder at the same time.")
                return
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # Locked a file its previous holder removed on release: lock the one on disk now.
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # A run that failed before writing anything leaves no folder behind.
            self.folder.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"PID {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its PID is not recorded yet"


@contextlib.contextmanager
def lock_for_workers(folder: Path, warn=print):
    """Hold `folder`'s lock inside the block for the processes started in it (the `--gpus` workers), which learn so
    from their environment."""
    with RunLock(folder, warn):
        previous = os.environ.get(LOCK_HELD_ENV)
        os.environ[LOCK_HELD_ENV] = str(Path(folder).resolve())
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCK_HELD_ENV, None)
            else:
                os.environ[LOCK_HELD_ENV] = previous


def lock_held_for_me(folder: Path) -> bool:
    """Whether the `--gpus` launcher that started this process holds `folder`'s lock for it."""
    return os.environ.get(LOCK_HELD_ENV) == str(Path(folder).resolve())

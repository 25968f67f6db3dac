"""Workers of `--gpus N` die with their launcher.

torch.distributed.run starts each worker in a session of its own, so a launcher killed with SIGKILL (the OOM killer,
`kill -9`, a scheduler) leaves its workers re-parented to PID 1, training unsupervised and colliding with a rerun.
The launcher exports its PID; each worker, first thing, asks Linux to SIGKILL it when that parent dies
(prctl PR_SET_PDEATHSIG). SIGKILL, not SIGTERM: a launcher killed outright is a job killed outright, and checkpoints
are atomic, so a rerun resumes from the newest complete one.

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

LAUNCHER_PID_ENV = "ONESTEP_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def launcher_environment() -> dict[str, str]:
    """What the launcher adds to its workers' environment: its own PID."""
    return {LAUNCHER_PID_ENV: str(os.getpid())}


def die_with_launcher(environ=os.environ) -> bool:
    """In a worker started by `--gpus N`: be SIGKILLed when the launcher dies; exit now if it already has.

    Returns whether the parent-death signal is set. Removes the variable, so that processes this worker starts
    (another onestep command, data loaders) are not tied to a launcher that is not their parent."""
    launcher = environ.pop(LAUNCHER_PID_ENV, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != int(launcher):  # The launcher died before the signal was set: nobody would deliver it.
        os._exit(128 + int(signal.SIGKILL))
    return True

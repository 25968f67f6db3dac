"""Preemption: SIGTERM or SIGUSR1 asks the run to finish its step, checkpoint and exit cleanly.

Clusters send SIGTERM (Slurm, Kubernetes) or a chosen signal such as SIGUSR1 (`sbatch --signal=USR1@120`) some time
before they kill a job. The handler only records the request; the loop acts on it between steps, so a step and a
checkpoint are never cut in half by it. SIGKILL cannot be caught: atomic checkpoints cover that case.
"""

from __future__ import annotations

import signal
import threading

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context manager that installs the handlers and restores the previous ones on exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there.
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

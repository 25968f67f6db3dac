"""Stopping a run cleanly: SIGTERM, SIGUSR1, SIGINT (Ctrl-C) or SIGHUP asks it to finish its step, checkpoint and exit.

Clusters send SIGTERM (Slurm, Kubernetes) or a chosen signal such as SIGUSR1 (`sbatch --signal=USR1@120`) some time
before they kill a job; Ctrl-C and a closed terminal (SIGHUP) mean the same at a desk. The handler only records the
request; the loop acts on it between steps, so a step and a checkpoint are never cut in half by it. In one process a
second Ctrl-C stops at once, without the checkpoint. A signal the parent process set to be ignored (SIGHUP under
`nohup`, SIGINT in a shell's background job) stays ignored. SIGKILL cannot be caught: atomic checkpoints cover it.
"""

from __future__ import annotations

import signal
import threading

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP)  # Left ignored where the parent process ignores them.


class StopRequest:
    """Context manager that installs the handlers and restores the previous ones on exit.

    `second_interrupt_aborts`: a second SIGINT raises KeyboardInterrupt (off in a process of a launch, which gets
    Ctrl-C twice: from the terminal and forwarded by the launcher)."""

    def __init__(self, second_interrupt_aborts: bool = True, notify=None):
        self.signal_name: str | None = None
        self.second_interrupt_aborts = second_interrupt_aborts
        self.notify = notify  # Called with the signal's name when the first request arrives.
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT and self.second_interrupt_aborts:
                raise KeyboardInterrupt
            return
        self.signal_name = name
        if self.notify is not None:
            self.notify(name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there.
            for sig in PREEMPTION_SIGNALS:
                if sig in TERMINAL_SIGNALS and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""What the engine shows while it runs: a rich progress bar on a terminal, one plain status line per tick otherwise.

Both go to stderr, the bar included: stdout carries results only (`onestep distill --json > out.json`)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


def format_status(record: dict) -> str:
    return (f"step {record['step']:>7d}  kimg {record['kimg']:9.2f}  loss_gen {record['loss_generator']:+.4e}  "
            f"loss_fake {record['loss_fake']:.4e}  kimg/s {record['kimg_per_s']:7.2f}  "
            f"s/step {record['seconds_per_step']:.4f}")


class Progress:
    """Context manager; `tick(step, record)` advances the bar or prints a status line."""

    def __init__(self, total: int, start: int, enabled: bool | None = None, log=print):
        self.console = Console(stderr=True)  # Created here, so that it honours NO_COLOR and the stderr of the moment.
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.log, self.total, self.start = log, total, start
        self.bar = None

    def __enter__(self):
        if self.enabled:
            self.bar = RichProgress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                    TextColumn("{task.fields[status]}"), console=self.console, transient=False)
            self.bar.start()
            self.task = self.bar.add_task("distill", total=self.total, completed=self.start, status="")
        return self

    def note(self, message: str) -> None:
        """What the run is doing between ticks (compiling its first step): in the bar's status, or as a line."""
        if self.bar is not None:
            self.bar.update(self.task, status=message)
        else:
            self.log(message)

    def tick(self, step: int, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step,
                            status=f"loss_gen {record['loss_generator']:+.3e} kimg/s {record['kimg_per_s']:.2f}")
        else:
            self.log(format_status(record))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

"""Experiment trackers, the `logging:` section: TensorBoard event files in RUN/tensorboard/ and a Weights & Biases run,
both optional and off by default.

Rank 0 sends each stats.jsonl record (every tick) as `train/<key>` and each in-training evaluation's metrics as
`eval/<metric>`, keyed by the step. A resumed run appends: TensorBoard drops the events the earlier process wrote
after the checkpoint resumed from (its purge_step, as stats.jsonl drops those rows), and W&B continues the same run
(its id is kept in RUN/wandb/onestep-run-id) and ignores the steps it already has. The loop writes no sample grids
during training, so there are none to send.
"""

from __future__ import annotations

import importlib
import numbers
import secrets
from pathlib import Path

from ..config import LoggingConfig, RunConfig
from ..errors import OnestepError

TENSORBOARD_DIR = "tensorboard"  # In the run directory.
WANDB_ID = Path("wandb") / "onestep-run-id"  # In the run directory, beside the files wandb itself writes there.


class TrackerError(OnestepError, RuntimeError):
    """A tracker that `logging:` asks for cannot be used (its package is not installed)."""


def check_trackers(config: LoggingConfig) -> None:
    """Fail before any work when a configured tracker's package cannot be imported."""
    if config.tensorboard:
        _summary_writer()
    if config.wandb is not None:
        _wandb(config)


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise TrackerError(f"logging.tensorboard is true but TensorBoard cannot be imported ({error}); install it "
                           "with `pip install tensorboard`, or set logging.tensorboard=false.") from None
    return SummaryWriter


def _wandb(config: LoggingConfig):
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise TrackerError(f"logging.wandb is set (project {config.wandb.project!r}) but the wandb package is not "
                           "installed; install it with `pip install wandb` and log in (`wandb login`), or remove "
                           "logging.wandb.") from None


class Trackers:
    """The trackers of one process (none off rank 0 or when none is configured); closes them as a context manager."""

    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard = tensorboard  # A torch.utils.tensorboard.SummaryWriter, or None.
        self.wandb_run = wandb_run  # A wandb Run, or None.

    def log_stats(self, record: dict) -> None:
        """One stats.jsonl record, as `train/<key>` at its step."""
        self._log(record["step"], record, "train")
        if self.tensorboard is not None:
            self.tensorboard.flush()  # Ticks are sparse: a killed run keeps its events up to the last one.

    def log_metrics(self, step: int, metrics: dict) -> None:
        """An in-training evaluation's metrics, as `eval/<metric>` at `step`."""
        self._log(step, metrics, "eval")

    def _log(self, step: int, values: dict, prefix: str) -> None:
        scalars = {f"{prefix}/{key}": float(value) for key, value in values.items()
                   if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        """Flush and close; `failed` marks the W&B run as failed (an exception ended the loop)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)


def open_trackers(config: RunConfig, run_dir: Path, resumed_from: int | None, enabled: bool = True) -> Trackers:
    """The trackers of `config.logging` for the run in `run_dir` (none unless `enabled`: rank 0). `resumed_from`: the
    step of the checkpoint the run resumed from; None: it starts at step 0, and earlier events are dropped."""
    logging, run_dir = config.logging, Path(run_dir)
    if not enabled:
        return Trackers()
    tensorboard = wandb_run = None
    if logging.tensorboard:
        # Events at or after purge_step that an earlier process wrote are hidden: rows past the checkpoint resumed.
        purge_step = resumed_from + 1 if resumed_from is not None else 0
        tensorboard = _summary_writer()(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)
    if logging.wandb is not None:
        wandb = _wandb(logging)
        id_file = run_dir / WANDB_ID
        if resumed_from is None or not id_file.is_file():  # A run that starts at step 0 is a new W&B run.
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(4) + "\n")
        try:
            wandb_run = wandb.init(project=logging.wandb.project, entity=logging.wandb.entity,
                                   name=logging.wandb.name or run_dir.resolve().name, dir=str(run_dir),
                                   id=id_file.read_text().strip(), resume="allow")
            # A resumed run may have changed resumable keys (train.max_steps...): W&B refuses those unless allowed.
            wandb_run.config.update(config.model_dump(mode="json"), allow_val_change=True)
        except Exception as error:  # Not logged in, no network, an unknown entity: wandb's own exception types.
            if tensorboard is not None:
                tensorboard.close()
            raise TrackerError(f"W&B could not start the run of logging.wandb (project {logging.wandb.project!r}): "
                               f"{error}. Log in with `wandb login`, set WANDB_MODE=offline to log locally, or "
                               "remove logging.wandb.") from error
    return Trackers(tensorboard, wandb_run)

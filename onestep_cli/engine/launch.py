"""`--gpus N` / `--nnodes`: re-run the same command under torch.distributed.run, one worker process per GPU.

This process becomes torchrun's agent: it starts the workers (which join the group through distributed.init),
forwards SIGTERM/SIGUSR1/SIGINT/SIGHUP to them and turns their outcome into one exit code. On node 0 it holds the run
directory's lock for the workers' whole life.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..errors import DeviceError
from ..runtime.lifeline import LAUNCHER_PID_ENV, launcher_environment
from .parallel import batch_split, check_reshard_after_forward
from ..runs.lock import lock_for_workers
from ..runs.run_dir import RunDir
from .signals import PREEMPTION_SIGNALS as STOP_SIGNALS

# Seconds torch.distributed.run gives workers to checkpoint and exit after forwarding a stop signal to them.
SHUTDOWN_TIMEOUT_S = 600
PREEMPTION_SIGNALS = tuple(sig.name for sig in STOP_SIGNALS)


def torchrun_accepts(option: str) -> bool:
    """Whether this torch's torch.distributed.run knows `option`."""
    from torch.distributed.run import get_args_parser

    return any(option in action.option_strings for action in get_args_parser()._actions)


@dataclass(frozen=True)
class LaunchPlan:
    """How `--gpus/--nnodes/--node-rank/--master-addr/--master-port` become a torch.distributed.run command."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        if self.node_rank >= self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes} (nodes count "
                              "from 0).")
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}"]
        # Both options are newer than some torch releases still in use (2.11 lacks --shutdown-timeout).
        if torchrun_accepts("--signals-to-handle"):
            args.append("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
        if torchrun_accepts("--shutdown-timeout"):
            args.append(f"--shutdown-timeout={os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', SHUTDOWN_TIMEOUT_S)}")
        if self.nnodes == 1 and self.master_addr is None:
            return args + ["--standalone"]  # A free local port, so runs side by side do not collide.
        if self.master_addr is None:
            raise ConfigError(f"--nnodes {self.nnodes} needs --master-addr (the hostname of node 0, reachable from "
                              "every node) and the same --master-port on every node.")
        return args + [f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                       f"--master-port={self.master_port or 29500}"]


def check_devices(plan: LaunchPlan, device_choice: str, warn, option: str = "train.device") -> None:
    """Refuse more processes than GPUs on this node; say so when the processes will run on CPU with gloo.

    `option` names where `device_choice` came from: a config key (set with --set) or a command-line flag."""
    if device_choice != "cpu" and torch.cuda.is_available():
        if plan.nproc_per_node > torch.cuda.device_count():
            raise DeviceError(f"--gpus {plan.nproc_per_node} asks for more GPUs than the {torch.cuda.device_count()} "
                              "visible on this node; lower --gpus or check CUDA_VISIBLE_DEVICES.")
        return
    if device_choice == "cuda":
        setting = option if option.startswith("--") else f"--set {option}"
        raise DeviceError(f"{option} is 'cuda' but no CUDA device is visible; use {setting}=cpu or auto.")
    reason = f"{option} is cpu" if device_choice == "cpu" else "no CUDA device is visible"
    warn(f"Warning: {reason}, so --gpus {plan.nproc_per_node} starts {plan.nproc_per_node} CPU processes "
         "communicating over gloo (useful for testing, not for speed).")


RESUME_ADVICE = "Fix its cause and run the same command again: it resumes from the newest complete checkpoint."


def run_torchrun(plan: LaunchPlan, command: list[str], log, task: str = "the distillation",
                 advice: str = RESUME_ADVICE) -> tuple[int, str | None]:
    """Run `python -m onestep_cli <command>` under torch.distributed.run in this process (it becomes the agent).

    Returns (exit code, name of the signal that stopped the run or None). On a signal the agent forwards it to the
    workers and waits for them (SHUTDOWN_TIMEOUT_S) before returning. A failed worker is reported as "`task` failed
    on rank ...", followed by `advice`.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args([*plan.torchrun_args(), "--module", "onestep_cli"])
    # Set after parsing: torchrun's parser would take the command's options for abbreviations of its own (--num).
    args.training_script_args = list(command)
    os.environ.update(launcher_environment())  # Each worker dies with this process (runtime/lifeline.py).
    try:
        run(args)
    except SignalException as exc:
        return 128 + int(exc.sigval), exc.sigval.name
    except ChildFailedError as exc:
        log(f"Error: {failure_sentence(exc.failures, task)} {advice}")
        return 1, None
    finally:
        os.environ.pop(LAUNCHER_PID_ENV, None)
    return 0, None


def failure_sentence(failures: dict, task: str) -> str:
    """Why the workers stopped, from torchrun's {rank: ProcessFailure}: the ranks that failed first, not those the
    agent then stopped with SIGTERM. A worker killed by a signal (SIGKILL from the OOM killer or `kill -9`) printed
    nothing, so the sentence says so; one that exited with an error printed it above."""
    causes = {rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    killed = [f"rank {rank} was killed by {f.signal_name()}" for rank, f in sorted(causes.items()) if f.exitcode < 0]
    exited = [f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(causes.items()) if f.exitcode >= 0]
    parts = []
    if exited:
        parts.append(f"{task} failed on {', '.join(exited)}; the first error is printed above")
    if killed:
        parts.append(f"{task} stopped because {', '.join(killed)} (a signal from outside, such as the out-of-memory "
                     "killer or `kill -9`; it leaves no error message)")
    others = sorted(set(failures) - set(causes))
    stopped = f", and the launcher stopped rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}" \
        if others else ""
    return "; ".join(parts) + stopped + "."


def launch(config: RunConfig, out: Path, plan: LaunchPlan, command: list[str], log) -> int:
    """Validate the layout, run `command` on every GPU of the plan and return the command's exit code: 0 when the
    workers finished, or stopped on SIGTERM/SIGUSR1/SIGINT/SIGHUP after writing a checkpoint.

    The config, the files it names and the teacher (downloaded here if it is a hub id not yet cached) are checked
    once, in this process, before any rank starts: an error is printed once, not once per rank."""
    from ..runs.networks import check_teacher
    from .loop import check_inputs

    batch_split(config.train, plan.world_size)
    if config.train.parallelism == "fsdp":  # Under auto the workers may pick DDP, which ignores it.
        check_reshard_after_forward(config.train.fsdp_reshard_after_forward, plan.world_size)
    check_inputs(config)
    check_teacher(config)
    check_devices(plan, config.train.device, warn=log)
    with lock_for_workers(out, warn=log) if plan.node_rank == 0 else contextlib.nullcontext():
        code, signal_name = run_torchrun(plan, command, log)
    if signal_name is None:
        return code
    status = RunDir(out).read_status()
    if signal_name in PREEMPTION_SIGNALS and status.get("status") == "stopped":
        log(f"Stopped by {signal_name} after step {status.get('step')}, with a checkpoint: run the same command to "
            "continue.")
        return 0
    log(f"Error: interrupted by {signal_name} before the workers could write a checkpoint; run the same command to "
        "resume from the newest complete one.")
    return code

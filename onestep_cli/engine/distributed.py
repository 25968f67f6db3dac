"""The one place that sets up torch.distributed: launcher detection, process-group init, relaunch, rank-0 printing.

A run is a group of `world_size` processes, one per GPU (or CPU processes on gloo for testing), started by
torchrun (launch.py relaunches `--gpus N` under it) or by Slurm's srun; each process joins the group those launchers
describe in the environment (RANK/WORLD_SIZE/LOCAL_RANK, or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID).
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Seconds a collective may wait for the slowest rank (a checkpoint of a large model, an evaluation on rank 0).
COLLECTIVE_TIMEOUT_S = 3600


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run: global rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistEnv()


def launcher_env(environ=os.environ) -> DistEnv | None:
    """The rank layout set by torchrun or by srun, or None when no launcher started this process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    # srun sets SLURM_STEP_ID; a batch script's own shell also sees SLURM_PROCID/SLURM_NTASKS but is one process.
    if "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)))
    return None


def current() -> DistEnv:
    """This process's place in an initialised process group (the single-process layout otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _slurm_rendezvous(environ) -> None:
    """Fill MASTER_ADDR/MASTER_PORT for srun-started ranks: the first node of the step, a port derived from the job."""
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   check=True).stdout.split()
        except (OSError, subprocess.CalledProcessError):
            hosts = []
        if not hosts:
            raise RuntimeError(f"Could not resolve the first node of SLURM node list '{nodelist}' with scontrol; "
                               "export MASTER_ADDR=<hostname of the first node> in the job script.")
        environ["MASTER_ADDR"] = hosts[0]
    # One port per job, so two jobs sharing a node do not collide.
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    environ.setdefault("RANK", environ["SLURM_PROCID"])
    environ.setdefault("WORLD_SIZE", environ["SLURM_NTASKS"])
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))


def init(device_choice: str) -> tuple[DistEnv, torch.device, bool]:
    """Join the launcher's process group if there is one (compute_init); returns (env, device, initialised here).

    NCCL on CUDA with one GPU per local rank; gloo on CPU. Without a launcher this is the single-process layout.
    """
    from .precision import resolve_device

    device = resolve_device(device_choice)
    if dist.is_available() and dist.is_initialized():  # The caller set up the group itself.
        env = current()
        return env, _local_device(device, env), False
    env = launcher_env()
    if env is None or env.world_size == 1:
        return SINGLE, device, False
    if "RANK" not in os.environ:  # Started by srun, not torchrun: derive the rendezvous torch expects.
        _slurm_rendezvous(os.environ)
    device = _local_device(device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return env, device, True


def _local_device(device: torch.device, env: DistEnv) -> torch.device:
    """This rank's GPU: the one with its local rank, or the only one visible (Slurm's --gpus-per-task=1)."""
    if device.type != "cuda" or not env.is_distributed:
        return device
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if env.local_rank >= count:
        raise RuntimeError(f"Local rank {env.local_rank} has no GPU: only {count} are visible on this node. Start "
                           "one process per GPU (--gpus N, or srun --ntasks-per-node=N).")
    return torch.device("cuda", env.local_rank)


def shutdown(initialised_here: bool) -> None:
    if initialised_here and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives that are no-ops in a single process -------------------------------------------------------------


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); returns the tensor."""
    if env.is_distributed:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True when `flag` is true on at least one rank (every rank gets the same answer)."""
    if not env.is_distributed:
        return bool(flag)
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(fn, env: DistEnv):
    """Run `fn` on rank 0 only and give every rank its result, or raise its exception on every rank."""
    if not env.is_distributed:
        return fn()
    outcome = (None, None)
    if env.is_main:
        try:
            outcome = (fn(), None)
        except Exception as exc:  # Re-raised below on every rank, so no rank waits for a collective forever.
            outcome = (None, exc)
    result, error = broadcast_object(outcome, env)
    if error is not None:
        raise error
    return result


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.is_distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def print0(env: DistEnv, log):
    """`log` on rank 0, a no-op elsewhere: only rank 0 prints."""
    return log if env.is_main else (lambda message: None)

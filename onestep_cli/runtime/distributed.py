"""The one place that sets up torch.distributed: launcher detection, process-group init, relaunch, rank-0 printing.

A run is a group of `world_size` processes, one per GPU (or CPU processes on gloo for testing), started by
torchrun (launch.py relaunches `--gpus N` under it) or by Slurm's srun; each process joins the group those launchers
describe in the environment (RANK/WORLD_SIZE/LOCAL_RANK, or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID).
"""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import LaunchError, OnestepError

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
            raise LaunchError(f"Could not resolve the first node of SLURM node list '{nodelist}' with scontrol; "
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
        raise LaunchError(f"Local rank {env.local_rank} has no GPU: only {count} are visible on this node. Start "
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
        if env.is_main or isinstance(error, OnestepError):
            raise error
        raise PeerFailure(f"Rank 0 failed: {type(error).__name__}: {error}")  # A bug: rank 0 prints its traceback.
    return result


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.is_distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class PeerFailure(OnestepError, RuntimeError):
    """Raised by `gather_rows` on ranks other than 0 when a rank failed, and by `on_main` when rank 0 hit a bug; rank 0
    raises (and reports) that error.

    An OnestepError although it is not the cause: it stands for an error that rank 0 reports, as a sentence or, for a
    bug, with its traceback (the failing rank has printed its own), so the rank raising it only has to exit quietly.
    """


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # An exception type that cannot cross processes: keep its sentence, and whether it is a bug.
        if isinstance(error, OnestepError):
            return OnestepError(str(error))
        return RuntimeError(f"{type(error).__name__}: {error}")


def gather_rows(arrays: dict[str, np.ndarray] | Exception, env: DistEnv) -> dict[str, np.ndarray] | None:
    """Every rank's arrays, concatenated along the first axis in rank order, on rank 0; None on the other ranks.

    Shards may be uneven or empty (an empty one may have any width). A rank that failed passes its exception instead:
    then rank 0 raises the error of the lowest failed rank and the others raise PeerFailure, so no rank waits for a
    collective that never comes. In a single process this returns `arrays` (or raises it).
    """
    if not env.is_distributed:
        if isinstance(arrays, Exception):
            raise arrays
        return arrays
    failed = isinstance(arrays, Exception)
    header = _picklable(arrays) if failed else {key: (a.shape, a.dtype.str) for key, a in arrays.items()}
    headers = all_gather_object((failed, header), env)
    errors = [(rank, error) for rank, (is_error, error) in enumerate(headers) if is_error]
    if failed and not env.is_main and not isinstance(arrays, OnestepError):
        # A bug, not an input to fix: its traceback exists only in this process, so print it before rank 0 reports it.
        print(f"Rank {env.rank} failed with this error; rank 0 reports it:", file=sys.stderr)
        traceback.print_exception(type(arrays), arrays, arrays.__traceback__, file=sys.stderr)
    if errors:
        rank, error = errors[0]
        if env.is_main:
            raise arrays if rank == env.rank else error  # Its own error with its traceback, or a copy of another's.
        raise PeerFailure(f"Rank {rank} failed: {error}")
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = {}
    for key in headers[0][1]:
        shapes = [shards[key][0] for _, shards in headers]
        rows = [shape[0] for shape in shapes]
        full = next((rank for rank, count in enumerate(rows) if count), 0)  # Every rank sends this width, padded.
        width, dtype = shapes[full][1:], torch.from_numpy(np.empty(0, headers[full][1][key][1])).dtype
        padded = torch.zeros((max(rows), *width), dtype=dtype, device=device)
        if rows[env.rank]:
            padded[:rows[env.rank]] = torch.from_numpy(np.ascontiguousarray(arrays[key])).to(device)
        parts = [torch.empty_like(padded) for _ in range(env.world_size)] if env.is_main else None
        dist.gather(padded, parts, dst=0)
        if env.is_main:
            gathered[key] = np.concatenate([part[:count].cpu().numpy() for part, count in zip(parts, rows)])
    return gathered if env.is_main else None


def print0(env: DistEnv, log):
    """`log` on rank 0, a no-op elsewhere: only rank 0 prints."""
    return log if env.is_main else (lambda message: None)

"""Data parallelism for the three networks: DDP when they fit one GPU, FSDP2 (`fully_shard`) when they don't.

DDP keeps a full replica per rank and all-reduces gradients; FSDP2 shards parameters, gradients and optimizer state
over the ranks, block by block, gathering each block's parameters (in the mixed-precision dtype) only for its
forward and backward. The frozen teacher is sharded too under FSDP. Gradient checkpointing recomputes each block's
activations in backward instead of storing them.

How the all-gathers overlap with compute is set by train.fsdp_reshard_after_forward (free each block's gathered
parameters after its forward, keep them for the backward, or keep them sharded over a smaller group) and
train.fsdp_prefetch (FSDP2's implicit prefetching, or the next N blocks' all-gathers issued explicitly); neither
changes the maths.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..runtime.distributed import DistEnv
from ..denoisers.blocks import blocks
from ..runtime.precision import param_dtype

# `parallelism: auto` shards with FSDP when the estimated training state takes more than this share of one GPU,
# leaving the rest for activations (SiD/SIM backpropagate through three networks).
FSDP_MEMORY_FRACTION = 0.4


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_state_bytes(teacher: nn.Module, generator: nn.Module, fake: nn.Module, ema: bool) -> int:
    """float32 weights, gradients and two Adam moments for generator and fake; the EMA copy; the teacher's weights."""
    trainable = parameter_count(generator) + parameter_count(fake)
    return 16 * trainable + 4 * parameter_count(generator) * ema + 4 * parameter_count(teacher)


def resolve_parallelism(choice: str, device: torch.device, state_bytes: int, resumed: str | None) -> str:
    """'ddp' or 'fsdp'. `auto` keeps what a resumed checkpoint used, else shards only what would not fit a GPU."""
    if choice != "auto":
        return choice
    if resumed is not None:
        return resumed
    if device.type != "cuda":
        return "ddp"
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if state_bytes > FSDP_MEMORY_FRACTION * total else "ddp"


def per_process_batch(batch_size: int, world_size: int, grad_accumulation: int) -> int:
    """The micro-batch one process computes at a time: global batch / (processes x accumulation rounds)."""
    rounds = world_size * grad_accumulation
    if batch_size % rounds:
        low, high = batch_size // rounds * rounds, (batch_size // rounds + 1) * rounds
        raise ConfigError(
            f"train.batch_size {batch_size} (the global batch) must be divisible by processes x "
            f"train.grad_accumulation = {world_size} x {grad_accumulation} = {rounds}; use {high}"
            + (f" or {low}" if low else "") + ", or change --gpus or train.grad_accumulation.")
    return batch_size // rounds


def accumulation_rounds(batch_size: int, world_size: int, grad_accumulation: int, batch_gpu: int | None) -> int:
    """Micro-batches per update on each process: train.grad_accumulation, or derived from train.batch_gpu as EDM
    does (the per-process share split into micro-batches of at most batch_gpu)."""
    share = per_process_batch(batch_size, world_size, 1)
    if batch_gpu is None or batch_gpu >= share:
        return grad_accumulation
    if share % batch_gpu:
        raise ConfigError(
            f"train.batch_gpu {batch_gpu} must divide each process's share of the batch, train.batch_size / "
            f"processes = {batch_size} / {world_size} = {share}; use a divisor of {share} such as "
            f"{max(d for d in range(1, batch_gpu + 1) if share % d == 0)}.")
    return share // batch_gpu


def batch_split(train, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation rounds) of each process for a `train:` config; a ConfigError if they do not divide."""
    rounds = accumulation_rounds(train.batch_size, world_size, train.grad_accumulation, train.batch_gpu)
    return per_process_batch(train.batch_size, world_size, rounds), rounds


@dataclass
class Wrapped:
    """The modules the training step calls: `*_train` carry the gradient synchronisation (DDP or FSDP)."""

    generator_train: nn.Module
    fake_train: nn.Module
    sharded: bool  # FSDP: every rank must take part in every forward (evaluation and export included).
    units: tuple[nn.Module, ...] = ()  # FSDP: every sharded module (blocks and roots) of every network.

    def reshard(self) -> None:
        """Free the parameters FSDP2 keeps gathered after a forward that no backward followed (the roots' always,
        every block's under train.fsdp_reshard_after_forward=false), so that none outlives its update: the next
        forward gathers current values, with the requires_grad the update left (a frozen network's, during the
        other network's update, would otherwise stay frozen), and an in-place update (the EMA's) reaches the shards."""
        for unit in self.units:
            unit.reshard()


def enable_gradient_checkpointing(network: nn.Module) -> None:
    """Recompute each block's activations during backward (composable API: parameter names are unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in blocks(network):
        checkpoint(block)


def check_reshard_after_forward(reshard_after_forward: bool | int, world_size: int) -> None:
    """A ConfigError unless train.fsdp_reshard_after_forward, if a number of processes, divides `world_size`."""
    value = reshard_after_forward
    if isinstance(value, bool) or (value <= world_size and world_size % value == 0):
        return
    divisors = [d for d in range(2, world_size) if world_size % d == 0]
    instead = f"a divisor of {world_size} such as {divisors[-1]} (the GPUs of one node), " if divisors else ""
    raise ConfigError(f"train.fsdp_reshard_after_forward={value} must divide the {world_size} processes into groups "
                      f"to reshard to after forward; use {instead}true (reshard over all of them) or false (keep the "
                      "gathered parameters until the backward).")


FSDP_KEYS = ("fsdp_reshard_after_forward", "fsdp_prefetch")  # train.* settings that only FSDP2 reads.


def fsdp_record(train) -> dict:
    """run.json's engine "fsdp" of a sharded run: the overlap settings it uses."""
    return {"reshard_after_forward": train.fsdp_reshard_after_forward, "prefetch": train.fsdp_prefetch}


def ignored_fsdp_note(train, sharded: bool, world_size: int) -> str | None:
    """One line for stderr when a run that is not sharded sets train.fsdp_* away from their defaults; else None."""
    changed = [f"train.{key}={str(getattr(train, key)).lower()}" for key in FSDP_KEYS
               if getattr(train, key) != TrainConfig.model_fields[key].default]
    if sharded or not changed:
        return None
    why = "one process" if world_size == 1 else f"DDP over {world_size} processes"
    return (f"engine: {' and '.join(changed)} ignored: the networks are not sharded ({why}); "
            f"{'they apply' if len(changed) > 1 else 'it applies'} under train.parallelism=fsdp on several processes.")


def prefetch_plan(count: int, prefetch: int) -> list[tuple[list[int], list[int]]]:
    """For each of `count` blocks in forward order, the blocks whose all-gathers it issues explicitly: the next
    `prefetch` in forward, the previous `prefetch` (nearest first) in backward. An empty list keeps FSDP2's implicit
    prefetching for that block (the last blocks in forward, the first in backward)."""
    return [(list(range(i + 1, min(i + 1 + prefetch, count))), list(range(i - 1, max(i - 1 - prefetch, -1), -1)))
            for i in range(count)]


def shard(network: nn.Module, precision: str, reshard_after_forward: bool | int = True, prefetch: int = 0) -> None:
    """FSDP2 in place: each block its own unit, then the root; parameters gathered in the compute dtype,
    gradients reduced in float32. `reshard_after_forward` and `prefetch`: train.fsdp_reshard_after_forward and
    train.fsdp_prefetch, applied to the blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Denoisers return reshaped views; the engine only uses them out of place, which is what the warning asks.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype(precision), reduce_dtype=torch.float32)
    units = blocks(network)
    for block in units:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # Root at None (FSDP2 makes it False): fully_shard's docs, "required immediately when the backward pass begins".
    fully_shard(network, mp_policy=policy)
    if prefetch:
        for block, (forward, backward) in zip(units, prefetch_plan(len(units), prefetch)):
            block.set_modules_to_forward_prefetch([units[i] for i in forward])
            block.set_modules_to_backward_prefetch([units[i] for i in backward])


def wrap(teacher: nn.Module, generator: nn.Module, fake: nn.Module, ema: nn.Module | None, parallelism: str,
         precision: str, device: torch.device, env: DistEnv, checkpointed: tuple[str, ...] = (),
         reshard_after_forward: bool | int = True, prefetch: int = 0) -> Wrapped:
    """Apply gradient checkpointing (to the networks named in `checkpointed`, of teacher, generator and fake) and
    DDP or FSDP2 to the networks (already on `device`); `reshard_after_forward` and `prefetch` apply under FSDP2."""
    for name, network in (("teacher", teacher), ("generator", generator), ("fake", fake)):
        if name in checkpointed:
            enable_gradient_checkpointing(network)
    if not env.is_distributed:
        return Wrapped(generator, fake, sharded=False)
    if parallelism == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        check_reshard_after_forward(reshard_after_forward, env.world_size)
        networks = [n for n in (generator, fake, ema, teacher) if n is not None and parameter_count(n)]
        for network in networks:
            shard(network, precision, reshard_after_forward, prefetch)
        units = tuple(m for network in networks for m in network.modules() if isinstance(m, FSDPModule))
        return Wrapped(generator, fake, sharded=True, units=units)
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (noise-embedding frequencies, resampling filters) are constants: no need to broadcast them each step.
    # (`broadcast_buffers` is the older torch's name of the switch; 2.11 lacks `forward_sync_buffers`.)
    ddp = lambda m: DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None,
                                            broadcast_buffers=False)
    return Wrapped(ddp(generator), ddp(fake), sharded=False)


def gradient_sync(module: nn.Module, enabled: bool):
    """Context in which backward does (or skips) the gradient all-reduce: skipped for all but the last micro-batch."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)

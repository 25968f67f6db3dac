"""Device, precision and execution choices: bf16 autocast on CUDA by default, fp16 with a GradScaler per network,
fp32; channels-last memory layout and torch.compile of the networks' blocks where asked."""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from ..errors import DeviceError


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device is 'cuda' but no CUDA device is visible; use --set train.device=cpu or auto.")
    return torch.device(choice)


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and choice != "fp32":
        raise DeviceError(f"train.precision '{choice}' needs a CUDA device; "
                          "CPU runs use fp32 (--set train.precision=fp32).")
    return choice


def autocast(precision: str, device: torch.device):
    """Autocast context for the forward passes; fp32 weights and loss reductions stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device, sharded: bool = False):
    """One GradScaler per network under fp16; a disabled one otherwise.

    Under FSDP each rank sees only its shard of the gradients, so the sharded scaler agrees on inf/NaN across ranks.
    """
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=(precision == "fp16"))
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (Ampere and newer); off for strict fp32."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def param_dtype(precision: str) -> torch.dtype | None:
    """The dtype FSDP2 gathers parameters in for the forward pass (None: keep float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def use_channels_last(networks: list[nn.Module], device: torch.device) -> None:
    """Store 4-D weights NHWC on CUDA, in place: cuDNN then runs its NHWC kernels without layout transposes and the
    activations stay NHWC from the first convolution on. A no-op on CPU and for networks without 4-D weights."""
    if device.type == "cuda":
        for network in networks:
            network.to(memory_format=torch.channels_last)


def compile_failure(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` (no compiler, no Triton, ...), or None when a probe compiles.

    The first compilation of the process: it points inductor's caches at ONESTEP_HOME first (compile_cache.py)."""
    from .compile_cache import use_persistent_compile_cache

    use_persistent_compile_cache()
    return _probe_compile(torch.device(device))


@functools.lru_cache(maxsize=None)  # Once per device and process: `auto` probes, then compile_blocks asks again.
def _probe_compile(device: torch.device) -> str | None:
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, dynamic=False)
        probe(torch.randn(8, device=device))
    except Exception as exc:  # noqa: BLE001 - any backend failure means: stay eager.
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def compile_blocks(networks: list[nn.Module], device: torch.device, setting: str = "train.compile",
                   eager: tuple[nn.Module, ...] = ()) -> bool:
    """torch.compile every repeated block of `networks` in place (regional compilation), keeping parameter names.

    Blocks of one shape share a compiled graph, so compile time grows with the number of distinct blocks, not with
    depth; the compiled kernels are cached under ONESTEP_HOME (runtime/compile_cache.py). Returns False, with a
    warning naming `setting` (the option that asked for it), and leaves the networks eager when torch.compile does not
    work here. Blocks in `eager` stay eager: hooks added to a compiled block later are not run (dynamo skips guards on
    module hooks).
    """
    from ..denoisers.blocks import blocks

    failure = compile_failure(device)
    if failure is not None:
        warnings.warn(f"{setting} is set but torch.compile does not work on {device.type} here ({failure}); the "
                      f"networks run eager. Turn {setting} off to silence this.", stacklevel=2)
        return False
    import torch._dynamo

    # A block that fails to compile runs eager (with dynamo's warning) instead of stopping the run.
    torch._dynamo.config.suppress_errors = True
    # One code object (the block's forward) is compiled for each block shape and training mode: allow them all.
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    for network in networks:
        for block in blocks(network):
            if not any(block is kept for kept in eager):
                block.compile(dynamic=False)
    return True

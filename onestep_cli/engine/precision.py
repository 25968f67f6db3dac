"""Device and precision choices: bf16 autocast on CUDA by default, fp16 with a GradScaler per network, fp32."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use --set train.device=cpu or auto.")
    return torch.device(choice)


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and choice != "fp32":
        raise RuntimeError(f"train.precision '{choice}' needs a CUDA device; CPU runs use fp32 (--set train.precision=fp32).")
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

"""How every benchmark row is timed, and the rates of this device that its FLOP utilisation and floor are measured
against: shared by the engine rows (bench/run.py) and the evaluation rows (bench/eval_rows.py).

On CUDA every iteration is timed with events recorded between iterations, without extra synchronisation, so the
work runs exactly as in training or evaluation; on the CPU with the wall clock.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time

import torch

# Sizes of the reference measurements: a square matrix product of MATMUL_SIZE and a copy of COPY_BYTES (both smaller
# on the CPU, where they would otherwise take seconds).
MATMUL_SIZE = {"cuda": 8192, "cpu": 512}
COPY_BYTES = {"cuda": 2**30, "cpu": 2**24}
RATE_WARMUP, RATE_ITERS = 2, 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_iterations(iterate, device: torch.device, warmup: int, iters: int) -> tuple[float, list[float]]:
    """Run `iterate()` `warmup` times (the first one timed alone: compilation and autotuning happen there), then
    `iters` timed times; returns (seconds of the first iteration, seconds of each timed iteration)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    iterate()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        iterate()
    sync()
    if device.type != "cuda":
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            iterate()
            seconds.append(time.perf_counter() - start)
        return first, seconds
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for index in range(iters):
        iterate()
        events[index + 1].record()
    sync()
    return first, [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:])]


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand the CUDA caching allocator's free blocks back, so that the next row starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> dict:
    """{"peak_memory_gb": the most memory allocated since the last reset} on CUDA; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matmul_rate(device: torch.device, precision: str) -> float:
    """FLOP/s of a large square matrix product on `device` in `precision` (fp32, bf16 or fp16), under the float32
    settings in force (TF32 or not): the rate a row's FLOP utilisation is a fraction of. Measured once per setting."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return _matmul_rate(str(device), precision, tf32)


def copy_rate(device: torch.device) -> float:
    """Bytes per second (read plus written) of a large copy within `device`'s memory. Measured once."""
    return _copy_rate(str(device))


@functools.cache
def _matmul_rate(device: str, precision: str, tf32: bool) -> float:  # tf32: part of the cache key only.
    device = torch.device(device)
    size = MATMUL_SIZE[device.type]
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[precision]) for _ in range(2))
    _, seconds = time_iterations(lambda: a @ b, device, RATE_WARMUP, RATE_ITERS)
    a = b = None
    free_memory(device)
    return 2 * size**3 / statistics.median(seconds)


@functools.cache
def _copy_rate(device: str) -> float:
    device = torch.device(device)
    source = torch.empty(COPY_BYTES[device.type], dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    _, seconds = time_iterations(lambda: destination.copy_(source), device, RATE_WARMUP, RATE_ITERS)
    source = destination = None
    free_memory(device)
    return 2 * COPY_BYTES[device.type] / statistics.median(seconds)

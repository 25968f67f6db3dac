"""Learning-rate warm-up, as DMD2 runs it (diffusers' constant_with_warmup, stepped once per iteration)."""

from __future__ import annotations


def warmup_factor(iteration: int, warmup_iterations: float) -> float:
    """The fraction of the learning rate at `iteration` (from 0): iteration / warmup_iterations, then 1; 1 without
    warm-up. The first iteration's is 0, as in diffusers' schedule."""
    if warmup_iterations <= 0:
        return 1.0
    return min(1.0, iteration / warmup_iterations)

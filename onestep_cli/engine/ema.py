"""Exponential moving average of the generator with a half-life counted in images, ramped up as in EDM and SiD."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_beta(batch_size: int, halflife_kimg: float, rampup_ratio: float | None = None,
             nimg: float = math.inf) -> float:
    """Per-update decay so that the average's weight halves every half-life, given `nimg` images seen before this
    update. With `rampup_ratio` the half-life is min(halflife_kimg, rampup_ratio * nimg / 1000) (EDM's and SiD's
    training loops), so the first update copies the generator and early averages forget the initialisation."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


class EMA:
    """A frozen copy of a module whose parameters track the source, `ema = beta ema + (1 - beta) source` per update.

    `beta` may be a 0-dim tensor on the parameters' device, so that a captured CUDA graph reads each step's value.
    """

    def __init__(self, source: nn.Module):
        self.module = copy.deepcopy(source).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, beta: float | torch.Tensor) -> None:
        ema_params = list(self.module.parameters())
        src_params = [p.detach() for p in source.parameters()]
        if not ema_params:
            return
        beta = torch.as_tensor(beta, dtype=torch.float32, device=ema_params[0].device)
        # One formula for eager and captured steps, so that both give the same bits.
        torch._foreach_mul_(ema_params, beta)
        torch._foreach_add_(ema_params, torch._foreach_mul(src_params, 1 - beta))
        for ema_buf, src_buf in zip(self.module.buffers(), source.buffers()):
            ema_buf.copy_(src_buf)

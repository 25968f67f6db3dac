"""Exponential moving average of the generator with a half-life counted in images (EDM)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch_size: int, halflife_kimg: float) -> float:
    """Per-step decay so that the average's weight halves every `halflife_kimg` thousand images."""
    return 0.5 ** (batch_size / (halflife_kimg * 1000))


class EMA:
    """A frozen copy of a module whose parameters track the source with decay `beta` per update."""

    def __init__(self, source: nn.Module, beta: float):
        self.beta = beta
        self.module = copy.deepcopy(source).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        src_params = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(ema_params, src_params, 1.0 - self.beta)
        for ema_buf, src_buf in zip(self.module.buffers(), source.buffers()):
            ema_buf.copy_(src_buf)

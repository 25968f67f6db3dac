"""The one-step generator: a denoiser evaluated once at sigma_init on sigma_init-scaled noise."""

from __future__ import annotations

import torch
from torch import nn

from .base import Denoiser


class OneStepGenerator(nn.Module):
    """G(z, cond) = D(sigma_init * z, sigma_init, cond)."""

    def __init__(self, denoiser: Denoiser, sigma_init: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = sigma_init

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, dtype=z.dtype, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, cond)

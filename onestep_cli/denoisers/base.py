"""The one interface every teacher, fake score and generator is seen through.

A denoiser maps a noisy input in the variance-exploding convention `x = x0 + sigma * eps` to an estimate of `x0`:
`D(x, sigma, cond) -> x0_hat`. Scores follow from it: `s(x) = (D(x) - x) / sigma^2`.
"""

from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    """Base class: subclasses implement `forward(x, sigma, cond=None)` returning `x0_hat` with the shape of `x`.

    `sigma` is a tensor of shape `[batch]` (or broadcastable to it); `cond` is whatever conditioning the denoiser
    takes (class labels as `[batch, num_classes]` one-hot, text embeddings, ...) or None.
    """

    #: Number of classes for class-conditional denoisers, 0 when unconditional.
    label_dim: int = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def score(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """The score `(D(x) - x) / sigma^2` of the noisy distribution at level `sigma`."""
        sigma_b = broadcast_sigma(sigma, x)
        return (self(x, sigma, cond) - x) / sigma_b**2


def broadcast_sigma(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Return `sigma` shaped `[batch, 1, 1, ...]` so it broadcasts against `like`."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(like.shape[0])
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))

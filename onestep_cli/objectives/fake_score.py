"""The fake-score loss: denoising score matching on generator samples, EDM weighting."""

from __future__ import annotations

import torch

from ..denoisers.base import broadcast_sigma


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def fake_score_loss(fake, x_g, sigma, noise, cond=None, sigma_data: float = 0.5,
                    augment_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample lambda(sigma) |D_fake(x_g + sigma*eps, sigma) - x_g|^2, shape [batch]; x_g carries no gradient.

    `augment_labels`: EDM's augmentation labels of (already augmented) `x_g`, passed to the fake score; None: none.
    """
    x_g = x_g.detach()
    x_t = x_g + broadcast_sigma(sigma, x_g) * noise
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    error = (fake(x_t, sigma, cond, **extra) - x_g).reshape(x_g.shape[0], -1).pow(2).sum(dim=1)
    return edm_loss_weight(sigma, sigma_data) * error

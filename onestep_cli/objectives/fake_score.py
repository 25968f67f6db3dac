"""The fake-score loss: denoising score matching on generator samples, EDM weighting."""

from __future__ import annotations

import torch

from ..denoisers.base import broadcast_sigma


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float | None) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2; sigma_data None gives its limit
    1 / sigma^2, which makes the loss the epsilon-prediction MSE |eps_hat - eps|^2 (SiD-LSG's fake-score loss)."""
    if sigma_data is None:
        return sigma**-2
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def fake_score_loss(fake, x_g, sigma, noise, cond=None, sigma_data: float | None = 0.5,
                    augment_labels: torch.Tensor | None = None, guidance_scale: float | None = None) -> torch.Tensor:
    """Per-sample lambda(sigma) |D_fake(x_g + sigma*eps, sigma) - x_g|^2, shape [batch]; x_g carries no gradient.

    `augment_labels`: EDM's augmentation labels of (already augmented) `x_g`, passed to the fake score; None: none.
    `guidance_scale`: the CFG scale of a guided fake score in this loss (SiD-LSG's kappa1); None: its own.
    """
    x_g = x_g.detach()
    x_t = x_g + broadcast_sigma(sigma, x_g) * noise
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    error = (fake(x_t, sigma, cond, **extra) - x_g).reshape(x_g.shape[0], -1).pow(2).sum(dim=1)
    return edm_loss_weight(sigma, sigma_data) * error

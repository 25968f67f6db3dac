"""Score Implicit Matching (SIM): generator loss for a general score distance d.

Surrogate (docs/objectives.md): -w(sigma) d'(y) . (D_fake - x_g) / sigma^2 with y = (D_fake - D_teacher) / sigma^2,
gradients flowing through x_t = x_g + sigma*eps into both networks' inputs (their parameters frozen) and through x_g.
"""

from __future__ import annotations

import math

import torch

from ..config import SIMObjectiveConfig
from ..denoisers.base import broadcast_sigma
from .common import flat_dot, per_sample_normalizer


def distance_gradient(y: torch.Tensor, distance: str, huber_c: float) -> torch.Tensor:
    """d'(y) per sample for d = |y|^2 (l2) or sqrt(|y|^2 + c^2) - c (pseudo-Huber), y of shape [batch, ...]."""
    if distance == "l2":
        return 2 * y
    if distance == "pseudo_huber":
        sq_norm = y.reshape(y.shape[0], -1).pow(2).sum(dim=1)
        return y / broadcast_sigma((sq_norm + huber_c**2).sqrt(), y)
    raise ValueError(f"Unknown SIM distance '{distance}'; expected 'l2' or 'pseudo_huber'.")


def resolved_huber_c(huber_c: float | str, x_g: torch.Tensor) -> float:
    """The pseudo-Huber c: as configured, or for 'auto' the square root of a sample's element count D (|y| is a sum
    over D elements, so it grows like sqrt(D); c = sqrt(D) keeps c / |y| the same at every resolution)."""
    return math.sqrt(x_g[0].numel()) if huber_c == "auto" else float(huber_c)


def sigma_weight(weighting: str, sigma: torch.Tensor) -> torch.Tensor:
    """w(sigma) of the SIM divergence: 1, or sigma^4 (puts the loss in denoiser units, as SiD's)."""
    if weighting == "unit":
        return torch.ones_like(sigma)
    if weighting == "sigma4":
        return sigma**4
    raise ValueError(f"Unknown SIM weighting '{weighting}'; expected 'unit' or 'sigma4'.")


class SIMObjective:
    differentiates_through_networks = True

    def __init__(self, config: SIMObjectiveConfig):
        self.config = config

    def generator_loss(self, x_g, sigma, noise, teacher, fake, cond=None) -> torch.Tensor:
        """Per-sample SIM surrogate loss, shape [batch]; backpropagates into x_g only through tensors."""
        cfg = self.config
        sigma_b = broadcast_sigma(sigma, x_g)
        x_t = x_g + sigma_b * noise
        teacher_x0 = teacher(x_t, sigma, cond)
        fake_x0 = fake(x_t, sigma, cond)
        y = (fake_x0 - teacher_x0) / sigma_b**2
        direction = distance_gradient(y, cfg.distance, resolved_huber_c(cfg.huber_c, x_g))
        loss = -sigma_weight(cfg.weighting, sigma) * flat_dot(direction, fake_x0 - x_g) / sigma**2
        return loss / per_sample_normalizer(cfg.normalization, x_g, teacher_x0)

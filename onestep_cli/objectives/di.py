"""Diff-Instruct (DI) generator loss: sg(D_fake - D_teacher) . x_g, the reverse-KL gradient in denoiser units."""

from __future__ import annotations

import torch

from ..config import DIObjectiveConfig
from ..denoisers.base import broadcast_sigma
from .common import flat_dot, per_sample_normalizer


class DIObjective:
    differentiates_through_networks = False

    def __init__(self, config: DIObjectiveConfig):
        self.config = config

    def generator_loss(self, x_g, sigma, noise, teacher, fake, cond=None) -> torch.Tensor:
        """Per-sample DI loss, shape [batch]; its gradient in x_g is (D_fake - D_teacher) / normalizer."""
        with torch.no_grad():
            x_t = x_g + broadcast_sigma(sigma, x_g) * noise
            teacher_x0 = teacher(x_t, sigma, cond)
            direction = fake(x_t, sigma, cond) - teacher_x0
            normalizer = per_sample_normalizer(self.config.normalization, x_g, teacher_x0)
        return flat_dot(direction, x_g) / normalizer

"""Distribution Matching Distillation (DMD) generator loss: a regression onto a detached gradient step.

0.5 |x_g - sg(x_g - g)|^2 with g = (D_fake - D_teacher) / mean|x_g - D_teacher|; no gradient through the networks.
"""

from __future__ import annotations

import torch

from ..config import DMDObjectiveConfig
from ..denoisers.base import broadcast_sigma
from .common import per_sample_normalizer


class DMDObjective:
    differentiates_through_networks = False

    def __init__(self, config: DMDObjectiveConfig):
        self.config = config

    def generator_loss(self, x_g, sigma, noise, teacher, fake, cond=None) -> torch.Tensor:
        """Per-sample DMD loss, shape [batch]; its gradient in x_g is g."""
        with torch.no_grad():
            x_t = x_g + broadcast_sigma(sigma, x_g) * noise
            teacher_x0 = teacher(x_t, sigma, cond)
            fake_x0 = fake(x_t, sigma, cond)
            normalizer = per_sample_normalizer(self.config.normalization, x_g, teacher_x0)
            step = (fake_x0 - teacher_x0) / broadcast_sigma(normalizer, x_g)
            target = x_g - step
        return 0.5 * (x_g - target).reshape(x_g.shape[0], -1).pow(2).sum(dim=1)

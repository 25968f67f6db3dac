"""Score identity Distillation (SiD) generator loss.

(D_t - D_f) . ((D_t - x_g) - alpha (D_t - D_f)) / sg(mean|x_g - D_t|), summed over pixels, gradients through the
networks' inputs. alpha = 0.5 gives half the gradient of the Fisher divergence including its sampling
distribution; alpha = 1 the sampling-fixed part, which is SIM with d = l2 up to weighting.
"""

from __future__ import annotations

import torch

from ..config import SiDObjectiveConfig
from ..denoisers.base import broadcast_sigma
from .common import flat_dot, per_sample_normalizer


class SiDObjective:
    differentiates_through_networks = True

    def __init__(self, config: SiDObjectiveConfig):
        self.config = config

    def generator_loss(self, x_g, sigma, noise, teacher, fake, cond=None) -> torch.Tensor:
        """Per-sample SiD loss, shape [batch]."""
        x_t = x_g + broadcast_sigma(sigma, x_g) * noise
        teacher_x0 = teacher(x_t, sigma, cond)
        fake_x0 = fake(x_t, sigma, cond)
        gap = teacher_x0 - fake_x0
        loss = flat_dot(gap, (teacher_x0 - x_g) - self.config.alpha * gap)
        return loss / per_sample_normalizer(self.config.normalization, x_g, teacher_x0)

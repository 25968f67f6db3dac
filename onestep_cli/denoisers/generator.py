"""The generator: a denoiser evaluated once at sigma_init on sigma_init-scaled noise, or N times on a fixed schedule.

One step (the default): `G(z, c) = D(sigma_init z, sigma_init, c)`. N steps (DMD2's multi-step generator,
tianweiy/DMD2 main/sd_unified_model.py L128-162): each step denoises, then the next step reads that estimate with fresh
noise at its own level, `x_{k+1} = x0_k + sigma_{k+1} eps_{k+1}`; the last estimate is the sample.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn

from .base import Denoiser

KARRAS_SIGMA_MIN = 0.002  # EDM's sigma_min: the end of the Karras ramp the default EDM step schedule walks down.
KARRAS_RHO = 7.0  # EDM's rho.


class OneStepGenerator(nn.Module):
    """`G(z, cond)`: one denoiser step at sigma_init, or the N steps of `step_sigmas` with re-noising between them.

    `start_scale` multiplies the unit noise `z` the first step reads (default: its sigma, `x = sigma_0 z`); a
    multi-step generator of a DDPM-family teacher reads unit noise in that teacher's parametrisation instead
    (`sqrt(1 + sigma_0^2) z`, see `pure_noise_scale`).
    """

    def __init__(self, denoiser: Denoiser, sigma_init: float, step_sigmas: Sequence[float] | None = None,
                 start_scale: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.step_sigmas = tuple(float(s) for s in step_sigmas) if step_sigmas else (float(sigma_init),)
        self.sigma_init = self.step_sigmas[0] if step_sigmas else sigma_init
        self.start_scale = self.sigma_init if start_scale is None else start_scale

    @property
    def num_steps(self) -> int:
        return len(self.step_sigmas)

    def forward(self, z: torch.Tensor, cond=None, step_noise: torch.Tensor | None = None,
                steps: int | None = None) -> torch.Tensor:
        """The x0 estimate of step `steps` (1-based; default: the last) of the chain started from unit noise `z`.

        `step_noise` ([batch, num_steps - 1, ...], unit Gaussian) re-noises the estimate before each later step; None
        draws it from torch's global generator. Only the last step run carries gradients: the earlier ones are the
        backward simulation that produces its input (DMD2's sample_backward is under no_grad).
        """
        steps = self.num_steps if steps is None else steps
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps={steps} is outside this generator's 1..{self.num_steps} steps.")
        x = self.start_scale * z
        for index in range(steps):
            last = index == steps - 1
            sigma = torch.full((z.shape[0],), self.step_sigmas[index], dtype=z.dtype, device=z.device)
            with contextlib.nullcontext() if last else torch.no_grad():
                x0 = self.denoiser(x, sigma, cond)
            if not last:
                noise = torch.randn_like(z) if step_noise is None else step_noise[:, index]
                x = x0 + self.step_sigmas[index + 1] * noise
        return x0


def karras_step_sigmas(sigma_init: float, num_steps: int, sigma_min: float = KARRAS_SIGMA_MIN,
                       rho: float = KARRAS_RHO) -> tuple[float, ...]:
    """`num_steps` levels evenly spaced on the Karras ramp from sigma_init (first, exactly) down to sigma_min, which
    is never reached: positions k / num_steps, k = 0..N-1, as DMD2's timesteps 999, 749, 499, 249 sit at k / 4 of its
    1000-level schedule (main/sd_unified_model.py L31-35)."""
    top, bottom = sigma_init ** (1 / rho), sigma_min ** (1 / rho)
    later = [(top + k / num_steps * (bottom - top)) ** rho for k in range(1, num_steps)]
    return (float(sigma_init), *later)


def ddpm_step_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """DMD2's `denoising_step_list`: T-1, T-1-T//N, ... (N of them), e.g. 999, 749, 499, 249 for T = 1000, N = 4
    (main/sd_unified_model.py L31-35)."""
    interval = num_train_timesteps // num_steps
    if interval < 1:
        raise ValueError(f"{num_steps} steps do not fit the teacher's {num_train_timesteps} timesteps.")
    return [num_train_timesteps - 1 - k * interval for k in range(num_steps)]


def pure_noise_scale(sigma: float) -> float:
    """The VE scale of unit noise read as a DDPM input at level sigma (`x_vp = z` is `x = sqrt(1 + sigma^2) z`)."""
    return math.sqrt(1 + sigma**2)


def flow_noise_scale(sigma: float) -> float:
    """The VE scale of unit noise read as a flow-matching input at level sigma (`x_t = z` is `x = (1 + sigma) z`)."""
    return 1 + sigma

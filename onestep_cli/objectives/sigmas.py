"""Noise-level distributions of the generator and fake-score steps, built from config.

Each follows the official code it names (file and line in docs/presets.md):
- `karras`: SiD's generator loss (`sid_loss.py`): t ~ U(0, t_max) and sigma = karras_sigma(1 - t), so t = 0 is
  sigma_min and t_max = 0.8 reaches sigma 24.4 (median 0.97).
- `karras_index`: DMD2 (`edm_guidance.py`): a uniform integer index into a Karras grid ordered from sigma_min (index
  0) up to sigma_max, between int(min_fraction N) and int(max_fraction N) inclusive (capped at N - 1).
- `lognormal`: EDM's training distribution, SiD's fake-score loss.
- `uniform_timestep`: SiD-LSG (`training/sid_training_loop.py`): a uniform integer DDPM timestep in [t_min, t_max)
  (`torch.randint(tmin, tmax)`), at the noise level of that timestep on the teacher's beta schedule.
"""

from __future__ import annotations

import functools

import torch

from ..config import KarrasIndexSigmaConfig, KarrasSigmaConfig, LogNormalSigmaConfig, UniformTimestepSigmaConfig
from ..denoisers.diffusers.schedule import DDPMSigmaSchedule


def karras_sigma(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Position u in [0, 1] on the Karras grid: sigma_max at u=0, sigma_min at u=1."""
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + u * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def karras_grid(num: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """`num` Karras levels from sigma_max down to sigma_min (float64)."""
    return karras_sigma(torch.linspace(0, 1, num, dtype=torch.float64), sigma_min, sigma_max, rho)


def karras_index_range(config: KarrasIndexSigmaConfig) -> tuple[int, int]:
    """The lowest and highest index (inclusive) drawn from the ascending grid, as DMD2 computes them."""
    low = int(config.min_fraction * config.num_levels)
    high = min(int(config.max_fraction * config.num_levels), config.num_levels - 1)
    return low, max(low, high)


def ddpm_sigmas(config: UniformTimestepSigmaConfig) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of timesteps 0..T-1 on the config's beta schedule."""
    return _ddpm_sigmas(config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps)


@functools.lru_cache(maxsize=8)  # Drawn from every step: the schedule is built once per setting, not per draw.
def _ddpm_sigmas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    return DDPMSigmaSchedule.from_betas(beta_schedule, beta_start, beta_end, num_train_timesteps).sigmas


def sample_sigma(config, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """Draw `batch` noise levels (float32, on the CPU) from a sigma config."""
    if isinstance(config, KarrasSigmaConfig):
        t = torch.rand(batch, generator=generator, dtype=torch.float64) * config.t_max
        sigma = karras_sigma(1 - t, config.sigma_min, config.sigma_max, config.rho)
    elif isinstance(config, KarrasIndexSigmaConfig):
        ascending = karras_grid(config.num_levels, config.sigma_min, config.sigma_max, config.rho).flip(0)
        low, high = karras_index_range(config)
        sigma = ascending[torch.randint(low, high + 1, (batch,), generator=generator)]
    elif isinstance(config, UniformTimestepSigmaConfig):
        sigma = ddpm_sigmas(config)[torch.randint(config.t_min, config.t_max, (batch,), generator=generator)]
    elif isinstance(config, LogNormalSigmaConfig):
        sigma = (torch.randn(batch, generator=generator, dtype=torch.float64) * config.std_log + config.mean_log).exp()
    else:  # pragma: no cover - config validation rules this out
        raise TypeError(f"Unknown sigma distribution {config!r}")
    return sigma.float()

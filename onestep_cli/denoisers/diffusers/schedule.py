"""Noise schedules of diffusers teachers expressed in sigma units (variance-exploding `x = x0 + sigma * eps`).

DDPM family (SD 1.5/2.1, SDXL, PixArt): the discrete schedule `alphas_cumprod[t]`, t = 0..T-1, corresponds to
`sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` and `x_vp = x / sqrt(1 + sigma^2)`. A sigma between two discrete
levels gets a fractional timestep, linear in log-sigma between its neighbours (k-diffusion's `DiscreteSchedule`
rule); diffusers' sinusoidal timestep embeddings accept float timesteps, so the network sees it unrounded. Outside
`[sigma_min, sigma_max]` the timestep is clamped to 0 or T-1 while the input scaling still uses the exact sigma.

Flow matching (SD3, SANA, Flux): `x_t = (1 - t) x0 + t eps` is `x / (1 + sigma)` with `sigma = t / (1 - t)`.
"""

from __future__ import annotations

import torch

ZERO_SNR_ALPHA_BAR = 2.0**-24  # Stand-in for alpha_bar = 0 of zero-terminal-SNR schedules (diffusers uses the same).


class DDPMSigmaSchedule:
    """Map between sigma and the (continuous) timestep of a discrete DDPM schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alpha_bar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(min=ZERO_SNR_ALPHA_BAR)
        if alpha_bar.ndim != 1 or len(alpha_bar) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D schedule of at least 2 levels, got shape "
                             f"{tuple(alpha_bar.shape)}.")
        self.alphas_cumprod = alpha_bar
        self.sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()  # Increasing with t.
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("the schedule's sigmas do not increase with the timestep; alphas_cumprod must decrease.")
        self.log_sigmas = self.sigmas.log()
        self._log_sigmas_on = {}  # device -> log_sigmas there, so a GPU call does not copy the table each time.

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        if device not in self._log_sigmas_on:
            self._log_sigmas_on[device] = self.log_sigmas.to(device)
        return self._log_sigmas_on[device]

    @classmethod
    def from_scheduler(cls, scheduler) -> DDPMSigmaSchedule:
        """From any diffusers scheduler of the DDPM family (DDPM, DDIM, PNDM, Euler, DPM-Solver...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: it is not a DDPM-family scheduler.")
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def from_betas(cls, beta_schedule: str, beta_start: float, beta_end: float,
                   num_train_timesteps: int) -> DDPMSigmaSchedule:
        """The schedule diffusers' DDPM-family schedulers build from these settings (its own betas, so the levels
        equal a teacher's whose scheduler_config.json holds them)."""
        from diffusers import DDPMScheduler

        return cls.from_scheduler(DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                                beta_end=beta_end, beta_schedule=beta_schedule))

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        """Noise level of timestep 0."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Noise level of the last timestep (about 14.6 for SD's scaled-linear schedule)."""
        return float(self.sigmas[-1])

    def sigma_at(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Sigma of a (possibly fractional) timestep, log-linear between discrete levels; float64 like the table."""
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigmas = self._log_sigmas(t.device)
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        return log_sigma.exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of `sigma`, linear in log-sigma between the neighbouring discrete levels, clamped to
        `[0, T-1]`. Returned as float32 on sigma's device, the form diffusers' timestep embeddings take."""
        log_sigma = torch.as_tensor(sigma).detach().to(torch.float64).log()
        log_sigmas = self._log_sigmas(log_sigma.device)
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        t = (low + w).clamp(0, self.num_timesteps - 1)
        return t.to(torch.float32)

    @staticmethod
    def alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
        """`alpha_bar = 1 / (1 + sigma^2)`."""
        return 1 / (1 + sigma**2)


class FlowSigmaSchedule:
    """Rectified-flow time `t in [0, 1)` and sigma: `sigma = t / (1 - t)`, `t = sigma / (1 + sigma)`.

    The scheduler's `shift` only changes which t are sampled, not what a t means, so it plays no part here.
    `num_train_timesteps` scales t to the network's timestep input (SD3 and SANA take `t * 1000`).
    """

    def __init__(self, num_train_timesteps: int = 1000, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        self.num_train_timesteps = num_train_timesteps
        self.t_min, self.t_max = t_min, t_max

    @classmethod
    def from_scheduler(cls, scheduler) -> FlowSigmaSchedule:
        return cls(num_train_timesteps=int(scheduler.config.num_train_timesteps))

    @property
    def sigma_min(self) -> float:
        return self.t_min / (1 - self.t_min)

    @property
    def sigma_max(self) -> float:
        return self.t_max / (1 - self.t_max)

    @staticmethod
    def flow_time(sigma: torch.Tensor) -> torch.Tensor:
        """`t = sigma / (1 + sigma)`."""
        return sigma / (1 + sigma)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's timestep input `t * num_train_timesteps` (float32)."""
        return (self.flow_time(torch.as_tensor(sigma).detach().to(torch.float64)) * self.num_train_timesteps).float()

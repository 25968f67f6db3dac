"""Shared plumbing of the diffusers adapters: latent geometry, the null condition, dtypes, and the DDPM mapping.

Every adapter is a `Denoiser` on latents in sigma units, `D(x, sigma, cond) -> x0_hat`; the wrapped diffusers network
is `self.model` (wrap it with peft LoRA or turn on its gradient checkpointing there). The mapping is computed in
float32; the network runs in its own dtype (or under the caller's autocast) and its output is returned as float32.
"""

from __future__ import annotations

import torch

from ..base import Denoiser, broadcast_sigma
from .conditioning import FIELDS, Conditioning
from .schedule import DDPMSigmaSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NULL_BUFFER_PREFIX = "null_"


class DiffusersDenoiser(Denoiser):
    """Base of the adapters: holds the network, the latent geometry and the null (unconditional) text condition."""

    def __init__(
        self,
        model: torch.nn.Module,             # The diffusers network (UNet2DConditionModel, PixArtTransformer2DModel...).
        vae_scale_factor: int = 8,          # Pixels per latent pixel along each side.
        vae_scaling_factor: float = 1.0,    # Latents = VAE mean * this; decode divides by it.
        vae_shift_factor: float = 0.0,      # Latents = (VAE mean - shift) * scaling (SD3/Flux; 0 for SD/PixArt).
    ):
        super().__init__()
        self.model = model
        self.vae_scale_factor = vae_scale_factor
        self.vae_scaling_factor = vae_scaling_factor
        self.vae_shift_factor = vae_shift_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents the network was trained at."""
        size = self.model.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.model.config.in_channels), int(height), int(width))

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of a decoded latent of `latent_shape`."""
        _, height, width = self.latent_shape
        return (height * self.vae_scale_factor, width * self.vae_scale_factor)

    def set_null_condition(self, cond: Conditioning | None) -> None:
        """Store the condition `cond=None` stands for (a batch of 1: the empty-prompt embedding, or zeros).

        Kept as non-persistent buffers: they follow `.to(device)` and copies, and stay out of `state_dict`.
        """
        for name in FIELDS:
            value = None if cond is None else getattr(cond, name)
            self.register_buffer(NULL_BUFFER_PREFIX + name, None if value is None else value[:1].clone(),
                                 persistent=False)

    @property
    def null_condition(self) -> Conditioning | None:
        embeds = getattr(self, NULL_BUFFER_PREFIX + "embeds", None)
        if embeds is None:
            return None
        return Conditioning(**{name: getattr(self, NULL_BUFFER_PREFIX + name) for name in FIELDS})

    def resolve_condition(self, cond: Conditioning | None, batch: int, dtype: torch.dtype,
                          device: torch.device) -> Conditioning:
        """`cond` (or the null condition when None) with `batch` rows, floating fields in `dtype`, on `device`."""
        if cond is None:
            cond = self.null_condition
            if cond is None:
                raise ValueError(f"{type(self).__name__} is text-conditioned and has no null condition; pass a "
                                 "Conditioning, or call set_null_condition() (load_diffusers_teacher does).")
        if not isinstance(cond, Conditioning):
            raise TypeError(f"cond must be a Conditioning or None, got {type(cond).__name__}.")
        return cond.expand(batch).to(device, dtype)

    # Subclasses set `self.schedule` (DDPM or flow); its range is the denoiser's.
    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @staticmethod
    def _flat_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """Sigma as float32 `[batch, 1, 1, 1]`, one value per sample."""
        return broadcast_sigma(sigma, x.to(torch.float32)).expand(x.shape[0], *([1] * (x.ndim - 1)))

    def _drop_learned_sigma(self, output: torch.Tensor) -> torch.Tensor:
        """Keep the prediction channels of a network that also outputs its variance (PixArt, DeepFloyd IF)."""
        channels = self.latent_shape[0]
        if output.shape[1] == 2 * channels:
            return output[:, :channels]
        if output.shape[1] != channels:
            raise ValueError(f"{type(self.model).__name__} returned {output.shape[1]} channels; expected {channels} "
                             f"(or {2 * channels} with learned variance).")
        return output


class DDPMDenoiser(DiffusersDenoiser):
    """A DDPM-schedule network (epsilon, v or sample prediction) as a variance-exploding denoiser.

    `alpha_bar = 1 / (1 + sigma^2)`, `x_vp = x sqrt(alpha_bar)`, timestep = `schedule.timestep(sigma)` (continuous,
    log-sigma interpolation). epsilon: `x0 = x - sigma eps_hat`;
    v: `x0 = sqrt(alpha_bar) x_vp - sqrt(1 - alpha_bar) v_hat`; sample: `x0 = network output`.
    Subclasses implement `predict(x_vp, timestep, cond)`.
    """

    def __init__(self, model: torch.nn.Module, schedule: DDPMSigmaSchedule, prediction_type: str = "epsilon",
                 **latent_kwargs):
        super().__init__(model, **latent_kwargs)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of "
                             f"{', '.join(PREDICTION_TYPES)}.")
        self.schedule = schedule
        self.prediction_type = prediction_type

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep the network is given at noise level `sigma` (`[batch]` float32)."""
        return self.schedule.timestep(sigma)

    def predict(self, x_vp: torch.Tensor, timestep: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
        """The network's native output (eps, v or x0) for the variance-preserving input `x_vp`."""
        raise NotImplementedError  # pragma: no cover

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """`x0_hat` (float32) of `x = x0 + sigma * eps` in latent space; `cond=None` means the null condition."""
        x = x.to(torch.float32)
        sigma = self._flat_sigma(sigma, x)
        sqrt_alpha_bar = (1 + sigma**2).rsqrt()
        x_vp = x * sqrt_alpha_bar
        timestep = self.timestep(sigma.flatten()).to(x.device)
        output = self.predict(x_vp.to(self.model_dtype), timestep, cond).to(torch.float32)
        if self.prediction_type == "epsilon":
            return x - sigma * output
        if self.prediction_type == "v_prediction":
            # sqrt(1 - alpha_bar) = sigma sqrt(alpha_bar).
            return sqrt_alpha_bar * x_vp - sigma * sqrt_alpha_bar * output
        return output

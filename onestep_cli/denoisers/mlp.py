"""A small MLP denoiser with EDM preconditioning: the generator and fake score for low-dimensional teachers."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Denoiser, broadcast_sigma


class FourierNoiseEmbedding(nn.Module):
    """Sine/cosine features of EDM's c_noise = log(sigma) / 4 at geometric frequencies."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), half)))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPDenoiser(Denoiser):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), as EDM's preconditioning, with F an MLP."""

    def __init__(self, dim: int, hidden_dim: int = 256, num_layers: int = 4, noise_embedding_dim: int = 32,
                 sigma_data: float = 0.5, label_dim: int = 0, input_fourier_dim: int = 0,
                 input_fourier_scale: float = 1.0):
        super().__init__()
        self.dim, self.sigma_data, self.label_dim = dim, sigma_data, label_dim
        self.noise_embedding = FourierNoiseEmbedding(noise_embedding_dim)
        # Random Fourier features of the input counter an MLP's bias towards smooth maps (Tancik et al. 2020),
        # so that a generator can tear a Gaussian into separate modes in few steps.
        frequencies = torch.randn(dim, input_fourier_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("input_frequencies", frequencies * input_fourier_scale)
        layers = []
        width = dim + 2 * input_fourier_dim + 2 * (noise_embedding_dim // 2) + label_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, sigma, cond=None):
        flat = x.reshape(x.shape[0], -1)
        sigma = broadcast_sigma(sigma, flat)  # [batch, 1]
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        angles = 2 * math.pi * (c_in * flat) @ self.input_frequencies
        features = [c_in * flat, angles.sin(), angles.cos(), self.noise_embedding(sigma[:, 0].log() / 4)]
        if self.label_dim:
            features.append(cond.to(flat.dtype))
        out = c_skip * flat + c_out * self.net(torch.cat(features, dim=1))
        return out.reshape(x.shape)

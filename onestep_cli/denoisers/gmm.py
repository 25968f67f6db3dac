"""Analytic Gaussian-mixture teacher: the exact denoiser E[x0 | x] in closed form, any dimension."""

from __future__ import annotations

import math

import torch

from .base import Denoiser, broadcast_sigma


class GaussianMixtureDenoiser(Denoiser):
    """Mixture of isotropic Gaussians N(mean_k, std_k^2 I) with weights w_k; inputs of any shape are flattened.

    Under noise of level sigma each component becomes N(mean_k, (std_k^2 + sigma^2) I), so the posterior over
    components and each component's posterior mean are exact, and so is their mixture E[x0 | x].
    """

    def __init__(self, means, stds, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        weights = (torch.ones(len(means), dtype=torch.float64) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("means", means)  # [K, dim]
        self.register_buffer("stds", stds)  # [K]
        self.register_buffer("weights", weights / weights.sum())  # [K]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def component_log_posterior(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p(k | x) at noise level sigma, shape [batch, K]."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        var = self.stds[None, :] ** 2 + broadcast_sigma(sigma, flat).to(torch.float64) ** 2  # [batch, K]
        sq_dist = torch.cdist(flat, self.means) ** 2
        log_joint = self.weights.log()[None] - 0.5 * sq_dist / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)

    def forward(self, x, sigma, cond=None):
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma2 = broadcast_sigma(sigma, flat).to(torch.float64) ** 2  # [batch, 1]
        posterior = self.component_log_posterior(x, sigma).exp()  # [batch, K]
        shrink = self.stds[None] ** 2 / (self.stds[None] ** 2 + sigma2)  # [batch, K]
        # E[x0 | x, k] = mean_k + shrink_k (x - mean_k), averaged over the component posterior.
        per_component = self.means[None] + shrink[..., None] * (flat[:, None, :] - self.means[None])
        x0 = (posterior[..., None] * per_component).sum(dim=1)
        return x0.to(x.dtype).reshape(x.shape)

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples of the clean mixture, float32 [num, dim]."""
        components = torch.multinomial(self.weights.float().cpu(), num, replacement=True, generator=generator)
        noise = torch.randn(num, self.dim, generator=generator, dtype=torch.float64)
        samples = self.means.cpu()[components] + self.stds.cpu()[components, None] * noise
        return samples.float()

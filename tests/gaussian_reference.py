"""Closed-form Gaussian references for tests/test_objective_gradients.py.

Teacher q = N(m, v^2 I) and generator G(z) = mu + s z, z ~ N(0, I), in dimension n. At noise level sigma
(x = x0 + sigma * eps) the generator's noisy distribution is p_t = N(mu, a I), a = s^2 + sigma^2, and the teacher's is
q_t = N(m, b I), b = v^2 + sigma^2; their scores s_p(x) = -(x - mu) / a and s_q(x) = -(x - m) / b are exact, so every
divergence below is exact too. Everything is float64 and independent of onestep_cli, so it can check it.
"""

from __future__ import annotations

import math

import torch


class GaussianDenoiser:
    """Exact denoiser E[x0 | x] of N(mean, std^2 I) under VE noise: mean + std^2 / (std^2 + sigma^2) (x - mean).

    Called as D(x, sigma, cond) with x of shape [batch, n] and sigma of shape [batch]. Pass detached parameters to
    get a fake score with the generator's parameters frozen.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | float):
        self.mean = mean
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        shrink = self.std**2 / (self.std**2 + sigma[:, None] ** 2)
        return self.mean + shrink * (x - self.mean)


def noisy_variances(s, v, sigma):
    """(a, b): the per-coordinate variances of p_t and q_t at noise level sigma."""
    return s**2 + sigma**2, v**2 + sigma**2


def frozen_sampling_fisher(mu, s, mu0, s0, m, v, sigma) -> torch.Tensor:
    """E_{x ~ p_{theta0}} |s_{p_theta}(x) - s_q(x)|^2 with the sampling distribution frozen at theta0 = (mu0, s0).

    With x = mu0 + sqrt(a0) xi: s_p - s_q = sqrt(a0) xi (1/b - 1/a) + (mu - mu0)/a + (mu0 - m)/b, hence
    n a0 (1/b - 1/a)^2 + |(mu - mu0)/a + (mu0 - m)/b|^2. Its gradient at theta0 is SIM-l2's (sampling held fixed).
    """
    a, b = noisy_variances(s, v, sigma)
    a0, _ = noisy_variances(s0, v, sigma)
    n = mu.numel()
    return n * a0 * (1 / b - 1 / a) ** 2 + ((mu - mu0) / a + (mu0 - m) / b).pow(2).sum()


def fisher_divergence(mu, s, m, v, sigma) -> torch.Tensor:
    """E_{x ~ p_theta} |s_p(x) - s_q(x)|^2 = n (sqrt(a)/b - 1/sqrt(a))^2 + |mu - m|^2 / b^2 (sampling included)."""
    a, b = noisy_variances(s, v, sigma)
    n = mu.numel()
    return n * (a.sqrt() / b - 1 / a.sqrt()) ** 2 + (mu - m).pow(2).sum() / b**2


def kl_divergence(mu, s, m, v, sigma) -> torch.Tensor:
    """KL(N(mu, a I) || N(m, b I)) = 0.5 [n a/b + |mu - m|^2 / b - n + n ln(b/a)]."""
    a, b = noisy_variances(s, v, sigma)
    n = mu.numel()
    return 0.5 * (n * a / b + (mu - m).pow(2).sum() / b - n + n * torch.log(b / a))


def gaussian_log_density(x, mean, var) -> torch.Tensor:
    """log N(x; mean, var I) per row of x."""
    n = x.shape[1]
    return -0.5 * (x - mean).pow(2).sum(dim=1) / var - 0.5 * n * torch.log(2 * math.pi * var)


def pseudo_huber(y: torch.Tensor, c: float) -> torch.Tensor:
    """d(y) = sqrt(|y|^2 + c^2) - c per row of y."""
    return (y.pow(2).sum(dim=1) + c**2).sqrt() - c


def theta_gradient(fn, mu0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """Gradient of fn(mu, s) at (mu0, s0), flattened to [n + 1] as (d/dmu, d/ds)."""
    mu = mu0.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    grad_mu, grad_s = torch.autograd.grad(fn(mu, s), [mu, s])
    return torch.cat([grad_mu, grad_s.reshape(1)])


def per_sample_theta_gradients(loss_fn, mu0: torch.Tensor, s0: torch.Tensor, batch: int) -> torch.Tensor:
    """Row i: the gradient of sample i's loss w.r.t. its own copy of (mu, s), shape [batch, n + 1].

    loss_fn(mu, s) gets mu of shape [batch, n] and s of shape [batch] (every row equal to mu0, s0) and returns the
    per-sample loss [batch]. The rows sum to the gradient w.r.t. shared (mu, s) (chain rule), so their mean is
    autograd of loss.mean(), and their spread gives its Monte-Carlo standard error.
    """
    mu = mu0.expand(batch, -1).clone().requires_grad_(True)
    s = s0.expand(batch).clone().requires_grad_(True)
    loss = loss_fn(mu, s)
    assert loss.shape == (batch,), f"expected a per-sample loss of shape [{batch}], got {tuple(loss.shape)}"
    grad_mu, grad_s = torch.autograd.grad(loss.sum(), [mu, s])
    return torch.cat([grad_mu, grad_s[:, None]], dim=1)


def mean_and_standard_error(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means of i.i.d. rows and their Monte-Carlo standard errors."""
    return rows.mean(dim=0), rows.std(dim=0) / math.sqrt(rows.shape[0])

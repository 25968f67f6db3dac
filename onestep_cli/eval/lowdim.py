"""Metrics for low-dimensional samples of an analytic mixture teacher: sliced Wasserstein-2 and mode coverage."""

from __future__ import annotations

import torch

from ..denoisers.gmm import GaussianMixtureDenoiser


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets: sqrt of the mean squared 1-D W2 over
    random unit directions (fixed by `seed`)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}.")
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    rng = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=rng, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    # One row per direction: sorting contiguous rows is several times faster than sorting the columns of a @ directions.
    proj_a = (a @ directions).T.contiguous().sort(dim=1).values
    proj_b = (b @ directions).T.contiguous().sort(dim=1).values
    return float(((proj_a - proj_b) ** 2).mean().sqrt())


def mode_coverage(samples: torch.Tensor, teacher: GaussianMixtureDenoiser) -> float:
    """Fraction of components receiving at least half their fair share of samples (each sample assigned to its
    most likely component under the clean mixture)."""
    log_post = teacher.component_log_posterior(samples.reshape(samples.shape[0], -1), torch.zeros(samples.shape[0]))
    counts = torch.bincount(log_post.argmax(dim=1), minlength=len(teacher.weights)).double()
    fair_share = teacher.weights.cpu() * samples.shape[0]
    return float((counts >= 0.5 * fair_share).double().mean())

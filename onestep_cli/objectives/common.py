"""Pieces shared by the generator objectives."""

from __future__ import annotations

import torch


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over all non-batch dimensions, shape [batch]."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def per_sample_normalizer(normalization: str, x_g: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """Per-sample divisor of the generator loss, without gradient: 1, or mean |x_g - D_teacher| as SiD and DMD use."""
    if normalization == "none":
        return torch.ones(x_g.shape[0], dtype=x_g.dtype, device=x_g.device)
    if normalization == "mean_abs_error":
        # The floor only guards an exact zero (generator equal to the teacher's denoising); NaNs pass through.
        return (x_g - teacher_x0).detach().abs().reshape(x_g.shape[0], -1).mean(dim=1).clamp_min(1e-5)
    raise ValueError(f"Unknown normalization '{normalization}'; expected 'none' or 'mean_abs_error'.")

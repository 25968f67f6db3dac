"""Classifier-free guidance in x0 space: `D_cfg = D(x, null) + k (D(x, c) - D(x, null))`.

At a fixed `x` this equals epsilon-space guidance (`x0 = x - sigma eps` is affine in eps), so a guided teacher is
the same as diffusers' guided sampler. The null condition follows the recipe:

- `empty_prompt`: the encoded empty prompt "" (SD 1.5/2.1, PixArt, SiD-LSG).
- `zeros`: all-zero text embeddings and pooled embedding, time ids kept (DMD2's SDXL recipe; SDXL's own pipeline
  does the same through `force_zeros_for_empty_prompt`).
- `auto`: what the teacher's diffusers pipeline uses for an absent negative prompt (zeros for SDXL, else empty).
"""

from __future__ import annotations

import torch

from ..base import Denoiser
from .adapter import DiffusersDenoiser
from .conditioning import Conditioning

NULL_MODES = ("auto", "empty_prompt", "zeros")


def guide(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """`uncond + k (cond - uncond)`: k = 1 gives the conditional output, k = 0 the unconditional one."""
    return uncond + guidance_scale * (cond - uncond)


def null_condition(mode: str, empty: Conditioning, pipeline_default: str = "empty_prompt") -> Conditioning:
    """The null condition of `mode` (one of NULL_MODES) from the encoded empty prompt `empty` (a batch of 1).

    `pipeline_default` is what `auto` resolves to (`PromptEncoder.default_null_mode`).
    """
    if mode not in NULL_MODES:
        raise ValueError(f"null condition {mode!r} is not known; use one of {', '.join(NULL_MODES)}.")
    if mode == "auto":
        mode = pipeline_default
    return empty[:1] if mode == "empty_prompt" else empty[:1].zeros_like()


class GuidedDenoiser(Denoiser):
    """A text-conditioned denoiser with classifier-free guidance of scale `guidance_scale`.

    The conditional and null branches run as one batch of 2B (set `batch_branches=False` to run them one after the
    other and halve peak activation memory). `cond=None` returns the null branch alone.
    """

    def __init__(self, denoiser: DiffusersDenoiser, guidance_scale: float, null: Conditioning | None = None,
                 batch_branches: bool = True):
        super().__init__()
        self.denoiser = denoiser
        self.guidance_scale = float(guidance_scale)
        self.null = null
        self.batch_branches = batch_branches

    @property
    def null_condition(self) -> Conditioning:
        null = self.null if self.null is not None else self.denoiser.null_condition
        if null is None:
            raise ValueError("guidance needs a null condition: pass null= or call set_null_condition() on the "
                             "wrapped denoiser.")
        return null

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning | None = None,
                guidance_scale: float | None = None) -> torch.Tensor:
        """Guided `x0_hat`; `guidance_scale` overrides the stored scale for this call."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        null = self.null_condition
        if cond is None:
            return self.denoiser(x, sigma, null)
        if scale == 1.0:
            return self.denoiser(x, sigma, cond)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).expand(batch)
        null = null.expand(batch).to(cond.embeds.device)
        if self.batch_branches:
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([null, cond]))
            uncond, conditional = both.chunk(2)
        else:
            uncond, conditional = self.denoiser(x, sigma, null), self.denoiser(x, sigma, cond)
        return guide(uncond, conditional, scale)

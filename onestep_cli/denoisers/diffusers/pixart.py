"""PixArt-α / PixArt-Σ: diffusers' PixArtTransformer2DModel as a sigma-unit denoiser on latents."""

from __future__ import annotations

import torch

from .adapter import DDPMDenoiser
from .conditioning import Conditioning


class PixArtDenoiser(DDPMDenoiser):
    """PixArtTransformer2DModel with T5 conditioning (`cond.embeds` and its attention mask `cond.mask`).

    The network predicts epsilon and its variance (8 channels for 4 latent channels); the variance half is dropped,
    as diffusers' pipeline does. Models with `use_additional_conditions` (the 1024 px ones) get the image resolution
    and aspect ratio of the input latents, as the pipeline computes them.
    """

    def predict(self, x_vp: torch.Tensor, timestep: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
        batch = x_vp.shape[0]
        cond = self.resolve_condition(cond, batch, x_vp.dtype, x_vp.device)
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        if self.model.use_additional_conditions:
            height, width = (side * self.vae_scale_factor for side in x_vp.shape[-2:])
            added_cond_kwargs = {
                "resolution": torch.tensor([[height, width]], dtype=x_vp.dtype, device=x_vp.device).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[height / width]], dtype=x_vp.dtype, device=x_vp.device).repeat(batch, 1),
            }
        output = self.model(x_vp, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                            timestep=timestep, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return self._drop_learned_sigma(output)

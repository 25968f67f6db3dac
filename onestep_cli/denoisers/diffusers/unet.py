"""Stable Diffusion 1.5 / 2.1 and SDXL: diffusers' UNet2DConditionModel as a sigma-unit denoiser on latents."""

from __future__ import annotations

import torch

from .adapter import DDPMDenoiser
from .conditioning import Conditioning
from .schedule import DDPMSigmaSchedule

SUPPORTED_ADDITION_EMBEDS = (None, "text_time")  # None: SD 1.5/2.1; "text_time": SDXL (pooled text + time ids).


class UNetDenoiser(DDPMDenoiser):
    """UNet2DConditionModel, epsilon- or v-prediction.

    SD 1.5/2.1 take `cond.embeds` as cross-attention states. SDXL (`addition_embed_type="text_time"`) also needs
    `cond.pooled` (second text encoder's pooled output) and `cond.time_ids`, passed as `added_cond_kwargs`.
    """

    def __init__(self, model: torch.nn.Module, schedule: DDPMSigmaSchedule, prediction_type: str = "epsilon",
                 **latent_kwargs):
        addition = getattr(model.config, "addition_embed_type", None)
        if addition not in SUPPORTED_ADDITION_EMBEDS:
            raise ValueError(f"UNet2DConditionModel with addition_embed_type={addition!r} is not supported; supported: "
                             "none (SD 1.5/2.1) and 'text_time' (SDXL).")
        super().__init__(model, schedule, prediction_type, **latent_kwargs)

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.model.config, "addition_embed_type", None) == "text_time"

    def predict(self, x_vp: torch.Tensor, timestep: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
        cond = self.resolve_condition(cond, x_vp.shape[0], x_vp.dtype, x_vp.device)
        added_cond_kwargs = None
        if self.is_sdxl:
            if cond.pooled is None or cond.time_ids is None:
                raise ValueError("an SDXL UNet needs cond.pooled (pooled text embedding) and cond.time_ids (size and "
                                 "crop micro-conditioning); encode prompts with PromptEncoder of an SDXL pipeline.")
            added_cond_kwargs = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        output = self.model(x_vp, timestep, encoder_hidden_states=cond.embeds, added_cond_kwargs=added_cond_kwargs,
                            return_dict=False)[0]
        return self._drop_learned_sigma(output)

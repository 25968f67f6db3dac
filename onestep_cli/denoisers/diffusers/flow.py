"""Flow-matching teachers (SD3, SANA): a velocity network as a sigma-unit denoiser on latents.

`x_t = (1 - t) x0 + t eps` is `x / (1 + sigma)` with `sigma = t / (1 - t)`; the network predicts `v = eps - x0`, so
`x0 = x_t - t v_hat`. The network's timestep input is `t * num_train_timesteps` (times SANA's `timestep_scale`).
"""

from __future__ import annotations

import torch

from .adapter import DiffusersDenoiser
from .conditioning import Conditioning
from .schedule import FlowSigmaSchedule

SUPPORTED_FLOW_MODELS = ("SD3Transformer2DModel", "SanaTransformer2DModel")


class FlowDenoiser(DiffusersDenoiser):
    """SD3Transformer2DModel (`cond.embeds` + `cond.pooled`) or SanaTransformer2DModel (`cond.embeds` + `cond.mask`)."""

    def __init__(self, model: torch.nn.Module, schedule: FlowSigmaSchedule, **latent_kwargs):
        name = type(model).__name__
        if name not in SUPPORTED_FLOW_MODELS:
            raise ValueError(f"flow-matching network {name} is not supported; supported: "
                             f"{', '.join(SUPPORTED_FLOW_MODELS)} (Flux's packed latents are not).")
        super().__init__(model, **latent_kwargs)
        self.schedule = schedule

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's timestep input at noise level `sigma` (`[batch]` float32)."""
        return self.schedule.timestep(sigma) * float(getattr(self.model.config, "timestep_scale", 1.0))

    def predict(self, x_flow: torch.Tensor, timestep: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
        """The network's velocity `v = eps - x0` for the flow input `x_flow`."""
        cond = self.resolve_condition(cond, x_flow.shape[0], x_flow.dtype, x_flow.device)
        if type(self.model).__name__ == "SD3Transformer2DModel":
            if cond.pooled is None:
                raise ValueError("an SD3 transformer needs cond.pooled (the pooled CLIP embeddings).")
            return self.model(hidden_states=x_flow, timestep=timestep, encoder_hidden_states=cond.embeds,
                              pooled_projections=cond.pooled, return_dict=False)[0]
        return self._drop_learned_sigma(self.model(x_flow, encoder_hidden_states=cond.embeds,
                                                   encoder_attention_mask=cond.mask, timestep=timestep,
                                                   return_dict=False)[0])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """`x0_hat` (float32) of `x = x0 + sigma * eps`; `cond=None` means the null condition."""
        x = x.to(torch.float32)
        sigma = self._flat_sigma(sigma, x)
        t = sigma / (1 + sigma)
        x_flow = x / (1 + sigma)
        timestep = self.timestep(sigma.flatten()).to(x.device)
        velocity = self.predict(x_flow.to(self.model_dtype), timestep, cond).to(torch.float32)
        return x_flow - t * velocity

"""The repeated units of a denoiser's network: what FSDP shards one by one, gradient checkpointing recomputes and
`train.compile` compiles."""

from __future__ import annotations

import torch

from .mlp import MLPDenoiser

DIFFUSERS_TRANSFORMERS = ("PixArtTransformer2DModel", "SD3Transformer2DModel", "SanaTransformer2DModel")


def blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated units that FSDP shards one by one and gradient checkpointing recomputes: U-Net blocks, a
    diffusers network's down/mid/up blocks or transformer blocks, or an MLP denoiser's hidden stack."""
    from .edm.layers import UNetBlock

    found = [m for m in network.modules() if isinstance(m, UNetBlock)]
    for module in network.modules():
        if type(module).__name__ == "UNet2DConditionModel":
            found += [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []),
                      *module.up_blocks]
        elif type(module).__name__ in DIFFUSERS_TRANSFORMERS:
            found += list(module.transformer_blocks)
    return found or [m.net for m in network.modules() if isinstance(m, MLPDenoiser)]

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


# Network families, as `train.compile: auto` and `train.channels_last: auto` tell them apart (engine/switches.py).
EDM_UNET, DIFFUSERS_UNET, DIFFUSERS_TRANSFORMER, MLP = "edm_unet", "diffusers_unet", "diffusers_transformer", "mlp"


def network_family(network: torch.nn.Module) -> str:
    """Which kind of network `network` is, or holds: an EDM U-Net (SongUNet, DhariwalUNet), a diffusers U-Net
    (SD, SDXL), a diffusers transformer (PixArt, SD3, SANA), or an MLP denoiser; "other" for anything else."""
    from .edm.layers import UNetBlock

    names = {type(module).__name__ for module in network.modules()}
    if names & set(DIFFUSERS_TRANSFORMERS):
        return DIFFUSERS_TRANSFORMER
    if "UNet2DConditionModel" in names:
        return DIFFUSERS_UNET
    if any(isinstance(module, UNetBlock) for module in network.modules()):
        return EDM_UNET
    if any(isinstance(module, MLPDenoiser) for module in network.modules()):
        return MLP
    return "other"

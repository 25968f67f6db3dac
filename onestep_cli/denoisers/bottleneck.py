"""A denoiser's bottleneck features: the activations at the lowest resolution of its U-Net, where DMD2 attaches its
real-vs-fake classifier (the output of the encoder's last block for EDM's U-Nets, of the mid block for a diffusers
UNet2DConditionModel). Read with a forward hook, so the networks themselves stay as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import OnestepError


class NoBottleneckError(OnestepError, ValueError):
    """The denoiser has no U-Net bottleneck to read features from (an MLP, a transformer)."""


@dataclass(frozen=True)
class Bottleneck:
    """Where a denoiser's bottleneck features come from and their shape for a given input size."""

    module: torch.nn.Module  # Its forward output is the features [B, channels, H / 2^downsamplings, W / ...].
    channels: int
    downsamplings: int  # Halvings of the input's height and width before the bottleneck.

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the features for an input of `height` x `width`."""
        return height >> self.downsamplings, width >> self.downsamplings


def find_bottleneck(denoiser: torch.nn.Module) -> Bottleneck:
    """The bottleneck of an EDM U-Net (SongUNet, DhariwalUNet) or diffusers UNet2DConditionModel inside `denoiser`;
    NoBottleneckError for other networks."""
    from .edm.networks import DhariwalUNet, SongUNet

    for module in denoiser.modules():
        if isinstance(module, (SongUNet, DhariwalUNet)):
            # DMD2's return_bottleneck (third_party/edm/training/networks.py L457): x after the last encoder block.
            last = list(module.enc.values())[-1]
            downs = sum(1 for name in module.enc if name.endswith("_down") and "aux" not in name)
            return Bottleneck(last, last.out_channels, downs)
        if type(module).__name__ == "UNet2DConditionModel" and module.mid_block is not None:
            # DMD2's classify_forward (main/sd_unet_forward.py L249-251): the sample after the mid block.
            downs = sum(1 for block in module.down_blocks if getattr(block, "downsamplers", None))
            return Bottleneck(module.mid_block, module.config.block_out_channels[-1], downs)
    raise NoBottleneckError(f"{type(denoiser).__name__} has no U-Net bottleneck to classify images from; the GAN "
                            "term needs an EDM U-Net (SongUNet, DhariwalUNet) or a diffusers UNet2DConditionModel.")


@contextlib.contextmanager
def capture_output(module: torch.nn.Module):
    """Within the block, each forward of `module` appends its output to the yielded list (the hook is removed on
    exit, so a later recomputation, e.g. by gradient checkpointing, records nothing)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def bottleneck_features(denoiser: torch.nn.Module, bottleneck: Bottleneck, x: torch.Tensor, sigma: torch.Tensor,
                        cond=None) -> torch.Tensor:
    """The bottleneck features of `denoiser(x, sigma, cond)`; the rest of its forward runs too, but its output takes
    no part in the graph, so backward reaches only the encoder."""
    with capture_output(bottleneck.module) as outputs:
        denoiser(x, sigma, cond)
    if len(outputs) != 1:
        raise RuntimeError(f"the bottleneck of {type(denoiser).__name__} ran {len(outputs)} times in one forward; "
                           "expected once (a guided fake score runs its network twice: set fake.guidance_scale=1).")
    return outputs[0]

"""DMD2's GAN term: a classifier head on the fake score's bottleneck features, trained to tell real images from
generated ones, and a generator loss that rewards fooling it (tianweiy/DMD2 @8d8fa55, main/edm/edm_guidance.py).

Both images are noised before the fake score classifies them, each at its own level (`--diffusion_gan`, L174-190);
the losses are the non-saturating softplus pair of L199 and L209:
    discriminator (head and fake score): softplus(l_fake) + softplus(-l_real)
    generator:                           softplus(-l_fake_with_grad)
with l = head(bottleneck(D_fake(x + sigma*eps, sigma, c))). DMD2 averages them over the batch and adds them to losses
that are means over a sample's elements; onestep's losses are sums over those elements, so each GAN loss is
multiplied by the element count, and the weights keep DMD2's meaning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GANConfig
from ..denoisers.base import broadcast_sigma
from ..denoisers.bottleneck import Bottleneck, bottleneck_features, find_bottleneck

HEAD_ATTRIBUTE = "gan_head"  # The fake score's submodule holding the head: saved, resumed and optimised with it.
HALVE_TO = 4  # DMD2's head halves the features down to 4x4 before its last spatial convolution.
DMD2_GROUPS = 32  # DMD2's GroupNorm(32, channels) between the head's convolutions.
MIN_GROUP_CHANNELS = 16  # Fewer channels per group at the 1x1 features leave the logit little but their signs.


def head_groups(channels: int) -> int:
    """GroupNorm groups for a head `channels` wide: DMD2's 32 wherever each group keeps 16 channels or more (its
    networks have 768 and 1280), else the most that keep 16 and divide `channels`. On a 1x1 feature map a group of 2
    channels normalises to about +-1 whatever the input, so DMD2's 32 groups on a 64-channel bottleneck leave a
    classifier that cannot learn (the 32x32 digits teacher's head stayed at chance for 5000 updates)."""
    most = max(1, min(DMD2_GROUPS, channels // MIN_GROUP_CHANNELS))
    return max(groups for groups in range(1, most + 1) if channels % groups == 0)


def discriminator_head(channels: int, size: tuple[int, int]) -> nn.Sequential:
    """DMD2's cls_pred_branch (edm_guidance.py L47-56; main/sd_guidance.py L107-133 for SDXL's 32x32): 4x4 stride-2
    convolutions halve the features down to 4x4, one convolution the size of what is left reduces them to 1x1, a 1x1
    convolution gives one logit; GroupNorm (`head_groups`) and SiLU between them."""
    groups = head_groups(channels)
    height, width = size
    layers: list[nn.Module] = []
    while min(height, width) > HALVE_TO:
        layers += [nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1), nn.GroupNorm(groups, channels),
                   nn.SiLU()]
        height, width = height // 2, width // 2
    layers += [nn.Conv2d(channels, channels, kernel_size=(height, width), stride=(height, width)),
               nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, 1, kernel_size=1)]
    return nn.Sequential(*layers)


def attach_discriminator_head(fake: nn.Module, data_shape: tuple[int, ...], seed: int) -> nn.Sequential:
    """Build the head for `fake`'s bottleneck at images of `data_shape` (C, H, W), initialised from `seed` without
    touching the global random stream, and register it as `fake.gan_head`: the fake score's optimizer, gradient
    clipping, DDP and checkpoints then include it, as DMD2's guidance model holds its cls_pred_branch."""
    bottleneck = find_bottleneck(fake)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = discriminator_head(bottleneck.channels, bottleneck.size(*data_shape[-2:]))
    fake.add_module(HEAD_ATTRIBUTE, head)
    return head


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample non-saturating generator loss softplus(-l) (DMD2's gen_cls_loss, edm_guidance.py L199)."""
    return F.softplus(-logits_fake)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample classification loss softplus(l_fake) + softplus(-l_real) (DMD2's guidance_cls_loss, L209)."""
    return F.softplus(logits_fake) + F.softplus(-logits_real)


class GANTerm:
    """The GAN losses of a run against its fake score (which carries the head as `fake.gan_head`)."""

    def __init__(self, config: GANConfig, fake: nn.Module, data_shape: tuple[int, ...]):
        self.config = config
        self.bottleneck: Bottleneck = find_bottleneck(fake)
        self.elements = math.prod(data_shape)  # DMD2's losses are means over these; onestep's are sums.

    def logits(self, fake: nn.Module, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
               cond=None) -> torch.Tensor:
        """Realism logits [batch] of images `x` noised to `sigma` (DMD2's compute_cls_logits, L174-190)."""
        x_t = x + broadcast_sigma(sigma, x) * noise
        features = bottleneck_features(fake, self.bottleneck, x_t, sigma, cond)
        return getattr(fake, HEAD_ATTRIBUTE)(features.float()).reshape(x.shape[0])

    def generator_loss(self, fake: nn.Module, x_g: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted per-sample loss to add to the generator's, unweighted batch mean for the stats). The fake
        score and head must be frozen by the caller; gradients flow through them into x_g."""
        loss = generator_gan_loss(self.logits(fake, x_g, sigma, noise, cond))
        return self.config.gen_cls_loss_weight * self.elements * loss, loss.detach().mean()

    def discriminator_loss(self, fake: nn.Module, real: torch.Tensor, real_cond, real_sigma: torch.Tensor,
                           real_noise: torch.Tensor, x_g: torch.Tensor, cond, sigma: torch.Tensor,
                           noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted per-sample loss to add to the fake score's, unweighted stats: the loss and the mean predicted
        realism of real and generated images). Neither image carries gradient back to its source."""
        logits_real = self.logits(fake, real.detach(), real_sigma, real_noise, real_cond)
        logits_fake = self.logits(fake, x_g.detach(), sigma, noise, cond)
        loss = discriminator_loss(logits_real, logits_fake)
        stats = {"loss_gan_discriminator": loss.detach().mean(),
                 "realism_real": torch.sigmoid(logits_real.detach()).mean(),
                 "realism_fake": torch.sigmoid(logits_fake.detach()).mean()}
        return self.config.guidance_cls_loss_weight * self.elements * loss, stats

"""The EDM image U-Nets: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM).

Both take `(x, noise_labels, class_labels, augment_labels=None)` and return the raw network output `F(x)`; the
preconditioning wrappers in `precond.py` turn that into a denoiser. Module names, the keys of the `enc`/`dec`
ModuleDicts (`"32x32_conv"`, `"16x16_down"`, `"8x8_block3"`, ...) and their order are EDM's, so EDM state dicts load
one-to-one. Constructor arguments keep EDM's names and defaults so that EDM's recorded `init_kwargs` rebuild them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import silu

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


class SongUNet(nn.Module):
    """DDPM++ and NCSN++ from Song et al., "Score-Based Generative Modeling through SDEs", as configured by EDM.

    DDPM++: `embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=[1, 1]`.
    NCSN++: `embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1]`.
    """

    def __init__(
        self,
        img_resolution: int,                # Image resolution at input and output, pixels.
        in_channels: int,                   # Colour channels at input.
        out_channels: int,                  # Colour channels at output.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,               # Augmentation label size, 0 = no augmentation conditioning.
        model_channels: int = 128,          # Base channel count.
        channel_mult: list[int] = (1, 2, 2, 2),  # Channel multiplier per resolution level.
        channel_mult_emb: int = 4,          # Embedding size as a multiple of model_channels.
        num_blocks: int = 4,                # Residual blocks per resolution level.
        attn_resolutions: list[int] = (16,),  # Resolutions, in pixels, that get self-attention.
        dropout: float = 0.10,              # Dropout probability inside residual blocks.
        label_dropout: float = 0,           # Probability of zeroing the class label in training (for guidance).
        embedding_type: str = "positional",  # Noise embedding: "positional" (DDPM++) or "fourier" (NCSN++).
        channel_mult_noise: int = 1,        # Noise embedding size as a multiple of model_channels: 1 or 2.
        encoder_type: str = "standard",     # "standard" (DDPM++), "skip" or "residual" (NCSN++).
        decoder_type: str = "standard",     # "standard" or "skip".
        resample_filter: list[int] = (1, 1),  # FIR filter for resampling: [1, 1] or [1, 3, 3, 1].
    ):
        for name, value, allowed in (("embedding_type", embedding_type, ("fourier", "positional")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"SongUNet {name}={value!r} is not one of {', '.join(allowed)}.")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = (Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(in_channels=cout, out_channels=cout, down=True,
                                                          **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(in_channels=caux, out_channels=caux, kernel=0,
                                                               down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(in_channels=cout, out_channels=cout, attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                # Only the last block of a level attends, unlike the encoder.
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=attention, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(in_channels=out_channels, out_channels=out_channels,
                                                             kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3,
                                                           **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output for inputs `x` at (preconditioned) noise levels `noise_labels`."""
        emb = self.map_noise(noise_labels)
        # Swap the cos and sin halves, as the original DDPM++ code orders them.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, x) if self.training else class_labels
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                x = block(x, emb, skips.pop() if x.shape[1] != block.in_channels else None)
        return aux


class DhariwalUNet(nn.Module):
    """ADM from Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", as configured by EDM."""

    def __init__(
        self,
        img_resolution: int,                # Image resolution at input and output, pixels.
        in_channels: int,                   # Colour channels at input.
        out_channels: int,                  # Colour channels at output.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,               # Augmentation label size, 0 = no augmentation conditioning.
        model_channels: int = 192,          # Base channel count.
        channel_mult: list[int] = (1, 2, 3, 4),  # Channel multiplier per resolution level.
        channel_mult_emb: int = 4,          # Embedding size as a multiple of model_channels.
        num_blocks: int = 3,                # Residual blocks per resolution level.
        attn_resolutions: list[int] = (32, 16, 8),  # Resolutions, in pixels, that get self-attention.
        dropout: float = 0.10,              # Dropout probability inside residual blocks.
        label_dropout: float = 0,           # Probability of zeroing the class label in training (for guidance).
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                 init_mode="kaiming_normal", init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(in_channels=cout, out_channels=cout, down=True,
                                                          **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(in_channels=cout, out_channels=cout, attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output for inputs `x` at (preconditioned) noise levels `noise_labels`."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, x) if self.training else class_labels
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        for block in self.dec.values():
            x = block(x, emb, skips.pop() if x.shape[1] != block.in_channels else None)
        return self.out_conv(self.out_norm(x, silu=True))


def _drop_labels(class_labels: torch.Tensor, label_dropout: float, x: torch.Tensor) -> torch.Tensor:
    """Zero each sample's class label with probability `label_dropout` (training for classifier-free guidance)."""
    if not label_dropout:
        return class_labels
    keep = torch.rand([x.shape[0], 1], device=x.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)

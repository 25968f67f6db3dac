"""EDM's non-leaking geometric augmentation, the subset its CIFAR-10 networks were trained with, and their labels.

EDM (and SiD after it) augments training images with x-flip, y-flip, isotropic scaling, rotation, anisotropic scaling
and fractional translation, and tells the network what was done through 9 augmentation labels (`augment_dim=9`).
Conditioned on them the network learns the un-augmented distribution at all-zero labels, so nothing leaks into it.
This is our implementation of the same transformations and the same label layout:

| label | op | value | chance per image |
|---|---|---|---|
| 0 | x-flip | 1 if flipped, else 0 (a fair coin) | min(1, 1e8 p): a coin for every image whenever p > 0 |
| 1 | y-flip | 1 if flipped, else 0 (a fair coin) | p |
| 2 | isotropic scaling by 2^(0.2 w) | w ~ N(0, 1) | p |
| 3, 4 | rotation by a ~ U(-pi, pi) | cos(a) - 1, sin(a) | p |
| 5, 6 | stretch by 2^(0.2 w) along an axis at angle r (r ~ U(-pi, pi) half the time, else 0) | w cos(r), w sin(r) | p |
| 7, 8 | translation by (0.125 W u, 0.125 H v) pixels | u, v ~ N(0, 1) | p |

An op not applied has label 0 (identity). Flips move pixels; the other four ops compose into one affine map, applied
by resampling exactly as EDM's `AugmentPipe` (NVlabs/edm, `training/augment.py`) does it, so that for the same
parameters our images equal EDM's to float32 rounding (tests/test_reference_augment.py, against a recording of EDM's
own code by scripts/reference/edm_augment.py). EDM, and so we:

1. reflect-pad by a margin that is data-dependent: how far beyond the image the batch's output corners land in the
   input, plus 6 pixels for the two filters, rounded up and capped at one image less a pixel. One margin serves the
   whole batch, the widest any of its images needs, so an image's border pixels can move by up to ~1e-4 with its
   batch mates; an `Augmentation` sliced from a drawn batch keeps that batch's margin, so its parts augment as the
   whole does.
   We always pad by the cap and zero what lies beyond EDM's margin: the same values, in shapes a CUDA graph records.
2. upsample 2x with the Symlet-6 wavelet filter (zero insertion, then the filter);
3. sample bilinearly, zeros beyond the padded image, on a grid at twice the resolution and 3 pixels wider than the
   image on each side. In upsampled pixels centred on each grid, output position q reads the input at
   A (q + 1/2) - 1/2 + 2 t (A, t: the map in image pixels): rotations and scalings pivot half an upsampled pixel
   up and left of the grid centre, which with the filter's delay is 0.049 pixels up and left of the image centre (a
   half turn also moves the content 0.098 pixels up and left). We keep EDM's pivot: its networks learned it;
4. downsample 2x with the same filter and crop to the image.

With the identity map this chain returns the image (the filter is orthonormal), so an image that is not transformed
comes back unchanged up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9  # Labels of the ops above, EDM's layout for its CIFAR-10 pipeline.
XFLIP_MULTIPLIER = 1e8  # EDM's CIFAR-10 setting: x-flip's chance is min(1, 1e8 p), a fair coin for every image.
SCALE_STD = 0.2  # Log2 standard deviation of isotropic scaling.
ANISO_STD = 0.2  # Log2 standard deviation of anisotropic scaling.
ANISO_ROTATE_PROB = 0.5  # Chance that the stretch axis is rotated away from x.
TRANSLATE_STD = 0.125  # Standard deviation of translation, in image widths/heights.
# Decomposition low-pass filter of the Symlet-6 wavelet (PyWavelets' sym6 dec_lo): sum sqrt(2), orthonormal shifts.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)
FILTER_REACH = len(SYM6) // 4  # Pixels that a 2x filter (up or down) reaches beyond the image on each side.
PAD_BEYOND_CORNERS = 2 * FILTER_REACH  # EDM's margin beyond the landed output corners: both filters' reach.
PIVOT = -0.5  # The point EDM rotates and scales about: upsampled pixels from the sample grid's centre, on each axis.


@dataclass
class Augmentation:
    """Per-sample parameters of the ops in the module's table (0 everywhere is the identity); slice with `aug[i:j]`."""

    xflip: torch.Tensor  # [N] 1 flips left-right.
    yflip: torch.Tensor  # [N] 1 flips top-bottom.
    scale: torch.Tensor  # [N] w: the image is scaled by 2^(SCALE_STD w).
    rotate: torch.Tensor  # [N] angle in radians.
    aniso: torch.Tensor  # [N] w: stretched by 2^(ANISO_STD w) along the axis at `aniso_angle`, squeezed across it.
    aniso_angle: torch.Tensor  # [N] radians.
    translate: torch.Tensor  # [N, 2] (u, v): moved by (TRANSLATE_STD W u, TRANSLATE_STD H v) pixels.
    # The batch this was sliced from (None: this is the batch): EDM pads a whole batch alike (`padding_margin`).
    batch: Augmentation | None = field(default=None, repr=False)

    def __getitem__(self, index) -> Augmentation:
        whole = self if self.batch is None else self.batch
        return Augmentation(**{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "batch"},
                            batch=whole)

    def __len__(self) -> int:
        return len(self.xflip)

    def labels(self) -> torch.Tensor:
        """EDM's `[N, 9]` augmentation labels (float32), in the order of the module's table."""
        return torch.stack([self.xflip, self.yflip, self.scale, self.rotate.cos() - 1, self.rotate.sin(),
                            self.aniso * self.aniso_angle.cos(), self.aniso * self.aniso_angle.sin(),
                            self.translate[:, 0], self.translate[:, 1]], dim=1).to(torch.float32)

    def inverse_matrix(self, height: int, width: int) -> torch.Tensor:
        """`[N, 3, 3]` maps from output to input pixel positions (x right, y down, origin at the image centre)."""
        shrink = torch.exp2(-SCALE_STD * self.scale)
        stretch = torch.exp2(ANISO_STD * self.aniso)
        shift = self.translate * constants([width * TRANSLATE_STD, height * TRANSLATE_STD], self.translate)
        return (_scale(shrink, shrink) @ _rotate(self.rotate) @ _rotate(-self.aniso_angle)
                @ _scale(1 / stretch, stretch) @ _rotate(self.aniso_angle) @ _translate(-shift))


def identity_augmentation(batch: int, device: torch.device | str = "cpu") -> Augmentation:
    """Parameters that change nothing: all labels 0."""
    zero = torch.zeros(batch, device=device)
    return Augmentation(zero, zero, zero, zero, zero, zero, torch.zeros(batch, 2, device=device))


def draw_augmentation(batch: int, p: float, generator: torch.Generator, device: torch.device | str) -> Augmentation:
    """Random parameters for `batch` images: each op of the table applied with its chance at probability `p`."""
    if not 0 <= p <= 1:
        raise ValueError(f"augmentation probability p={p} must lie in [0, 1].")
    if p == 0:
        return identity_augmentation(batch, device)
    draw = dict(generator=generator, device=device)
    chance = constants([min(1.0, XFLIP_MULTIPLIER * p), p, p, p, p, p, ANISO_ROTATE_PROB],
                       torch.empty(0, device=device))
    applied = (torch.rand(batch, len(chance), **draw) < chance).float()  # xflip yflip scale rotate aniso shift axis
    coins = torch.randint(2, (batch, 2), **draw).float()
    normal = torch.randn(batch, 4, **draw)  # scale, aniso, translate u, v
    angles = (torch.rand(batch, 2, **draw) * 2 - 1) * math.pi  # rotation, stretch axis
    return Augmentation(xflip=coins[:, 0] * applied[:, 0], yflip=coins[:, 1] * applied[:, 1],
                        scale=normal[:, 0] * applied[:, 2], rotate=angles[:, 0] * applied[:, 3],
                        aniso=normal[:, 1] * applied[:, 4], aniso_angle=angles[:, 1] * applied[:, 6],
                        translate=normal[:, 2:] * applied[:, 5:6])


def augment(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """`images` [N, C, H, W] transformed by `augmentation` (float32); the labels are `augmentation.labels()`."""
    if len(augmentation) != images.shape[0]:
        raise ValueError(f"{len(augmentation)} augmentations for {images.shape[0]} images; draw one per image.")
    images = images.to(torch.float32)
    flip = lambda on: on.to(torch.bool).reshape(-1, 1, 1, 1)
    images = torch.where(flip(augmentation.xflip), images.flip(3), images)
    images = torch.where(flip(augmentation.yflip), images.flip(2), images)
    height, width = images.shape[2:]
    batch = augmentation if augmentation.batch is None else augmentation.batch
    margin = padding_margin(batch.inverse_matrix(height, width), height, width)
    return resample(images, augmentation.inverse_matrix(height, width), margin)


def padding_margin(inverse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """EDM's reflection padding (left, top, right, bottom) for a batch mapped by `inverse`, in whole pixels (float).

    How far beyond the image the output corners of any image of the batch land in the input, plus PAD_BEYOND_CORNERS,
    rounded up, and between 0 and one image less a pixel (the most that reflection can pad).
    """
    half_x, half_y = (width - 1) / 2, (height - 1) / 2
    corners = constants([-half_x, half_x, half_x, -half_x, -half_y, -half_y, half_y, half_y, 1, 1, 1, 1],
                        inverse).reshape(3, 4)
    landed = (inverse @ corners)[:, :2]  # [N, (x, y), corner], origin at the image centre
    furthest = torch.cat([-landed, landed], dim=1).amax(dim=(0, 2))  # left, up, right, down
    margin = furthest + constants([PAD_BEYOND_CORNERS - half_x, PAD_BEYOND_CORNERS - half_y] * 2, inverse)
    return torch.minimum(margin.clamp(min=0), constants([width - 1, height - 1] * 2, inverse)).ceil()


def resample(images: torch.Tensor, inverse: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Each image `images[i]` resampled at the positions `inverse[i] @ (x, y, 1)` of its output pixels, as EDM does.

    Reflect-padded by `margin` (left, top, right, bottom; see `padding_margin`), upsampled 2x with the Symlet-6
    filter, sampled bilinearly, downsampled 2x with the same filter. Positions beyond the padding read zeros.
    """
    batch, channels, height, width = images.shape
    taps = constants(SYM6, images)
    # Padded by the most EDM pads, then zeroed beyond EDM's margin: static shapes, EDM's values.
    pad_y, pad_x = height - 1, width - 1
    x = F.pad(images, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    x = torch.where(_padded(height, pad_y, margin[1], margin[3], 1)[:, None]
                    & _padded(width, pad_x, margin[0], margin[2], 1)[None, :], x, 0)
    # Upsampling: zero insertion and the filter as one transposed convolution per axis (output size exactly 2x).
    # EDM's upsampled image ends 2x its margin beyond the image; its bilinear sampling reads zeros past that.
    x = x.reshape(batch * channels, 1, height + 2 * pad_y, width + 2 * pad_x)
    half = len(SYM6) // 2 - 1
    x = F.conv_transpose2d(x, taps.reshape(1, 1, 1, -1), stride=(1, 2), padding=(0, half))
    x = F.conv_transpose2d(x, taps.reshape(1, 1, -1, 1), stride=(2, 1), padding=(half, 0))
    x = torch.where(_padded(height, pad_y, margin[1], margin[3], 2)[:, None]
                    & _padded(width, pad_x, margin[0], margin[2], 2)[None, :], x, 0)

    # Output grid at twice the resolution, FILTER_REACH pixels wider than the image on each side. In centred
    # upsampled coordinates the map keeps its linear part, doubles its translation and pivots about PIVOT.
    # affine_grid works in [-1, 1] units of each grid.
    out_h, out_w = 2 * (height + 2 * FILTER_REACH), 2 * (width + 2 * FILTER_REACH)
    in_h, in_w = x.shape[2], x.shape[3]
    linear = inverse[:, :2, :2].to(images.dtype)
    pivot = torch.full((2,), PIVOT, dtype=images.dtype, device=images.device)
    shift = 2 * inverse[:, :2, 2].to(images.dtype) + (torch.eye(2, device=images.device) - linear) @ pivot
    to_input = constants([2 / in_w, 2 / in_h], images)
    from_output = constants([out_w / 2, out_h / 2], images)
    theta = torch.cat([to_input[:, None] * linear * from_output[None, :], (to_input * shift)[..., None]], dim=2)
    grid = F.affine_grid(theta, [batch, channels, out_h, out_w], align_corners=False)
    x = x.reshape(batch, channels, in_h, in_w)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Downsampling: the filter at stride 2; starting one sample in keeps the image centre where it was.
    x = x.reshape(batch * channels, 1, out_h, out_w)[:, :, 1:, 1:]
    x = F.conv2d(x, taps.reshape(1, 1, 1, -1), stride=(1, 2))
    x = F.conv2d(x, taps.reshape(1, 1, -1, 1), stride=(2, 1))
    return x.reshape(batch, channels, height, width)


def _padded(size: int, pad: int, before: torch.Tensor, after: torch.Tensor, factor: int) -> torch.Tensor:
    """Which samples of an axis of `size` pixels padded by `pad` each side, upsampled `factor` times, lie within
    EDM's padding: `before` pixels before the image, `after` after it."""
    index = torch.arange(factor * (size + 2 * pad), device=before.device)
    return (index >= factor * (pad - before)) & (index < factor * (pad + size + after))


def constants(values, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of Python numbers with `like`'s dtype and device, filled on the device: unlike torch.tensor, no
    copy from host memory, so that a CUDA graph can record it (train.cuda_graph)."""
    return torch.stack([torch.full((), value, dtype=like.dtype, device=like.device) for value in values])


def _matrices(entries: list[list], like: torch.Tensor) -> torch.Tensor:
    """`[N, 3, 3]` from a 3x3 nested list of `[N]` tensors and numbers (filled on the device, as `constants`)."""
    entry = lambda e: (torch.full(like.shape, e, dtype=like.dtype, device=like.device) if isinstance(e, (int, float))
                       else e.to(like.dtype).expand(like.shape))
    rows = [torch.stack([entry(e) for e in row], dim=-1) for row in entries]
    return torch.stack(rows, dim=-2)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrices([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = angle.cos(), angle.sin()
    return _matrices([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], angle)


def _translate(shift: torch.Tensor) -> torch.Tensor:
    return _matrices([[1, 0, shift[:, 0]], [0, 1, shift[:, 1]], [0, 0, 1]], shift[:, 0])

"""scikit-learn's handwritten digits (1797 real 8x8 grey images, 10 classes) as image tensors in [-1, 1].

The images are upsampled from 8x8 with bilinear interpolation (`align_corners=False`, i.e. pixel centres aligned):
smooth strokes rather than 2x2 blocks, so a generator is not asked to reproduce an artificial block pattern.
Every digits model shipped with onestep (teacher, classifier) was trained on exactly this transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

NATIVE_RESOLUTION = 8  # Pixels of sklearn's digits.
DEFAULT_RESOLUTION = 16  # Resolution of the shipped teacher and classifier.
NUM_CLASSES = 10
MAX_INTENSITY = 16.0  # sklearn stores each pixel as an integer count in 0..16.
NUM_DIGITS = 1797


def upsample_digits(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear upsampling of `[N, 1, 8, 8]` images to `[N, 1, resolution, resolution]` (identity at 8)."""
    if resolution == images.shape[-1]:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


def load_digits_images(resolution: int = DEFAULT_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images `[1797, 1, resolution, resolution]` float32 in [-1, 1], labels `[1797]` int64.

    The order is sklearn's (`sklearn.datasets.load_digits`), so index i is the same digit at every resolution.
    """
    if resolution < NATIVE_RESOLUTION:
        raise InputError(f"resolution {resolution} is below the digits' native {NATIVE_RESOLUTION} pixels; "
                         f"pass {NATIVE_RESOLUTION} or more.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / MAX_INTENSITY * 2 - 1
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return upsample_digits(images, resolution).clamp(-1, 1), labels


def split_indices(num: int = NUM_DIGITS, test_fraction: float = 0.25,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random (train, test) split of `range(num)`; the shipped classifier was trained on seed 0, 25% test."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_test = int(round(num * test_fraction))
    return order[num_test:].sort().values, order[:num_test].sort().values

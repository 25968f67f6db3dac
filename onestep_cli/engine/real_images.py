"""The real images of the GAN term (gan.data): read once from a folder or an .npz, held as uint8, drawn per update."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..errors import InputError, MissingFileError
from ..sample_io import SourceError, folder_source, npz_image_source

READ_BATCH = 1024  # Images decoded at a time while loading.
SHIPPED_DIGITS = "@assets/digits_real/digits8.npz"  # Named in the errors: the real digits shipped with onestep.


@dataclass
class RealImages:
    """Images [N, C, H, W] uint8 (a view of the data as read) and, for a class-conditional teacher, their class
    indices [N]."""

    images: torch.Tensor
    labels: torch.Tensor | None
    label_dim: int

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`batch` images drawn uniformly with replacement, as float [-1, 1] (DMD2's images * 2 - 1 of [0, 1]), and
        their one-hot labels (None for an unconditional teacher); on the CPU."""
        index = torch.randint(self.images.shape[0], (batch,), generator=generator)
        images = self.images[index].float() / 127.5 - 1
        if self.labels is None:
            return images, None
        return images, torch.nn.functional.one_hot(self.labels[index], self.label_dim).float()


def load_real_images(path: Path, shown: str, data_shape: tuple[int, ...], label_dim: int) -> RealImages:
    """Read gan.data (`path`, written `shown` in the config) for a teacher of samples `data_shape` and `label_dim`
    classes; errors name the key, the file and what to give instead."""
    if len(data_shape) != 3:
        raise ConfigError(f"gan.data needs a teacher of images, but this one's samples are points of shape "
                          f"{list(data_shape)}; remove the gan section.")
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"gan.data {shown} does not exist; give a folder of images or an .npz of images "
                               f"(the shipped 8x8 digits: {SHIPPED_DIGITS}).")
    try:
        if path.is_dir():
            source = folder_source(path)
        elif path.suffix.lower() == ".npz":
            source = npz_image_source(path)
        else:
            raise InputError(f"gan.data {shown} is neither a folder of images nor an .npz; give one of those.")
        # An .npz is already in memory: one batch is a view of it; a folder is decoded a batch at a time.
        batches = [batch for _, batch in source.batches(source.num if path.is_file() else READ_BATCH)]
        images = batches[0] if len(batches) == 1 else np.concatenate(batches)
    except SourceError as error:
        raise InputError(f"gan.data {shown} cannot be used as real images: {str(error).rstrip('.')}.") from None
    channels, height, width = data_shape
    if images.shape[1:3] != (height, width):
        raise InputError(f"gan.data {shown} holds {images.shape[2]}x{images.shape[1]} images but the teacher makes "
                         f"{width}x{height}; give images of the teacher's size.")
    images = torch.from_numpy(images).permute(0, 3, 1, 2)  # A view of RGB [N, H, W, 3] (grey replicated): no copy.
    if channels == 1:
        if not (images == images[:, :1]).all():
            raise InputError(f"gan.data {shown} holds colour images but the teacher makes grey ones (1 channel); "
                             "give grey images.")
        images = images[:, :1]
    elif channels != 3:
        raise ConfigError(f"gan.data: the teacher makes images of {channels} channels; real images have 1 or 3.")
    labels = None
    if label_dim:
        if not source.has_labels:
            raise InputError(f"gan.data {shown} has no class labels, and the teacher is class-conditional "
                             f"({label_dim} classes); give an .npz with a 'labels' array of class indices.")
        labels = torch.from_numpy(source.labels(0, source.num).copy())
        if labels.min() < 0 or labels.max() >= label_dim:
            raise InputError(f"gan.data {shown} has class labels from {int(labels.min())} to {int(labels.max())}, "
                             f"but the teacher has classes 0 to {label_dim - 1}.")
    return RealImages(images, labels, label_dim)


def load_gan_data(config: RunConfig, data_shape: tuple[int, ...], label_dim: int) -> RealImages:
    """The real images of a run's `gan:` section for its teacher's samples (`data_shape`, `label_dim` classes)."""
    if config.teacher.kind == "diffusers":
        raise ConfigError("gan: a text-to-image teacher would need its real images encoded by its VAE and paired with "
                          "their captions, which onestep does not do; the GAN term runs with EDM teachers "
                          "(teacher.kind: edm). Remove the gan section.")
    return load_real_images(config.gan.resolved_data, str(config.gan.data), data_shape, label_dim)

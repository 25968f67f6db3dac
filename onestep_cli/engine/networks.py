"""Build the three networks of a run (teacher, generator, fake score) from its config."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import EDMTeacherConfig, GMMTeacherConfig, RunConfig
from ..denoisers.base import Denoiser
from ..denoisers.generator import OneStepGenerator
from ..denoisers.gmm import GaussianMixtureDenoiser
from ..denoisers.mlp import MLPDenoiser


@dataclass
class Networks:
    teacher: Denoiser  # Frozen.
    generator: OneStepGenerator
    fake: Denoiser
    data_shape: tuple[int, ...]  # Shape of one sample (and of its latent noise).
    label_dim: int  # Classes of a class-conditional teacher, 0 otherwise.


def build_teacher(config) -> Denoiser:
    """The frozen teacher denoiser described by a `teacher:` config section."""
    if isinstance(config, GMMTeacherConfig):
        teacher = GaussianMixtureDenoiser(config.means, config.stds, config.weights)
    elif isinstance(config, EDMTeacherConfig):
        path = config.resolved_path
        if not path.exists():
            where = f" {config.hint}" if config.hint else ""
            raise FileNotFoundError(
                f"teacher.path {config.path} does not exist. Point it at an EDM/SiD network-snapshot .pkl or at a "
                f"folder written by `onestep convert` (model.safetensors + config.json).{where}")
        from ..denoisers.edm import load_edm_snapshot, load_edm_weights

        teacher = load_edm_weights(path) if path.is_dir() else load_edm_snapshot(path, config.snapshot_key)
    else:  # pragma: no cover - config validation rules this out
        raise TypeError(f"Unknown teacher config {config!r}")
    teacher.requires_grad_(False)
    return teacher.eval()


def build_networks(config: RunConfig, teacher: Denoiser | None = None) -> Networks:
    """Teacher plus freshly initialised generator and fake score (seeded by train.seed)."""
    teacher = teacher if teacher is not None else build_teacher(config.teacher)
    torch.manual_seed(config.train.seed)
    if isinstance(teacher, GaussianMixtureDenoiser):
        # The analytic teacher is no network to copy: generator and fake score are small MLP denoisers.
        mlp = lambda c: MLPDenoiser(teacher.dim, c.hidden_dim, c.num_layers, c.noise_embedding_dim, c.sigma_data,
                                    input_fourier_dim=c.input_fourier_dim, input_fourier_scale=c.input_fourier_scale)
        generator_denoiser, fake = mlp(config.generator.mlp), mlp(config.fake.mlp)
        data_shape, label_dim = (teacher.dim,), 0
    else:
        # Network teachers: generator and fake score both start as exact copies of the teacher.
        generator_denoiser, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
        data_shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
        label_dim = teacher.label_dim
    generator_denoiser.requires_grad_(True).train()
    fake.requires_grad_(True).train()
    for network in (generator_denoiser, fake):
        freeze_unused(network)
    generator = OneStepGenerator(generator_denoiser, config.generator.sigma_init)
    return Networks(teacher, generator, fake, tuple(data_shape), label_dim)


def freeze_unused(network: torch.nn.Module) -> None:
    """Freeze weights distillation never uses, so DDP does not wait for their gradients.

    EDM networks trained with augmentation carry a `map_augment` layer; distillation passes no augmentation labels.
    """
    for name, module in network.named_modules():
        if name.endswith("map_augment"):
            module.requires_grad_(False)


def blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated units that FSDP shards one by one and gradient checkpointing recomputes: U-Net blocks, or an
    MLP denoiser's hidden stack."""
    from ..denoisers.edm.layers import UNetBlock

    found = [m for m in network.modules() if isinstance(m, UNetBlock)]
    return found or [m.net for m in network.modules() if isinstance(m, MLPDenoiser)]

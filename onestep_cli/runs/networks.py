"""Build the three networks of a run (teacher, generator, fake score) from its config."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, DiffusersTeacherConfig, EDMTeacherConfig, GeneratorConfig, GMMTeacherConfig, RunConfig
from ..denoisers.base import Denoiser
from ..denoisers.generator import OneStepGenerator, karras_step_sigmas
from ..denoisers.gmm import GaussianMixtureDenoiser
from ..denoisers.mlp import MLPDenoiser
from ..errors import MissingFileError


@dataclass
class Networks:
    teacher: Denoiser  # Frozen.
    generator: OneStepGenerator
    fake: Denoiser
    data_shape: tuple[int, ...]  # Shape of one sample (and of its latent noise).
    label_dim: int  # Classes of a class-conditional teacher, 0 otherwise.
    # (batch, torch.Generator, device) -> per-sample conditions (text prompts); None: class labels or nothing.
    sample_condition: Callable | None = None
    pipeline: object | None = None  # A diffusers teacher's DiffusersTeacher (VAE, text encoders), for sampling.
    # The guided fake score's CFG scale in its own loss (SiD-LSG's kappa1; in the generator loss it uses its stored
    # scale, kappa2 = kappa3); None: a fake score without guidance.
    fake_train_guidance_scale: float | None = None


def check_teacher(config: RunConfig) -> None:
    """Raise, without loading any network, the error building the run's networks would raise for its teacher: options
    that do not apply to it, a missing file. A hub teacher not yet in the Hugging Face cache is downloaded here. The
    `--gpus N` launcher calls this once, before any rank starts."""
    if isinstance(config.teacher, DiffusersTeacherConfig):
        from ..denoisers.diffusers.training import locate_text_teacher

        locate_text_teacher(config.teacher)
        return
    check_options_apply(config)
    if isinstance(config.teacher, EDMTeacherConfig):
        _edm_teacher_path(config.teacher)


def _edm_teacher_path(config: EDMTeacherConfig) -> Path:
    path = config.resolved_path
    if not path.exists():
        where = f" {config.hint}" if config.hint else ""
        raise MissingFileError(
            f"teacher.path {config.path} does not exist. Point it at an EDM/SiD network-snapshot .pkl or at a "
            f"folder written by `onestep convert` (model.safetensors + config.json).{where}")
    return path


def build_teacher(config) -> Denoiser:
    """The frozen teacher denoiser described by a `teacher:` config section."""
    if isinstance(config, GMMTeacherConfig):
        teacher = GaussianMixtureDenoiser(config.means, config.stds, config.weights)
    elif isinstance(config, EDMTeacherConfig):
        path = _edm_teacher_path(config)
        from ..denoisers.edm import load_edm_snapshot, load_edm_weights

        teacher = load_edm_weights(path) if path.is_dir() else load_edm_snapshot(path, config.snapshot_key)
    else:  # pragma: no cover - config validation rules this out
        raise TypeError(f"Unknown teacher config {config!r}")
    teacher.requires_grad_(False)
    return teacher.eval()


def build_networks(config: RunConfig, teacher: Denoiser | None = None, run_dir: Path | None = None,
                   prompts: bool = True) -> Networks:
    """Teacher plus freshly initialised generator and fake score (seeded by train.seed).

    Text-to-image teachers: `prompts` encodes the training prompts (cached in `run_dir/prompts.safetensors` when a
    run directory is given); loading a trained generator for sampling passes False.
    """
    if isinstance(config.teacher, DiffusersTeacherConfig):
        from ..denoisers.diffusers.training import text_to_image_networks

        parts = text_to_image_networks(config, run_dir, prompts)
        return Networks(parts.teacher, parts.generator, parts.fake, parts.data_shape, 0, parts.sample_condition,
                        parts.pipeline, parts.fake_train_guidance_scale)
    check_options_apply(config)
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
    for network, key, p in ((generator_denoiser, "generator.dropout", config.generator.dropout),
                            (fake, "fake.dropout", config.fake.dropout)):
        if p is not None:
            set_dropout(network, p, key)
    check_augmentation(fake, config.fake.augment_p)
    generator_denoiser.requires_grad_(True).train()
    fake.requires_grad_(True).train()
    freeze_unused(generator_denoiser)
    freeze_unused(fake, augmented=config.fake.augment_p > 0)
    generator = OneStepGenerator(generator_denoiser, config.generator.sigma_init, step_sigmas(config.generator))
    return Networks(teacher, generator, fake, tuple(data_shape), label_dim)


def step_sigmas(config: GeneratorConfig) -> tuple[float, ...] | None:
    """The levels of an EDM or analytic teacher's generator steps: generator.step_sigmas as given, or N levels evenly
    spaced down the Karras ramp from sigma_init (`karras_step_sigmas`); None for the default one step."""
    if config.step_sigmas is not None:
        return tuple(config.step_sigmas)
    return karras_step_sigmas(config.sigma_init, config.num_steps) if config.num_steps > 1 else None


def check_options_apply(config: RunConfig) -> None:
    """Refuse text-to-image options on a run whose teacher is not a diffusers pipeline."""
    unused = [key for key, value in (("generator.lora_rank", config.generator.lora_rank),
                                     ("fake.lora_rank", config.fake.lora_rank),
                                     ("fake.train_guidance_scale", config.fake.train_guidance_scale != 1),
                                     ("fake.generator_loss_guidance_scale",
                                      config.fake.generator_loss_guidance_scale != 1),
                                     ("fake.prompt_dropout", config.fake.prompt_dropout),
                                     ("prompts.path", config.prompts.path)) if value]
    if unused:
        raise ConfigError(f"{', '.join(unused)} only apply to text-to-image teachers (teacher.kind: diffusers), and "
                          f"this run's teacher.kind is {config.teacher.kind}; remove them.")


def set_dropout(network: torch.nn.Module, p: float, key: str) -> None:
    """Set the dropout probability of every residual block of an EDM network (and in its recorded init_kwargs).

    EDM's U-Nets apply dropout in one place, between the two convolutions of each `UNetBlock`, with the probability
    the network was built with (`dropout`); only in training mode. Raises ConfigError for a network without them.
    """
    from ..denoisers.edm.layers import UNetBlock

    found = [module for module in network.modules() if isinstance(module, UNetBlock)]
    if not found:
        raise ConfigError(f"{key}={p} applies to copies of EDM teachers (U-Net blocks with dropout), and this run's "
                          f"{type(network).__name__} has none; remove {key} (or set it to null).")
    for block in found:
        block.dropout = p
    if isinstance(getattr(network, "init_kwargs", None), dict):
        network.init_kwargs = {**network.init_kwargs, "dropout": p}


def check_augmentation(fake: torch.nn.Module, augment_p: float) -> None:
    """Refuse fake.augment_p > 0 unless the fake score takes EDM's 9 augmentation labels."""
    from ..denoisers.edm.augment import AUGMENT_DIM

    augment_dim = getattr(fake, "augment_dim", 0) or 0
    if augment_p > 0 and augment_dim != AUGMENT_DIM:
        raise ConfigError(
            f"fake.augment_p={augment_p} needs a fake-score network with EDM's {AUGMENT_DIM} augmentation inputs "
            f"(augment_dim={AUGMENT_DIM}, as EDM's CIFAR-10 teachers), but this run's {type(fake).__name__} has "
            f"augment_dim={augment_dim}; set fake.augment_p=0 or use a teacher trained with augmentation.")


def freeze_unused(network: torch.nn.Module, augmented: bool = False) -> None:
    """Freeze weights distillation never uses, so DDP does not wait for their gradients.

    EDM networks trained with augmentation carry a `map_augment` layer; only a fake score trained on augmented
    images (`augmented`, fake.augment_p > 0) receives augmentation labels.
    """
    if augmented:
        return
    for name, module in network.named_modules():
        if name.endswith("map_augment"):
            module.requires_grad_(False)

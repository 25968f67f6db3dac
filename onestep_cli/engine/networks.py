"""Build the three networks of a run (teacher, generator, fake score) from its config."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import (ConfigError, DiffusersTeacherConfig, EDMTeacherConfig, GMMTeacherConfig, RunConfig,
                      resolve_asset_path)
from ..denoisers.base import Denoiser
from ..denoisers.generator import OneStepGenerator
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


def build_teacher(config) -> Denoiser:
    """The frozen teacher denoiser described by a `teacher:` config section."""
    if isinstance(config, GMMTeacherConfig):
        teacher = GaussianMixtureDenoiser(config.means, config.stds, config.weights)
    elif isinstance(config, EDMTeacherConfig):
        path = config.resolved_path
        if not path.exists():
            where = f" {config.hint}" if config.hint else ""
            raise MissingFileError(
                f"teacher.path {config.path} does not exist. Point it at an EDM/SiD network-snapshot .pkl or at a "
                f"folder written by `onestep convert` (model.safetensors + config.json).{where}")
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
        return build_text_to_image_networks(config, run_dir, prompts)
    unused = [key for key, value in (("generator.lora_rank", config.generator.lora_rank),
                                     ("fake.lora_rank", config.fake.lora_rank),
                                     ("fake.guidance_scale", config.fake.guidance_scale != 1),
                                     ("prompts.path", config.prompts.path)) if value]
    if unused:
        raise ConfigError(f"{', '.join(unused)} only apply to text-to-image teachers (teacher.kind: diffusers), and "
                          f"this run's teacher.kind is {config.teacher.kind}; remove them.")
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
    generator = OneStepGenerator(generator_denoiser, config.generator.sigma_init)
    return Networks(teacher, generator, fake, tuple(data_shape), label_dim)


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


DIFFUSERS_TRANSFORMERS = ("PixArtTransformer2DModel", "SD3Transformer2DModel", "SanaTransformer2DModel")


def blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated units that FSDP shards one by one and gradient checkpointing recomputes: U-Net blocks, a
    diffusers network's down/mid/up blocks or transformer blocks, or an MLP denoiser's hidden stack."""
    from ..denoisers.edm.layers import UNetBlock

    found = [m for m in network.modules() if isinstance(m, UNetBlock)]
    for module in network.modules():
        if type(module).__name__ == "UNet2DConditionModel":
            found += [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []),
                      *module.up_blocks]
        elif type(module).__name__ in DIFFUSERS_TRANSFORMERS:
            found += list(module.transformer_blocks)
    return found or [m.net for m in network.modules() if isinstance(m, MLPDenoiser)]


# ---------------------------------------------------------------------------------------------------------------------
# Text-to-image teachers (diffusers): latent-space distillation with per-sample prompts.

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # Attention and MLP projections.
PROMPT_CACHE = "prompts.safetensors"  # In the run directory.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PromptSampler:
    """Draws a batch of training prompts' conditions uniformly with replacement, from the run's training RNG.

    `place(device)` moves the conditions to the training device when they fit in DEVICE_BYTES: then a draw is a
    gather there, with no host synchronisation (and the step can be a CUDA graph). Larger prompt sets stay on the
    CPU and each draw copies its rows over (one host sync per draw).
    """

    DEVICE_BYTES = 4 * 2**30  # About 4000 PixArt (T5, 120 tokens) or 27000 SDXL (77 tokens) prompts.

    def __init__(self, conditions):
        self.conditions = conditions  # Conditioning [num_prompts, ...], on the CPU until placed.

    @property
    def nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for _, value in self.conditions.items())

    def place(self, device: torch.device) -> None:
        """Keep the conditions on `device` if they fit in DEVICE_BYTES, else on the CPU."""
        if self.nbytes <= self.DEVICE_BYTES:
            self.conditions = self.conditions.to(device)

    def draws_on_host(self, device: torch.device) -> bool:
        """Whether a draw for `device` goes through the CPU (a host sync and a copy each step)."""
        return self.conditions.embeds.device.type != torch.device(device).type  # "cuda" and "cuda:0" are one.

    def __call__(self, batch: int, generator: torch.Generator, device: torch.device):
        index = torch.randint(len(self.conditions), (batch,), generator=generator, device=generator.device)
        if not self.draws_on_host(index.device):
            return self.conditions[index]
        return self.conditions[index.to(self.conditions.embeds.device)].to(device)


def load_text_teacher(config: DiffusersTeacherConfig):
    """The DiffusersTeacher of a `teacher: {kind: diffusers}` section (on the CPU; the engine moves what it uses)."""
    from ..denoisers.diffusers import DiffusersLoadError, load_diffusers_teacher

    try:
        return load_diffusers_teacher(config.resolved_path, torch_dtype=DTYPES[config.dtype],
                                      null=config.null_condition, image_size=config.image_size,
                                      variant=config.variant, revision=config.revision)
    except DiffusersLoadError as error:
        raise DiffusersLoadError(f"{error}{' ' + config.hint if config.hint else ''}") from None


def text_latent_shape(pipeline, config: DiffusersTeacherConfig) -> tuple[int, int, int]:
    """Latent (C, H, W) of the generated images: teacher.image_size / the VAE's factor, or the network's native."""
    channels, height, width = pipeline.latent_shape
    if config.image_size is None:
        return channels, height, width
    factor = pipeline.denoiser.vae_scale_factor
    if any(side % factor for side in config.image_size):
        raise ConfigError(f"teacher.image_size {list(config.image_size)} must be a multiple of the VAE's factor "
                          f"{factor} on each side, e.g. {[side // factor * factor for side in config.image_size]}.")
    return channels, config.image_size[0] // factor, config.image_size[1] // factor


def add_lora(denoiser, rank: int) -> None:
    """Freeze `denoiser`'s network and give it trainable rank-`rank` LoRA adapters (peft; alpha = rank).

    peft's generic injection works on every diffusers network (PixArt's transformer has no `add_adapter`)."""
    from peft import LoraConfig, inject_adapter_in_model

    denoiser.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS), denoiser.model)


def build_text_to_image_networks(config: RunConfig, run_dir: Path | None = None, prompts: bool = True) -> Networks:
    """Guided frozen teacher; generator and fake score as float32 copies of its network (full, or LoRA adapters).

    Generator: `G(z, c) = D_gen(sigma_init z, sigma_init, c)` (no guidance: the teacher's is distilled into it).
    Fake score: guided with `fake.guidance_scale` in both of its uses, as SiD-LSG's kappa1 = kappa2 = kappa3.
    """
    from ..denoisers.diffusers import GuidedDenoiser

    refused = [f"{key}={value}" for key, value in (("generator.dropout", config.generator.dropout),
                                                   ("fake.dropout", config.fake.dropout)) if value is not None]
    if config.fake.augment_p:
        refused.append(f"fake.augment_p={config.fake.augment_p}")
    if refused:
        these, them = ("these apply", "them") if len(refused) > 1 else ("this applies", "it")
        raise ConfigError(f"{', '.join(refused)}: {these} only to EDM teachers (teacher.kind: edm); a diffusers "
                          "network has no single dropout of its residual blocks to set and no augmentation input. "
                          f"Remove {them} (dropout: null, augment_p: 0).")
    teacher_config = config.teacher
    pipeline = load_text_teacher(teacher_config)
    data_shape = text_latent_shape(pipeline, teacher_config)
    sample_condition = None
    if prompts:
        sample_condition = PromptSampler(encode_training_prompts(config, pipeline, run_dir).conditions)
    torch.manual_seed(config.train.seed)
    copies = []
    for rank in (config.generator.lora_rank, config.fake.lora_rank):
        network = copy.deepcopy(pipeline.denoiser).float()
        network.requires_grad_(True)
        if rank:
            add_lora(network, rank)
        copies.append(network.train())
    generator_denoiser, fake_denoiser = copies
    pipeline.denoiser.requires_grad_(False).eval()
    teacher = pipeline.guided(teacher_config.guidance_scale)
    fake = GuidedDenoiser(fake_denoiser, config.fake.guidance_scale)
    generator = OneStepGenerator(generator_denoiser, config.generator.sigma_init)
    return Networks(teacher, generator, fake, data_shape, 0, sample_condition, pipeline)


def encode_training_prompts(config: RunConfig, pipeline, run_dir: Path | None):
    """The training prompts' PromptCache: read from (or written to) `run_dir/prompts.safetensors`, else in memory."""
    from ..denoisers.diffusers import PromptCache, read_prompts
    from ..denoisers.diffusers.prompts import cache_key

    if config.prompts.path is None:
        raise ConfigError("A text-to-image teacher needs training prompts: set prompts.path to a .txt (one prompt per "
                          "line), .jsonl or COCO captions .json file, e.g. --set prompts.path=prompts.txt.")
    texts = read_prompts(resolve_asset_path(config.prompts.path))
    dtype = DTYPES[config.prompts.cache_dtype] if config.prompts.cache_dtype else None
    if run_dir is not None:
        # Under torchrun rank 0 writes the cache first and the other ranks then read it, never two writers at once.
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        first = not group or torch.distributed.get_rank() == 0
        if not first:
            torch.distributed.barrier()
        cache = pipeline.encode_prompts(texts, Path(run_dir) / PROMPT_CACHE, dtype=dtype)
        if group and first:
            torch.distributed.barrier()
        return cache
    conditions, empty = pipeline.encoder.encode(texts), pipeline.encoder.encode([""])
    if dtype is not None:
        conditions, empty = conditions.to(dtype=dtype), empty.to(dtype=dtype)
    return PromptCache(prompts=texts, conditions=conditions, empty=empty, key=cache_key(texts, pipeline.encoder))

"""Text-to-image training on a diffusers teacher: the guided teacher, float32 copies of its network as generator and
fake score (full or LoRA), and the training prompts' conditions drawn per sample: cached, or for a file of more than
prompts.cache_max prompts read and encoded per step (streamed)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...config import (ConfigError, DiffusersTeacherConfig, GeneratorConfig, RunConfig,
                       UniformTimestepSigmaConfig, resolve_asset_path)
from ..base import Denoiser
from ..generator import OneStepGenerator, ddpm_step_timesteps, flow_noise_scale, pure_noise_scale
from .schedule import DDPMSigmaSchedule, FlowSigmaSchedule


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


class StreamingPromptSampler:
    """Draws training prompts as PromptSampler does (the same indices from the same RNG), from a prompt file too large
    to cache: each draw reads its batch's prompts from the file and encodes them with the teacher's frozen text
    encoders, which `place(device)` moves to the training device. A draw always goes through the host."""

    host_draw_reason = ("the training prompts are streamed (the file holds more than prompts.cache_max), each step "
                        "reading and encoding its own through the host (raise prompts.cache_max to cache them)")

    def __init__(self, prompts, encoder, dtype: torch.dtype | None = None):
        self.prompts = prompts  # A PromptFile.
        self.encoder = encoder  # The teacher's PromptEncoder.
        self.dtype = dtype  # prompts.cache_dtype, so that streamed conditions equal cached ones; None: the encoder's.

    def place(self, device: torch.device) -> None:
        self.encoder.to(device)

    def draws_on_host(self, device: torch.device) -> bool:
        return True

    def __call__(self, batch: int, generator: torch.Generator, device: torch.device):
        index = torch.randint(len(self.prompts), (batch,), generator=generator, device=generator.device)
        conditions = self.encoder.encode(self.prompts.read(index.tolist()), device=device)
        return conditions.to(dtype=self.dtype) if self.dtype is not None else conditions


def load_text_teacher(config: DiffusersTeacherConfig):
    """The DiffusersTeacher of a `teacher: {kind: diffusers}` section (on the CPU; the engine moves what it uses)."""
    from . import DiffusersLoadError, load_diffusers_teacher

    try:
        return load_diffusers_teacher(config.resolved_path, torch_dtype=DTYPES[config.dtype],
                                      null=config.null_condition, image_size=config.image_size,
                                      max_sequence_length=config.max_sequence_length,
                                      variant=config.variant, revision=config.revision)
    except DiffusersLoadError as error:
        raise DiffusersLoadError(f"{error}{' ' + config.hint if config.hint else ''}") from None


def locate_text_teacher(config: DiffusersTeacherConfig):
    """The local folder of a `teacher: {kind: diffusers}` section, downloading a hub teacher first (no loading)."""
    from . import DiffusersLoadError, resolve_pretrained

    try:
        return resolve_pretrained(config.resolved_path, config.revision, config.variant)
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


@dataclass
class TextToImageNetworks:
    teacher: Denoiser  # The guided frozen teacher.
    generator: OneStepGenerator
    fake: Denoiser
    data_shape: tuple[int, int, int]  # Latent (C, H, W).
    sample_condition: Callable | None  # A (Streaming)PromptSampler of the training prompts; None when not asked for.
    pipeline: object  # The DiffusersTeacher: VAE and text encoders, for sampling.
    fake_train_guidance_scale: float | None = None  # kappa1: the fake score's CFG scale in its own loss.


def text_to_image_networks(config: RunConfig, run_dir: Path | None = None, prompts: bool = True
                           ) -> TextToImageNetworks:
    """Guided frozen teacher; generator and fake score as float32 copies of its network (full, or LoRA adapters).

    Generator: `G(z, c) = D_gen(sigma_init z, sigma_init, c)` (no guidance: the teacher's is distilled into it).
    SiD-LSG's four guidance scales (its `training/sid_training_loop.py`): the teacher is guided with
    teacher.guidance_scale (kappa4, `cfg_eval_real`); the fake score stores fake.generator_loss_guidance_scale, its
    scale where the generator loss evaluates it (kappa2 = kappa3, `cfg_eval_fake`), and its own loss overrides it with
    fake.train_guidance_scale (kappa1, `cfg_train_fake`), returned as `fake_train_guidance_scale`.
    """
    from . import GuidedDenoiser

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
    check_timestep_schedules(config, pipeline.denoiser)
    sample_condition = None
    if prompts:
        sample_condition = training_prompt_sampler(config, pipeline, run_dir)
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
    teacher = pipeline.guided(teacher_config.guidance_scale)  # kappa4.
    fake = GuidedDenoiser(fake_denoiser, config.fake.generator_loss_guidance_scale)  # kappa2 = kappa3.
    generator = OneStepGenerator(generator_denoiser, config.generator.sigma_init,
                                 *multi_step_schedule(config.generator, generator_denoiser))
    return TextToImageNetworks(teacher, generator, fake, data_shape, sample_condition, pipeline,
                               config.fake.train_guidance_scale)  # kappa1.


def check_timestep_schedules(config: RunConfig, denoiser) -> None:
    """Refuse `uniform_timestep` noise levels whose beta schedule is not the teacher's: their timesteps would land
    between the teacher's own levels, so the network would see other timesteps than the config names."""
    schedule = getattr(denoiser, "schedule", None)
    teacher = schedule.sigmas if isinstance(schedule, DDPMSigmaSchedule) else None
    for key, sigma in (("objective.sigma", config.objective.sigma), ("fake.sigma", config.fake.sigma)):
        if not isinstance(sigma, UniformTimestepSigmaConfig):
            continue
        ours = DDPMSigmaSchedule.from_betas(sigma.beta_schedule, sigma.beta_start, sigma.beta_end,
                                            sigma.num_train_timesteps).sigmas
        if teacher is not None and teacher.shape == ours.shape and torch.allclose(ours, teacher, rtol=1e-5):
            continue
        theirs = ("no DDPM schedule" if teacher is None else
                  f"{len(teacher)} timesteps, sigma {float(teacher[0]):.4g} to {float(teacher[-1]):.4g}")
        raise ConfigError(f"{key}.kind=uniform_timestep draws the timesteps of a {sigma.beta_schedule} schedule, "
                          f"betas {sigma.beta_start:g} to {sigma.beta_end:g} over {sigma.num_train_timesteps} "
                          f"timesteps (sigma {float(ours[0]):.4g} to {float(ours[-1]):.4g}), but the teacher's "
                          f"schedule differs ({theirs}); set {key}.beta_schedule, beta_start, beta_end and "
                          f"num_train_timesteps to its scheduler_config.json values, or use another {key}.kind.")


def multi_step_schedule(config: GeneratorConfig, denoiser) -> tuple[tuple[float, ...] | None, float | None]:
    """(step levels, start scale) of a generator on a diffusers teacher.

    One step reads `sigma_init z`, as SiD does (start scale None), except on a flow-matching teacher (SD3, SANA), whose
    generator reads unit noise as its flow input `x_t = z` at `t = sigma_init / (1 + sigma_init)`: where diffusers'
    flow pipelines start (from unit noise, with no input scaling), so an export reproduces it.

    N steps, as DMD2's multi-step generator (tianweiy/DMD2 main/sd_unified_model.py L31-35, L186-199): the steps sit at
    its timesteps T-1, T-1-T//N, ... (or at generator.step_sigmas), and the first reads pure noise in the teacher's
    parametrisation (`x_vp = z`), which is also where diffusers' LCMScheduler starts, so an export reproduces it.
    """
    schedule = getattr(denoiser, "schedule", None)
    if config.num_steps == 1:
        sigma = config.step_sigmas[0] if config.step_sigmas else config.sigma_init
        return config.step_sigmas, (flow_noise_scale(sigma) if isinstance(schedule, FlowSigmaSchedule) else None)
    if not isinstance(schedule, DDPMSigmaSchedule):
        raise ConfigError(f"generator.num_steps={config.num_steps} needs a DDPM-family teacher (SD 1.5/2.1, SDXL, "
                          f"PixArt); this teacher's {type(denoiser).__name__} is a flow-matching network, whose "
                          "generator takes one step. Set generator.num_steps=1.")
    if config.step_sigmas is not None:
        sigmas = tuple(config.step_sigmas)
    else:
        if config.num_steps > schedule.num_timesteps:
            raise ConfigError(f"generator.num_steps={config.num_steps} is more steps than the teacher's "
                              f"{schedule.num_timesteps} timesteps; give at most {schedule.num_timesteps}.")
        timesteps = ddpm_step_timesteps(schedule.num_timesteps, config.num_steps)
        sigmas = tuple(float(schedule.sigmas[t]) for t in timesteps)
    return sigmas, pure_noise_scale(sigmas[0])


def training_prompt_sampler(config: RunConfig, pipeline, run_dir: Path | None):
    """The condition sampler of the training prompts: a PromptSampler of their cached conditions when the file holds
    at most prompts.cache_max prompts, else a StreamingPromptSampler that reads and encodes each batch's."""
    from .prompts import PromptFile

    prompts = PromptFile(training_prompts_path(config))  # An index of its lines: cheap for any size.
    if len(prompts) > config.prompts.cache_max:
        dtype = DTYPES[config.prompts.cache_dtype] if config.prompts.cache_dtype else None
        return StreamingPromptSampler(prompts, pipeline.encoder, dtype)
    return PromptSampler(encode_training_prompts(config, pipeline, run_dir).conditions)


def training_prompts_path(config: RunConfig) -> Path:
    if config.prompts.path is None:
        raise ConfigError("A text-to-image teacher needs training prompts: set prompts.path to a .txt (one prompt per "
                          "line), .jsonl or COCO captions .json file, e.g. --set prompts.path=prompts.txt.")
    return resolve_asset_path(config.prompts.path)


def encode_training_prompts(config: RunConfig, pipeline, run_dir: Path | None):
    """The training prompts' PromptCache: read from (or written to) `run_dir/prompts.safetensors`, else in memory."""
    from . import PromptCache, read_prompts
    from .prompts import cache_key

    texts = read_prompts(training_prompts_path(config))
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

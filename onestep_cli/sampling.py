"""Generation with per-sample seeds (one step, or a multi-step generator's steps), and the teacher's reference sampler
(EDM Heun)."""

from __future__ import annotations

import collections
import contextlib
import re

import numpy as np
import torch

from .config import MAX_SEED, MAX_SEEDS
from .denoisers.base import Denoiser
from .errors import UsageError
from .objectives.sigmas import karras_grid
from .sample_io import ImageSource, SourceError, as_uint8_nhwc, is_image_shape


def parse_seeds(text: str) -> list[int]:
    """Parse '0-49999', '3', or '0,5,10-12' into a list of distinct seeds in 0..2^63-1, at most MAX_SEEDS of them."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UsageError(f"Seed range '{text}' is not understood at '{part}'; write e.g. 0-49999 or 0,5,10-12.")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise UsageError(f"Seed range '{part}' runs backwards; write the smaller seed first.")
        if high > MAX_SEED:
            raise UsageError(f"Seed {high} in '{text}' is larger than the largest seed, {MAX_SEED} (2^63 - 1).")
        ranges.append((low, high))
    count = sum(high - low + 1 for low, high in ranges)  # Counted before any list is built.
    if count > MAX_SEEDS:
        raise UsageError(f"Seeds '{text}' name {count} samples, more than the {MAX_SEEDS} one command takes; split "
                         "them over several commands (each seed gives the same sample whatever the command).")
    seeds = [seed for low, high in ranges for seed in range(low, high + 1)]
    if len(set(seeds)) != len(seeds):
        repeated = next(seed for seed, n in collections.Counter(seeds).items() if n > 1)
        raise UsageError(f"Seeds '{text}' name seed {repeated} more than once; each seed is one sample, so name it "
                         "once.")
    return seeds


def seeded_latents(seeds: list[int], shape: tuple[int, ...], label_dim: int = 0, device="cpu"):
    """Noise (and one-hot class labels) for each seed, independent of batch composition."""
    return seeded_inputs(seeds, shape, label_dim, device)[:2]


def seeded_inputs(seeds: list[int], shape: tuple[int, ...], label_dim: int = 0, device="cpu", num_steps: int = 1):
    """(noise, one-hot labels or None, re-noising noise [batch, num_steps - 1, ...] or None for one step) per seed.

    Each seed's generator draws its noise, then its label, then one noise per later step: the order in which a
    diffusers pipeline called with `generator=torch.Generator().manual_seed(seed)` draws its latents and then its
    scheduler's step noise."""
    latents, labels, step_noise = [], [], []
    for seed in seeds:
        rng = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=rng))
        if label_dim:
            labels.append(torch.randint(label_dim, (), generator=rng))
        if num_steps > 1:
            step_noise.append(torch.stack([torch.randn(shape, generator=rng) for _ in range(num_steps - 1)]))
    z = torch.stack(latents).to(device)
    cond = torch.nn.functional.one_hot(torch.stack(labels), label_dim).float().to(device) if label_dim else None
    return z, cond, (torch.stack(step_noise).to(device) if step_noise else None)


def generator_steps(model) -> int:
    """The denoiser steps `model(z, cond)` takes per sample: a generator's num_steps, 1 for other samplers."""
    return getattr(model, "num_steps", 1)


def generator_sampler(generator) -> dict:
    """How a generator makes a sample, for samples.json and eval results: its sampler, evaluations and step levels."""
    steps = generator_steps(generator)
    if steps == 1:
        return {"sampler": "one_step", "nfe": 1}
    return {"sampler": "multi_step", "nfe": steps, "step_sigmas": list(generator.step_sigmas)}


def run_generator(model, z: torch.Tensor, cond, step_noise: torch.Tensor | None) -> torch.Tensor:
    """`model(z, cond)`, with the seeds' re-noising noise for a multi-step generator."""
    return model(z, cond) if step_noise is None else model(z, cond, step_noise)


def seed_labels(seeds: list[int], shape, label_dim: int = 0) -> np.ndarray | None:
    """The class index each seed draws (as `seeded_latents` does), None for unconditional models."""
    if not label_dim:
        return None
    return np.concatenate([seeded_latents(seeds[start:start + 1024], shape, label_dim)[1].argmax(dim=1).numpy()
                           for start in range(0, len(seeds), 1024)])


@torch.no_grad()
def generate(generator, seeds: list[int], shape, label_dim=0, batch_size=1024, device="cpu") -> torch.Tensor:
    """The generator's samples for `seeds`, float32 on the CPU, in seed order."""
    return generate_with_labels(generator, seeds, shape, label_dim, batch_size, device)[0]


@torch.no_grad()
def generate_with_labels(generator, seeds: list[int], shape, label_dim=0, batch_size=1024, device="cpu"
                         ) -> tuple[torch.Tensor, np.ndarray | None]:
    """The generator's samples for `seeds` (float32 on the CPU, in seed order) and their class indices (None if
    unconditional)."""
    out, labels = [], []
    for start in range(0, len(seeds), batch_size):
        z, cond, step_noise = seeded_inputs(seeds[start:start + batch_size], shape, label_dim, device,
                                            generator_steps(generator))
        out.append(run_generator(generator, z, cond, step_noise).float().cpu())
        if cond is not None:
            labels.append(cond.argmax(dim=1).cpu().numpy())
    return torch.cat(out), (np.concatenate(labels) if labels else None)


def edm_sigma_steps(num_steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """EDM's sampling grid: `num_steps` Karras levels then a final 0 (float64)."""
    return torch.cat([karras_grid(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, num_steps: int = 18, cond=None, sigma_min=0.002,
                sigma_max=80.0, rho=7.0, s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's second-order sampler (Karras et al. 2022, Alg. 2): 2*num_steps-1 evaluations; s_churn > 0 is stochastic.

    `noise` is unit Gaussian; the chain starts at sigma_max * noise. Steps run in float64, the denoiser in its dtype.
    """
    steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).to(noise.device)
    x_next = noise.to(torch.float64) * steps[0]
    dtype = noise.dtype
    D = lambda x, s: denoiser(x.to(dtype), torch.full((x.shape[0],), float(s), dtype=dtype, device=x.device),
                              cond).to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        x_cur = x_next
        gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            extra = torch.randn(x_cur.shape, generator=generator, dtype=torch.float64, device=x_cur.device)
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * s_noise * extra
        else:
            x_hat = x_cur
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:  # Heun's correction, except on the last step to sigma = 0.
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(dtype)


@torch.no_grad()
def generate_teacher(teacher: Denoiser, seeds: list[int], shape, label_dim=0, num_steps=18, batch_size=1024,
                     device="cpu") -> torch.Tensor:
    """Reference samples of the teacher with deterministic Heun, the same per-seed noise as `generate`."""
    out = []
    for start in range(0, len(seeds), batch_size):
        z, cond = seeded_latents(seeds[start:start + batch_size], shape, label_dim, device)
        out.append(heun_sample(teacher, z, num_steps, cond).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------------
# Text-to-image: one image per (prompt, seed), decoded by the teacher's VAE.


def prompt_major_pairs(num_prompts: int, seeds: list[int]) -> list[tuple[int, int]]:
    """(prompt index, seed) of each text-to-image sample: image `i * len(seeds) + j` is prompt i with seed j, the
    order of `onestep sample --prompts` file names and of `onestep eval RUN --prompts`."""
    return [(index, seed) for index in range(num_prompts) for seed in seeds]


def generation_autocast(precision: str, device: torch.device):
    """The `--precision` of generation: fp32 runs as stored, bf16/fp16 under autocast."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@torch.no_grad()
def text_to_image_batch(model, pipeline, cond, seeds: list[int], shape, device, precision: str = "fp32"):
    """Decoded images in [-1, 1] (float32, on `device`) of `model` on the seeds' noise with conditions `cond` (one
    row per seed); the model runs under `precision`, the VAE as loaded."""
    device = torch.device(device)
    z, _, step_noise = seeded_inputs(seeds, shape, device=device, num_steps=generator_steps(model))
    with generation_autocast(precision, device):
        latents = run_generator(model, z, cond.to(device), step_noise).float()
    return pipeline.decode(latents).float()


@torch.no_grad()
def generate_text_to_image(model, pipeline, prompts: list[str], seeds: list[int], shape, batch_size: int = 16,
                           device="cpu") -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU), prompt-major (`prompt_major_pairs`).

    `model(z, cond) -> latents` is the generator (or a teacher sampler); `pipeline` the run's DiffusersTeacher. Seed
    s gives the same noise for every prompt: `torch.randn(shape, generator=torch.Generator().manual_seed(s))`, which
    is also the noise of a diffusers pipeline called with that generator.
    """
    conditions = pipeline.encoder.encode(list(prompts))
    pairs = prompt_major_pairs(len(prompts), seeds)
    images = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        cond = conditions[torch.tensor([index for index, _ in chunk])]
        images.append(text_to_image_batch(model, pipeline, cond, [seed for _, seed in chunk], shape, device).cpu())
    return torch.cat(images)


def teacher_sampler(teacher: Denoiser, num_steps: int, sigma_min: float, sigma_max: float):
    """`(z, cond) -> latents` of EDM's Heun sampler on a (guided) diffusers teacher within its own sigma range."""
    return lambda z, cond: heun_sample(teacher, z, num_steps, cond, sigma_min=sigma_min, sigma_max=sigma_max)


# ---------------------------------------------------------------------------------------------------------------------
# Generated images as an evaluation source, batch by batch, without writing files


def generator_source(generator, seeds: list[int], shape, label_dim: int = 0, batch_size: int = 256,
                     device="cpu", precision: str = "fp32", description: str = "generator") -> ImageSource:
    """Images generated in memory, batch by batch, one seed per image (no PNG round trip); quantised to uint8
    exactly as `write_samples` does, so the numbers match those of the written files."""
    if not is_image_shape(shape):
        raise SourceError(f"{description} makes samples of shape {tuple(shape)}, not images.")
    device = torch.device(device)

    @torch.no_grad()
    def read(start: int, stop: int) -> np.ndarray:
        # `generate` for one batch, without its float32 copy to the host.
        z, cond, step_noise = seeded_inputs(seeds[start:stop], shape, label_dim, device, generator_steps(generator))
        with generation_autocast(precision, device):
            images = run_generator(generator, z, cond, step_noise).float()
        return as_uint8_nhwc(images, description)  # Quantised on `device`: elementwise, the same bits as on the CPU.

    def labels(start: int, stop: int) -> np.ndarray:  # The classes `generate` drew for these seeds.
        return seed_labels(seeds[start:stop], shape, label_dim)

    return ImageSource(description, len(seeds), (int(shape[1]), int(shape[2])), None, list(seeds),
                       {"precision": precision}, read, labels if label_dim else None)


def text_to_image_source(generator, pipeline, prompts: list[str], seeds: list[int], shape, device="cpu",
                         precision: str = "fp32", description: str = "generator") -> ImageSource:
    """Images of every (prompt, seed) pair generated in memory in `sampling.prompt_major_pairs` order, as
    `sampling.generate_text_to_image` makes them; each batch's prompts are encoded with it, so no condition of the
    whole prompt list is held. `pipeline` is the run's DiffusersTeacher (text encoders and VAE)."""
    pairs = prompt_major_pairs(len(prompts), seeds)

    def read(start: int, stop: int) -> np.ndarray:
        chunk = pairs[start:stop]
        cond = pipeline.encoder.encode([prompts[index] for index, _ in chunk])
        images = text_to_image_batch(generator, pipeline, cond, [seed for _, seed in chunk], shape, device, precision)
        return as_uint8_nhwc(images, description)

    scale = int(getattr(pipeline.pipeline, "vae_scale_factor", 8))  # Pixels per latent pixel, as the pipeline's.
    return ImageSource(description, len(pairs), (int(shape[-2]) * scale, int(shape[-1]) * scale), None,
                       [seed for _, seed in pairs], {"precision": precision}, read)

"""A Stable-Diffusion-style text-to-image teacher of the digits, built from diffusers' and transformers' own classes.

The pieces are those of SD 1.5 at toy size: a real CLIP BPE tokenizer (built offline from open_clip's bundled merges),
a `CLIPTextModel` trained from scratch, an `AutoencoderKL` from 32x32x3 images to 8x8x4 latents (vae_scale_factor 4),
a `UNet2DConditionModel` cross-attending to the text, and SD 1.5's noise schedule, so a saved folder loads with
`StableDiffusionPipeline.from_pretrained` and onestep maps it to sigma units exactly as it maps SD.

The data are sklearn's 1797 digits at 32x32 as RGB grey, each described by `captions.describe` (digit, weight, slant);
training draws a phrasing per step with `captions.random_caption`. docs/digits-t2i.md has the recipe and results.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .captions import DigitPrompt, describe, prompt_list, random_caption
from .data import NATIVE_RESOLUTION, load_digits_images

TOKENIZER_MAX_LENGTH = 16  # Tokens incl. start and end; the longest digits caption (trained or held-out) takes 12.
CLIP_VOCAB_SIZE = 49408  # 256 bytes, their 256 end-of-word forms, 48894 merges, start and end of text.
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon")  # SD 1.5's, so DDPMSigmaSchedule maps it as it maps SD.
IMAGE_RESOLUTION = 32  # Pixels of the teacher's images.
LATENT_CHANNELS = 4


# ---------------------------------------------------------------------------------------------------------------------
# Data.

def captioned_digits(resolution: int = IMAGE_RESOLUTION) -> tuple[torch.Tensor, list[DigitPrompt]]:
    """All 1797 digits as RGB grey images `[N, 3, resolution, resolution]` in [-1, 1], and each one's description."""
    images, labels = load_digits_images(resolution)
    return images.expand(-1, 3, -1, -1).contiguous(), describe(images, labels)


def training_captions(prompts: list[DigitPrompt], generator: torch.Generator, dropout: float) -> list[str]:
    """One random phrasing of each prompt; a fraction `dropout` replaced by the empty caption (the null condition
    that classifier-free guidance contrasts with)."""
    keep = torch.rand(len(prompts), generator=generator) >= dropout
    return [random_caption(prompt, generator) if kept else "" for prompt, kept in zip(prompts, keep.tolist())]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and networks.

def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clip_bpe_merges() -> list[str]:
    """The merges CLIP uses: the first 49152 - 256 - 2 lines after the header of open_clip's bundled BPE file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed; it bundles CLIP's BPE merges that the digits tokenizer is built "
                          "from. Install it with `pip install open_clip_torch`.")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]


def write_clip_vocabulary(folder: str | Path) -> tuple[Path, Path]:
    """CLIP's `vocab.json` (49408 tokens, in CLIP's order) and `merges.txt` in `folder`, as SD 1.5's tokenizer ships."""
    merges = clip_bpe_merges()
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False,
                                     separators=(",", ":")), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """The real CLIP tokenizer (the vocabulary of SD 1.5's, 49408 tokens), built offline, with a short context."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        # Files, not in-memory lists: the constructor that takes them is the same in transformers 4 and 5.
        vocab_file, merges_file = write_clip_vocabulary(folder)
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def build_text_encoder(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                       max_length: int = TOKENIZER_MAX_LENGTH):
    """A small `CLIPTextModel` over CLIP's full vocabulary; its 49408 x hidden_size embedding is most of its size."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            max_position_embeddings=max_length, bos_token_id=CLIP_VOCAB_SIZE - 2,
                            eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1)
    return CLIPTextModel(config)


def build_vae(block_out_channels: tuple[int, ...] = (16, 32, 32), latent_channels: int = LATENT_CHANNELS,
              norm_num_groups: int = 8, resolution: int = IMAGE_RESOLUTION):
    """An `AutoencoderKL` from `[3, R, R]` images to `[latent_channels, R / 2^(levels-1), ...]` latents; the default
    three levels give SD's layout at 32x32 -> 8x8x4 (vae_scale_factor 4)."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=tuple(block_out_channels), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         norm_num_groups=norm_num_groups, sample_size=resolution)


def build_unet(cross_attention_dim: int = 32, block_out_channels: tuple[int, int] = (32, 64),
               layers_per_block: int = 1, attention_heads: int = 2, norm_num_groups: int = 8,
               latent_resolution: int = IMAGE_RESOLUTION // 4):
    """A `UNet2DConditionModel` on `[4, 8, 8]` latents laid out as SD's: cross-attention at every level but the
    lowest, which (with the middle block, that attends too) works at 4x4."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_resolution, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
        attention_head_dim=attention_heads)  # Diffusers reads this legacy name as the number of heads, as SD's 8.


def training_scheduler():
    """The DDPM noise schedule of SD 1.5 (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULE, clip_sample=False)


def sampling_scheduler():
    """DDIM on SD 1.5's schedule with its spacing (leading, steps_offset 1): what the saved pipeline samples with."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ---------------------------------------------------------------------------------------------------------------------
# The autoencoder.

@dataclass(kw_only=True)
class VAETraining:
    steps: int = 3000           # Optimiser steps at most.
    minutes: float = 5.0        # Wall-clock cap, minutes.
    batch_size: int = 64        # Images per step.
    lr: float = 1e-3            # AdamW learning rate.
    kl_weight: float = 1e-4     # Weight of the KL term per latent element against the per-pixel L1 + L2 loss.
    log_every: int = 100        # Steps between progress records.


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict]:
    """L1 + L2 reconstruction per pixel of a posterior sample, plus `kl_weight` x KL per latent element."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    l1 = (reconstruction - images).abs().mean()
    l2 = (reconstruction - images).square().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def train_vae(vae, images: torch.Tensor, settings: VAETraining, generator: torch.Generator, log=None) -> dict:
    """Train `vae` in place on `images` (`[N, 3, R, R]` in [-1, 1], on the VAE's device); returns the final record.

    `generator` (on the images' device) draws batches and posterior samples; `log(record)` receives progress.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    start, record, totals = time.time(), {}, {}
    for step in range(1, settings.steps + 1):
        index = torch.randint(images.shape[0], (settings.batch_size,), device=images.device, generator=generator)
        loss, parts = vae_loss(vae, images[index], settings.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals = {k: totals.get(k, 0.0) + v for k, v in {"loss": loss.item(), **parts}.items()}
        done = step == settings.steps or time.time() - start >= settings.minutes * 60
        if step % settings.log_every == 0 or done:
            count = (step - 1) % settings.log_every + 1
            record = {"stage": "vae", "step": step, **{k: v / count for k, v in totals.items()},
                      "elapsed_s": round(time.time() - start, 1)}
            totals = {}
            if log is not None:
                log(record)
        if done:
            break
    vae.eval()
    return record


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior of each image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch_size):
        posterior = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, seed: int = 0) -> float:
    """1 / std of posterior samples of `images`, as SD set 0.18215: scaled latents then have unit variance."""
    mean, std = encode_posteriors(vae, images)
    generator = torch.Generator(device=mean.device).manual_seed(seed)
    return float(1 / (mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)).std())


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean absolute error (in [-1, 1] units) of decoding each image's posterior mean."""
    errors = [(vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
               - images[i:i + batch_size]).abs().mean(dim=(1, 2, 3)) for i in range(0, images.shape[0], batch_size)]
    return float(torch.cat(errors).mean())


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser and its text encoder.

class TokenTable:
    """Token ids of captions, tokenised once each (training draws from a few hundred distinct captions)."""

    def __init__(self, tokenizer, captions: list[str] = ()):
        self.tokenizer = tokenizer
        self.ids: dict[str, torch.Tensor] = {}
        self.add([*captions, ""])

    def add(self, captions: list[str]) -> None:
        new = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.ids.update(zip(new, ids))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        self.add(captions)
        return torch.stack([self.ids[c] for c in captions])


def digits_token_table(tokenizer) -> TokenTable:
    """A table holding every training caption of the grammar."""
    return TokenTable(tokenizer, prompt_list())


def denoising_loss(unet, text_encoder, scheduler, latents: torch.Tensor, input_ids: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """SD's training loss: MSE between the noise and the UNet's epsilon prediction at a uniform random timestep."""
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device,
                              generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    embeds = text_encoder(input_ids.to(latents.device))[0]
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    return F.mse_loss(prediction.float(), noise)


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline folder.

def save_pipeline(folder: str | Path, vae, text_encoder, tokenizer, unet, training: dict | None = None) -> Path:
    """Write a `StableDiffusionPipeline` folder (safetensors, no safety checker) and `training.json` if given."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    save_hub_layout(folder / "text_encoder" / "model.safetensors")
    # vocab.json + merges.txt (1.5 MB) rather than transformers 5's tokenizer.json (3.6 MB): smaller, and readable by
    # every CLIPTokenizer (slow, fast, transformers 4 and 5), as SD 1.5's folder is.
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_clip_vocabulary(folder / "tokenizer")
    if training is not None:
        (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return folder


def save_hub_layout(path: Path, prefix: str = "text_model.") -> None:
    """Rename a CLIP text encoder's tensors to `text_model.*`, SD 1.5's own layout. transformers 5 saves CLIPTextModel
    without the prefix, which some of its versions do not map into CLIPTextModelWithProjection (the flow-matching
    teacher's encoder shares this file) and leave random; every version reads the prefixed names into both."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    weights = load_file(str(path))
    save_file({name if name.startswith(prefix) else prefix + name: value for name, value in weights.items()},
              str(path), metadata=metadata)


def folder_size_bytes(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


@torch.no_grad()
def sample_digits(folder: str | Path, per_digit: int = 4, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                  seed: int = 0, device: str | torch.device = "cpu", template: str = "the digit {d}"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[10 * per_digit, 3, 32, 32]` in [-1, 1] from the saved pipeline for `template` with each digit, and
    the digits asked for; loaded with plain `StableDiffusionPipeline.from_pretrained`, as a user would."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(per_digit)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipeline([template.format(d=int(d)) for d in labels], num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="pt").images
    return (images.float().cpu() * 2 - 1).clamp(-1, 1), labels


def quick_class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    """The shipped 8x8 digits classifier's accuracy on `images` (`[N, 3, R, R]` in [-1, 1]) averaged to grey and
    area-downsampled to 8x8: a progress signal, not the 32x32 prompt-following metric."""
    from .metrics import class_accuracy

    grey = F.interpolate(images.float().mean(dim=1, keepdim=True), size=NATIVE_RESOLUTION, mode="area")
    return class_accuracy(grey, labels)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def fp32_megabytes(*modules) -> float:
    return sum(parameter_count(m) for m in modules) * 4 / 1e6


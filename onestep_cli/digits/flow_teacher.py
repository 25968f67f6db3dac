"""A flow-matching (SD3-style) text-to-image digits teacher on the SD-style teacher's VAE, tokenizer and text encoder.

The parts are Stable Diffusion 3's at toy size, from diffusers' own classes, so a saved folder loads with
`StableDiffusion3Pipeline.from_pretrained` and onestep maps it to sigma units as it maps SD3:

- denoiser: an `SD3Transformer2DModel` (MM-DiT: joint attention over image and text tokens, adaLN from the timestep
  and the pooled text embedding) on the 8x8x4 latents of the digits VAE, patch 2 (16 image tokens);
- text encoders: the SD-style teacher's trained `CLIPTextModel` read as SD3's two `CLIPTextModelWithProjection`s,
  frozen (SD3 keeps its CLIP encoders frozen too), with an identity text projection; no T5 (`text_encoder_3=None`),
  whose tokens SD3's pipeline replaces by zeros: `max_sequence_length` of them, 0 here (`MAX_SEQUENCE_LENGTH`), so
  the transformer attends to the 16 CLIP tokens only. The pipeline must be called with `max_sequence_length=0`;
- schedule: rectified flow, `x_t = (1 - t) x0 + t eps`, the network predicts `v = eps - x0`; training draws t from
  SD3's logit-normal(0, 1) and sampling is `FlowMatchEulerDiscreteScheduler` with shift 1 (the 8x8 latents need none).

The VAE, tokenizer and text-encoder weights are not copied: the folder links to the SD-style teacher's files
(`link_shared_parts`), so the shipped flow teacher adds only its transformer (2.3 MB) to the package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import t2i_teacher as kit

MAX_SEQUENCE_LENGTH = 0  # SD3's zero T5 tokens appended to the CLIP tokens: none (the teacher has no T5).
SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler's shift (SD3 uses 3.0 at 1024 px; 8x8 latents need none).
TRAIN_TIMESTEPS = 1000  # The transformer's timestep input is t * 1000, as SD3's.
SHARED_TOKENIZERS = ("tokenizer", "tokenizer_2")  # Linked whole to the SD-style teacher's tokenizer folder.
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_SHARD = "model-00001-of-00002.safetensors"  # A link to the SD-style teacher's text-encoder weights.
PROJECTION_SHARD = "model-00002-of-00002.safetensors"  # The identity text projection.


@dataclass(kw_only=True)
class FlowTeacherConfig:
    """Sizes of the SD3 transformer (the VAE and text encoder come from the SD-style teacher)."""

    layers: int = 4             # Joint transformer blocks.
    heads: int = 4              # Attention heads; the width is heads * head_dim.
    head_dim: int = 16          # Channels per head.
    patch_size: int = 2         # Latent pixels per token side: 8x8 latents -> 16 tokens at patch 2.
    latent_channels: int = 4    # The digits VAE's latent channels.
    latent_size: int = 8        # Latent side, pixels.


SIZES = {"tiny": FlowTeacherConfig(layers=1, heads=2, head_dim=8),  # Tests.
         "small": FlowTeacherConfig()}  # 0.59M parameters, 2.3 MB: trains on a CPU.


def build_transformer(config: FlowTeacherConfig, text_width: int):
    """An SD3 MM-DiT on `config`'s latents, reading both CLIP encoders' tokens (2 x text_width channels)."""
    from diffusers import SD3Transformer2DModel

    width = config.heads * config.head_dim
    return SD3Transformer2DModel(
        sample_size=config.latent_size, patch_size=config.patch_size, in_channels=config.latent_channels,
        out_channels=config.latent_channels, num_layers=config.layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=2 * text_width, caption_projection_dim=width,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=config.latent_size // config.patch_size)  # SD3's 96x96 table would be 2.4 MB here.


def sampling_scheduler():
    """SD3's sampler: Euler on the rectified flow, here without a shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=SHIFT)


def shared_parts(folder: str | Path) -> tuple[object, object, object]:
    """(vae, text_encoder, tokenizer) of a folder whose parts `link_shared_parts` linked, loaded as the pipeline loads
    them (the text encoder frozen)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
    return (AutoencoderKL.from_pretrained(folder / "vae").eval(), text_encoder,
            CLIPTokenizer.from_pretrained(folder / "tokenizer"))


def build_pipeline(transformer, vae, text_encoder, tokenizer):
    """A `StableDiffusion3Pipeline` of the parts, one CLIP encoder in both CLIP slots, no T5."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=sampling_scheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


@torch.no_grad()
def encode_caption_table(pipeline, captions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own (embeds `[N, 16, 2 * width]`, pooled `[N, 2 * width]`) of `captions`, as it samples them."""
    embeds, pooled = [], []
    for i in range(0, len(captions), batch_size):
        e, _, p, _ = pipeline.encode_prompt(prompt=captions[i:i + batch_size], prompt_2=None, prompt_3=None,
                                            do_classifier_free_guidance=False,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu")
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def logit_normal_t(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """SD3's training times: t = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024, 'rf/lognorm(0.00, 1.00)')."""
    return torch.sigmoid(torch.randn(batch, device=device, generator=generator))


def rectified_flow_loss(transformer, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """MSE between the transformer's velocity at `x_t = (1 - t) x0 + t eps` and `eps - x0`, t logit-normal."""
    t = logit_normal_t(latents.shape[0], generator, latents.device)
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    t_ = t.view(-1, 1, 1, 1)
    noisy = (1 - t_) * latents + t_ * noise
    velocity = transformer(hidden_states=noisy, timestep=t * TRAIN_TIMESTEPS, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(velocity.float(), noise - latents)


def save_pipeline(folder: str | Path, transformer, sd_teacher: str | Path, training: dict | None = None) -> Path:
    """Write a `StableDiffusion3Pipeline` folder: the transformer and scheduler, with links to `sd_teacher`'s parts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    sampling_scheduler().save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": _diffusers_version(),
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": [None, None], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": [None, None],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    link_shared_parts(folder, sd_teacher)
    if training is not None:
        (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return folder


def link_shared_parts(folder: str | Path, sd_teacher: str | Path) -> None:
    """Point `folder`'s VAE, tokenizers and text encoders at the SD-style teacher's files with relative links.

    The VAE's config is its own (SD3's pipeline adds `shift_factor`, which must be a number, 0 here). The text encoder
    is a sharded checkpoint: shard 1 links to the SD-style teacher's weights, shard 2 holds the identity projection
    (4 kB), and `text_encoder_2` links to `text_encoder` (SD3's second CLIP slot).
    """
    folder, sd_teacher = Path(folder), Path(sd_teacher)
    folder.mkdir(parents=True, exist_ok=True)
    for part in SHARED_TOKENIZERS:
        _relink(folder / part, sd_teacher / "tokenizer")
    vae = folder / "vae"
    vae.mkdir(exist_ok=True)
    vae_config = json.loads((sd_teacher / "vae" / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**vae_config, "shift_factor": 0.0}, indent=2) + "\n")
    _relink(vae / VAE_WEIGHTS, sd_teacher / "vae" / VAE_WEIGHTS)
    encoder = folder / "text_encoder"
    encoder.mkdir(exist_ok=True)
    config = json.loads((sd_teacher / "text_encoder" / "config.json").read_text())
    hidden = int(config["hidden_size"])
    config.update(architectures=["CLIPTextModelWithProjection"], projection_dim=hidden)
    (encoder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _relink(encoder / TEXT_ENCODER_SHARD, sd_teacher / "text_encoder" / "model.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"text_projection.weight": torch.eye(hidden)}, str(encoder / PROJECTION_SHARD),
              metadata={"format": "pt"})
    with safe_open(str(encoder / TEXT_ENCODER_SHARD), framework="pt") as shard:
        names = list(shard.keys())
    weight_map = {**{name: TEXT_ENCODER_SHARD for name in names}, "text_projection.weight": PROJECTION_SHARD}
    size = (encoder / TEXT_ENCODER_SHARD).stat().st_size + (encoder / PROJECTION_SHARD).stat().st_size
    (encoder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2) + "\n")
    _relink(folder / "text_encoder_2", encoder)


def _relink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu"):
    """The saved folder as a user loads it: `StableDiffusion3Pipeline.from_pretrained`, without T5 (diffusers' way to
    load SD3 without its third text encoder)."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                        local_files_only=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def sample_digits(folder: str | Path, per_digit: int = 4, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                  seed: int = 0, device: str | torch.device = "cpu", template: str = "the digit {d}"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[10 * per_digit, 3, 32, 32]` in [-1, 1] from the saved pipeline for `template` with each digit."""
    pipeline = load_pipeline(folder, device)
    labels = torch.arange(10).repeat_interleave(per_digit)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipeline([template.format(d=int(d)) for d in labels], num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="pt",
                      max_sequence_length=MAX_SEQUENCE_LENGTH).images
    return (images.float().cpu() * 2 - 1).clamp(-1, 1), labels


def parameter_megabytes(module) -> float:
    return kit.fp32_megabytes(module)

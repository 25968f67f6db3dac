"""A PixArt-α-style text-to-image digits teacher, trained from scratch here and saved as a diffusers pipeline.

The parts are PixArt-α's, shrunk to 32x32 digits:

- tokenizer: a T5 Unigram tokenizer (`transformers.T5Tokenizer`, built offline from a vocabulary list, no
  sentencepiece) whose pieces are whole words: every word of the caption grammar's training and held-out templates, the
  numerals 0-9, the number words, the attribute synonyms, `,` and `.`; T5's `<pad>`=0, `</s>`=1, `<unk>`=2. A word
  outside the grammar becomes `<unk>`, so any prompt encodes;
- text encoder: a `T5EncoderModel` (T5 v1.1's gated-GELU feed-forward) initialised at random and trained jointly with
  the transformer, since no pretrained T5 is available offline;
- denoiser: a `PixArtTransformer2DModel` on the 8x8x4 latents of the digits VAE (`t2i_teacher.build_vae`, shared with
  the SD-style teacher), with PixArt's adaLN-single timestep conditioning and cross-attention to the T5 tokens. It
  predicts epsilon only (4 output channels, no learned variance): DPM-Solver ignores the variance, and so does
  onestep's `PixArtDenoiser`, which accepts either;
- schedule: PixArt-α's, DDPM linear betas 1e-4..0.02 over 1000 steps, epsilon prediction, sampled with DPM-Solver++.

Captions are drawn per training step from the grammar (`captions.random_caption`) and dropped to "" 10% of the time
for classifier-free guidance; the loss is the DDPM epsilon MSE on scaled latents. Training pads captions to the
longest in the batch while the pipeline pads to 120 tokens: both the T5 encoder and the transformer's cross-attention
mask the padding, so the embeddings the teacher learns are the ones its pipeline computes.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.ema import ema_beta
from ..errors import InputError
from . import captions
from . import t2i_teacher as kit

TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # PixArt-α's linear schedule.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # Ids 0, 1, 2, as every T5 tokenizer numbers them.
PUNCTUATION = (",", ".")


@dataclass(kw_only=True)
class PixArtTeacherConfig:
    """Sizes of the text encoder and the transformer (the VAE's come from the SD-style kit)."""

    text_width: int = 128          # T5 d_model; also the transformer's caption_channels.
    text_layers: int = 3           # T5 encoder blocks.
    text_heads: int = 4            # T5 attention heads (d_kv = text_width / text_heads).
    text_ff: int = 256             # T5 gated-GELU feed-forward width.
    layers: int = 6                # PixArt transformer blocks.
    heads: int = 6                 # Attention heads per block.
    head_dim: int = 32             # Channels per head; the transformer's width is heads * head_dim.
    patch_size: int = 2            # Latent pixels per token side: 8x8 latents -> 16 tokens at patch 2.
    latent_channels: int = 4       # The digits VAE's latent channels.
    latent_size: int = 8           # Latent side, pixels (32 px images / vae_scale_factor 4).


PRESETS = {
    "tiny": PixArtTeacherConfig(text_width=16, text_layers=1, text_heads=2, text_ff=32, layers=1, heads=2,
                                head_dim=8),  # Tests.
    "small": PixArtTeacherConfig(text_layers=2, layers=4, heads=4),  # 1.2M + 0.3M parameters: trains on a CPU.
    "base": PixArtTeacherConfig(),  # 3.9M + 0.5M parameters: a GPU run.
}


def caption_vocabulary() -> list[str]:
    """Every word a digits caption can use: the templates' words (training and held-out), digits, attributes."""
    templates = " ".join(captions.TRAIN_TEMPLATES + captions.HELDOUT_TEMPLATES)
    text = " ".join([re.sub(r"\{\w\}", " ", templates), *captions.DIGIT_WORDS, *captions.WEIGHTS, *captions.SLANTS,
                     *captions.WEIGHT_WORDS, "straight"])
    words = sorted(set(re.findall(r"[a-z]+", text)))
    return words + [str(d) for d in range(10)]


def build_tokenizer():
    """A T5 tokenizer whose pieces are the caption vocabulary's words (unknown words map to `<unk>`)."""
    from transformers import T5Tokenizer

    # Equal scores: Unigram then prefers the fewest pieces, i.e. whole words, and splits only trailing punctuation.
    pieces = [(f"▁{word}", -1.0) for word in caption_vocabulary()] + [(mark, -1.0) for mark in PUNCTUATION]
    return T5Tokenizer(vocab=[(token, 0.0) for token in T5_SPECIALS] + pieces, extra_ids=0)


def build_text_encoder(config: PixArtTeacherConfig, vocab_size: int):
    """A randomly initialised T5 encoder (T5 v1.1 layout, no dropout) of `config`'s sizes."""
    from transformers import T5Config, T5EncoderModel

    if config.text_width % config.text_heads:
        raise ValueError(f"text_width {config.text_width} must be a multiple of text_heads {config.text_heads}.")
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=config.text_width, d_kv=config.text_width // config.text_heads,
        d_ff=config.text_ff, num_layers=config.text_layers, num_heads=config.text_heads, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1))


def build_transformer(config: PixArtTeacherConfig):
    """A PixArt-α transformer (adaLN-single, cross-attention to T5 tokens) on `config`'s latents, epsilon output."""
    from diffusers import PixArtTransformer2DModel

    if config.latent_size % config.patch_size:
        raise ValueError(f"latent_size {config.latent_size} must be a multiple of patch_size {config.patch_size}.")
    width = config.heads * config.head_dim
    return PixArtTransformer2DModel(
        num_attention_heads=config.heads, attention_head_dim=config.head_dim, in_channels=config.latent_channels,
        out_channels=config.latent_channels, num_layers=config.layers, cross_attention_dim=width,
        attention_bias=True, sample_size=config.latent_size, patch_size=config.patch_size,
        activation_fn="gelu-approximate", num_embeds_ada_norm=TRAIN_TIMESTEPS, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        caption_channels=config.text_width)


def training_scheduler():
    """PixArt-α's forward process: DDPM, linear betas 1e-4..0.02, 1000 steps, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                         beta_schedule="linear", prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    """PixArt-α's pipeline scheduler: DPM-Solver++ (2nd order, midpoint) on the same betas."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                                       beta_schedule="linear", prediction_type="epsilon", algorithm_type="dpmsolver++",
                                       solver_order=2, solver_type="midpoint", lower_order_final=True)


def encode_captions(tokenizer, text_encoder, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings `[N, L, text_width]` and attention mask `[N, L]` of `texts`, padded to the longest.

    Lower-cased as the pipeline's encode_prompt does; its padding to 120 tokens is masked, so it gives the same values.
    """
    tokens = tokenizer([text.lower().strip() for text in texts], padding="longest", return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    return text_encoder(ids, attention_mask=mask)[0], mask


def epsilon_loss(transformer, embeds: torch.Tensor, mask: torch.Tensor, latents: torch.Tensor, alphas_cumprod,
                 generator: torch.Generator) -> torch.Tensor:
    """DDPM's simple loss: MSE between the noise and the transformer's prediction at uniform integer timesteps."""
    batch = latents.shape[0]
    timesteps = torch.randint(TRAIN_TIMESTEPS, (batch,), device=latents.device, generator=generator)
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    alpha_bar = alphas_cumprod.to(latents.device)[timesteps].view(batch, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    prediction = transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return F.mse_loss(prediction.float(), noise)


def save_pipeline(folder: str | Path, tokenizer, text_encoder, vae, transformer) -> Path:
    """Assemble a `PixArtAlphaPipeline` with PixArt-α's DPM-Solver scheduler and write it (safetensors) to `folder`."""
    from diffusers import PixArtAlphaPipeline

    pipeline = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=copy.deepcopy(text_encoder).cpu().eval(),
                                   vae=copy.deepcopy(vae).cpu().eval(),
                                   transformer=copy.deepcopy(transformer).cpu().eval(),
                                   scheduler=sampling_scheduler())
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


@torch.no_grad()
def sample_digits(folder: str | Path, per_digit: int = 4, num_inference_steps: int = 25, guidance_scale: float = 4.5,
                  seed: int = 0, device: str | torch.device = "cpu", template: str = "the digit {d}"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[10 * per_digit, 3, 32, 32]` in [-1, 1] for `template` with each digit, and the digits asked for.

    Loaded with plain `PixArtAlphaPipeline.from_pretrained`, as a user would; PixArt's resolution binning knows only
    256-1024 px, so it is off, and so is caption cleaning (the training captions were only lower-cased).
    """
    from diffusers import PixArtAlphaPipeline

    pipeline = PixArtAlphaPipeline.from_pretrained(folder, local_files_only=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(per_digit)
    size = pipeline.transformer.config.sample_size * pipeline.vae_scale_factor
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipeline([template.format(d=int(d)) for d in labels], num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=size, width=size, use_resolution_binning=False,
                      clean_caption=False, generator=generator, output_type="pt").images
    return (images.float().cpu() * 2 - 1).clamp(-1, 1), labels


def quick_check(folder: str | Path, per_digit: int = 10, num_inference_steps: int = 25, guidance_scale: float = 4.5,
                seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """The 8x8 digits classifier's accuracy on the saved pipeline's "the digit {d}" samples: a progress signal.

    Samples are channel-averaged and area-downsampled to 8x8 (`t2i_teacher.quick_class_accuracy`), which blurs them,
    so the same measure on the real digits is reported beside it as the ceiling.
    """
    start = time.time()
    images, labels = sample_digits(folder, per_digit, num_inference_steps, guidance_scale, seed, device)
    accuracy, provenance = kit.quick_class_accuracy(images, labels)
    real_images, real_prompts = kit.captioned_digits()
    real_accuracy, _ = kit.quick_class_accuracy(real_images, torch.tensor([p.digit for p in real_prompts]))
    return {"prompt": "the digit {d}", "num_samples": int(labels.numel()), "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "quick_class_accuracy": accuracy,
            "per_class": provenance["per_class_accuracy"], "real_digits_quick_class_accuracy": real_accuracy,
            "wall_s": round(time.time() - start, 1)}


@dataclass(kw_only=True)
class TrainingOptions:
    """One training run of the PixArt-style digits teacher (the script's flags, one to one)."""

    out: Path                            # Pipeline folder to write (created), with log.jsonl and training.json.
    preset: str = "small"                # Network sizes: a key of PRESETS.
    vae: Path | None = None              # A trained digits AutoencoderKL folder to share; None trains one first.
    vae_channels: tuple[int, ...] = (16, 32, 32)  # Channels per level of a VAE trained here (3 levels: 32 -> 8 px).
    vae_steps: int = 4000                # Steps at most of a VAE trained here.
    vae_minutes: float = 5.0             # Wall-clock cap of a VAE trained here, minutes.
    batch_size: int = 64                 # Images per step.
    lr: float = 5e-4                     # AdamW learning rate after the warm-up.
    lr_warmup_steps: int = 200           # Linear learning-rate warm-up, steps.
    weight_decay: float = 0.01           # AdamW decoupled weight decay.
    caption_dropout: float = 0.1         # Fraction of captions replaced by "" (the null prompt of guidance).
    ema_halflife_kimg: float = 100.0     # Largest EMA half-life, kimg.
    ema_rampup_ratio: float = 0.1        # EMA half-life <= this x images seen.
    steps: int = 40000                   # Optimiser steps at most.
    minutes: float = 17.0                # Wall-clock cap of the diffusion training, minutes.
    tick_seconds: float = 60.0           # Seconds between log lines.
    seed: int = 0                        # Seed of initialisation, captions and training noise.
    device: str = "auto"                 # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'...
    precision: str = "fp32"              # 'bf16': autocast forward and backward on CUDA (fp32 weights, AdamW, EMA).
    samples_per_digit: int = 10          # Quick check after saving: images per "the digit {d}" (0 skips it).
    check_steps: int = 25                # DPM-Solver steps of the quick check.
    guidance_scale: float = 4.5          # Classifier-free guidance of the quick check (PixArt-α's default).

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise InputError(f"preset {self.preset!r} is not one of {sorted(PRESETS)}.")
        if self.precision not in ("fp32", "bf16"):
            raise InputError(f"precision {self.precision!r} is neither 'fp32' nor 'bf16'.")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError(f"steps ({self.steps}) and batch size ({self.batch_size}) must be at least 1.")
        if not 0 <= self.caption_dropout < 1:
            raise InputError(f"caption dropout {self.caption_dropout} is not a fraction in [0, 1); 0.1 is usual.")
        if self.vae is not None and not (Path(self.vae) / "config.json").is_file():
            raise InputError(f"VAE folder {self.vae} holds no config.json; give the folder of a saved AutoencoderKL, "
                             "e.g. the SD-style digits teacher's OUT/vae/.")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def shared_vae(options: TrainingOptions, images: torch.Tensor, log) -> tuple[object, dict]:
    """The digits AutoencoderKL (on the images' device) and a record of where it came from.

    Loaded from `options.vae` (its scaling_factor as saved), or trained here as the SD-style kit trains its own.
    """
    from diffusers import AutoencoderKL

    if options.vae is not None:
        vae = AutoencoderKL.from_pretrained(options.vae).to(images.device).eval()
        return vae, {"vae": f"loaded from {options.vae}"}
    torch.manual_seed(options.seed)
    vae = kit.build_vae(options.vae_channels, norm_num_groups=min(8, *options.vae_channels)).to(images.device)
    settings = kit.VAETraining(steps=options.vae_steps, minutes=options.vae_minutes)
    start = time.time()
    record = kit.train_vae(vae, images, settings, torch.Generator(images.device).manual_seed(options.seed), log)
    vae.register_to_config(scaling_factor=kit.latent_scaling_factor(vae, images, seed=options.seed))
    return vae, {"vae": {"trained_here": True, "steps": record["step"], "final": record,
                         "reconstruction_mae": kit.reconstruction_error(vae, images),
                         "wall_s": round(time.time() - start, 1)}}


def train_pixart_teacher(options: TrainingOptions, log) -> dict:
    """Train the transformer and the T5 encoder jointly from scratch; save their EMA as a PixArt pipeline folder.

    `log(record)` receives the options, progress and the quick check; returns the summary written to
    `options.out / "training.json"`.
    """
    options.validate()
    config = PRESETS[options.preset]
    device = resolve_device(options.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log({"options": {k: str(v) for k, v in asdict(options).items()}, "network": asdict(config),
         "device": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__})
    images, prompts = kit.captioned_digits(config.latent_size * 4)
    images = images.to(device)
    vae, vae_record = shared_vae(options, images, log)
    latent_mean, latent_std = kit.encode_posteriors(vae, images)
    expected = (config.latent_channels, config.latent_size, config.latent_size)
    if tuple(latent_mean.shape[1:]) != expected:
        raise InputError(f"the VAE makes latents of shape {list(latent_mean.shape[1:])} from 32x32 digits; the "
                         f"transformer expects {list(expected)}. Use a digits VAE (t2i_teacher.build_vae).")
    scaling = float(vae.config.scaling_factor)

    torch.manual_seed(options.seed + 1)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(config, len(tokenizer)).to(device).train()
    transformer = build_transformer(config).to(device).train()
    ema_text, ema_transformer = (copy.deepcopy(m).eval().requires_grad_(False) for m in (text_encoder, transformer))
    trained = [*transformer.parameters(), *text_encoder.parameters()]
    averaged = [*ema_transformer.parameters(), *ema_text.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=options.lr, weight_decay=options.weight_decay)
    alphas_cumprod = training_scheduler().alphas_cumprod.to(device)
    # Captions and batch indices from a CPU generator (the grammar draws on the CPU), noise from one on the device.
    host_gen = torch.Generator().manual_seed(options.seed)
    device_gen = torch.Generator(device).manual_seed(options.seed + 2)
    autocast = options.precision == "bf16" and device.type == "cuda"

    start = tick_time = time.time()
    step, tick_step, loss_sum, record = 0, 0, torch.zeros((), device=device), {}
    while True:
        index = torch.randint(images.shape[0], (options.batch_size,), generator=host_gen)
        texts = kit.training_captions([prompts[i] for i in index.tolist()], host_gen, options.caption_dropout)
        index = index.to(device)
        noise = torch.randn(latent_mean[index].shape, device=device, generator=device_gen)
        latents = (latent_mean[index] + latent_std[index] * noise) * scaling
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            embeds, mask = encode_captions(tokenizer, text_encoder, texts, device)
            loss = epsilon_loss(transformer, embeds, mask, latents, alphas_cumprod, device_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = options.lr * min((step + 1) / max(options.lr_warmup_steps, 1), 1)
        optimizer.step()
        step += 1
        decay = ema_beta(options.batch_size, options.ema_halflife_kimg, options.ema_rampup_ratio,
                         step * options.batch_size)
        with torch.no_grad():
            torch._foreach_lerp_(averaged, trained, 1 - decay)
        loss_sum += loss.detach()

        now = time.time()
        done = step >= options.steps or now - start >= options.minutes * 60
        if now - tick_time >= options.tick_seconds or done:
            mean_loss = float(loss_sum) / (step - tick_step)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the diffusion loss became {mean_loss} by step {step}; lower the learning "
                                         f"rate (now {options.lr}) or train in fp32.")
            record = {"stage": "denoiser", "step": step, "kimg": step * options.batch_size / 1000, "loss": mean_loss,
                      "lr": optimizer.param_groups[0]["lr"], "ema_decay": decay,
                      "steps_per_s": (step - tick_step) / (now - tick_time), "elapsed_s": round(now - start, 1)}
            log(record)
            tick_time, tick_step, loss_sum = now, step, torch.zeros((), device=device)
        if done:
            break

    save_pipeline(options.out, tokenizer, ema_text, vae, ema_transformer)
    summary = {"data": "sklearn digits, 1797 images at 32x32 RGB grey, captions from onestep_cli.digits.captions",
               "options": {k: str(v) for k, v in asdict(options).items()}, "network": asdict(config),
               "tokenizer": f"T5 Unigram over the caption words, {len(tokenizer)} tokens",
               "text_encoder": "T5 encoder trained from scratch jointly with the transformer", **vae_record,
               "latent_scaling_factor": scaling, "denoiser": {**record, "wall_s": round(time.time() - start, 1)},
               "parameters": {name: kit.parameter_count(m) for name, m in
                              (("vae", vae), ("text_encoder", ema_text), ("transformer", ema_transformer))},
               "weights": "EMA of the transformer and text encoder", "device": device_name,
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    if options.samples_per_digit > 0:
        summary["check"] = quick_check(options.out, options.samples_per_digit, options.check_steps,
                                       options.guidance_scale, options.seed, device)
        log({"stage": "check", **summary["check"]})
    summary["folder_bytes"] = kit.folder_size_bytes(options.out)
    (options.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log({"saved": str(options.out), "folder_bytes": summary["folder_bytes"]})
    return summary

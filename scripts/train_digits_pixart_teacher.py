"""Train the PixArt-α-style digits text-to-image teacher: a T5 encoder and a PixArtTransformer2DModel on VAE latents.

The text encoder and the transformer are trained jointly from scratch (no pretrained T5 exists offline; the captions'
few dozen words are learnt with the images) with PixArt-α's epsilon-prediction DDPM loss on the scaled latents of the
digits AutoencoderKL, a caption drawn per image per step from the caption grammar, 10% of captions dropped to "" for
classifier-free guidance, AdamW and an EMA of both networks. The EMA is saved as a PixArtAlphaPipeline folder (OUT)
with training.json and log.jsonl; a quick check then samples "the digit {d}" from it and scores the 8x8 classifier's
accuracy. Give --vae OUT_SD/vae (the SD-style teacher's autoencoder) so both teachers share one latent space, else
an autoencoder is trained first, as scripts/train_digits_t2i_teacher.py trains its own:

    PYTHONPATH=. python scripts/train_digits_pixart_teacher.py --out runs/digits_pixart --vae runs/digits_sd/vae

Stops at --steps or --minutes, whichever comes first. The defaults are those of the run in docs/digits-t2i.md (17
minutes on two CPU cores); onestep_cli/digits/pixart_teacher.py holds the architecture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from onestep_cli.digits import pixart_teacher

SMOKE = dict(preset="tiny", vae_channels="8,8,8", vae_steps=2, steps=3, batch_size=4, samples_per_digit=1,
             check_steps=2)  # Tiny networks and a few steps, for tests.


def parse_args(argv=None):
    defaults = pixart_teacher.TrainingOptions(out=Path("."))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Pipeline folder to write (created).")
    p.add_argument("--vae", type=Path, default=None, help="A trained digits AutoencoderKL folder (e.g. the SD-style "
                   "teacher's OUT/vae); default: train one first.")
    p.add_argument("--preset", choices=sorted(pixart_teacher.PRESETS), default=defaults.preset,
                   help="Network sizes (onestep_cli/digits/pixart_teacher.py PRESETS).")
    p.add_argument("--device", default=defaults.device, help="'auto' (CUDA when present), 'cpu', 'cuda'...")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's).")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=defaults.precision,
                   help="bf16: autocast forward and backward on CUDA (fp32 weights, optimizer and EMA).")
    p.add_argument("--seed", type=int, default=defaults.seed, help="Seed of initialisation, captions and noise.")
    p.add_argument("--smoke", action="store_true", help="Tiny networks and a few steps (tests).")
    p.add_argument("--vae-channels", default=",".join(map(str, defaults.vae_channels)),
                   help="Channels per level of a VAE trained here (3 levels: 32 -> 8 px).")
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="Steps at most of a VAE trained here.")
    p.add_argument("--vae-minutes", type=float, default=defaults.vae_minutes, help="Its wall-clock cap, minutes.")
    p.add_argument("--steps", type=int, default=defaults.steps, help="Denoiser optimiser steps at most.")
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="Denoiser wall-clock cap, minutes.")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Images per step.")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate after the warm-up.")
    p.add_argument("--lr-warmup-steps", type=int, default=defaults.lr_warmup_steps, help="Linear warm-up, steps.")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay.")
    p.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout,
                   help="Fraction of captions replaced by '' (the null prompt of guidance).")
    p.add_argument("--ema-halflife-kimg", type=float, default=defaults.ema_halflife_kimg,
                   help="Largest EMA half-life, kimg.")
    p.add_argument("--ema-rampup-ratio", type=float, default=defaults.ema_rampup_ratio,
                   help="EMA half-life <= this x images seen.")
    p.add_argument("--tick-seconds", type=float, default=defaults.tick_seconds, help="Seconds between log lines.")
    p.add_argument("--samples-per-digit", type=int, default=defaults.samples_per_digit,
                   help="Quick-check images per 'the digit {d}' (0 skips the check).")
    p.add_argument("--check-steps", type=int, default=defaults.check_steps, help="DPM-Solver steps of the check.")
    p.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                   help="Classifier-free guidance scale of the check.")
    p.add_argument("--check-only", action="store_true", help="Only run the quick check on the pipeline in --out.")
    args = p.parse_args(argv)
    if args.smoke:  # Smoke sizes replace the defaults; flags given explicitly still win.
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    return args


def options_of(args) -> pixart_teacher.TrainingOptions:
    fields = pixart_teacher.TrainingOptions.__dataclass_fields__
    values = {name: value for name, value in vars(args).items() if name in fields}
    values["vae_channels"] = tuple(int(v) for v in str(args.vae_channels).split(",") if v.strip())
    return pixart_teacher.TrainingOptions(**values)


def log_to(path: Path):
    """A logger that appends JSON records to `path` and prints them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("a")

    def log(record: dict) -> None:
        line = json.dumps(record)
        file.write(line + "\n")
        file.flush()
        print(line, flush=True)

    return log


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    # The JSONL log is the progress report; load and save bars would interleave with it.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    options = options_of(args)
    if args.check_only:
        device = pixart_teacher.resolve_device(options.device)
        record = pixart_teacher.quick_check(args.out, options.samples_per_digit, options.check_steps,
                                            options.guidance_scale, options.seed, device)
        print(json.dumps(record), flush=True)
        return record
    return pixart_teacher.train_pixart_teacher(options, log_to(args.out / "log.jsonl"))


if __name__ == "__main__":
    main()

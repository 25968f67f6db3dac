"""Train the shipped digits teacher: a class-conditional EDM (DDPM++-style SongUNet) on sklearn's 1797 digits.

The EDM recipe (Karras et al. 2022, training/loss.py EDMLoss and training_loop.py): sigma ~ lognormal(-1.2, 1.2),
loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, Adam with a linear learning-rate ramp, and an EMA of the
weights whose half-life grows with training (ema_rampup_ratio). No augmentation: digits are not flip-symmetric, and
the engine feeds no augment labels. Imports only torch, numpy, scikit-learn and onestep_cli's EDM networks and digits
loader, so it runs on a machine that has none of onestep's other dependencies:

    PYTHONPATH=. python scripts/train_digits_teacher.py --out runs/digits_teacher

Trains for --max-kimg or --minutes, whichever ends first, and writes OUT/final/ and OUT/mid/ (EMA weights at the end
and half-way, via save_edm_weights) and OUT/log.jsonl (the options, then one line per tick: kimg, loss, lr, EMA
half-life, images/s). The defaults reproduce the shipped teacher (onestep_cli/assets/digits_teacher/): 1561 kimg,
about 3 minutes on one H200 GPU; far too slow on a CPU. docs/digits.md tells how it was chosen.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from onestep_cli.denoisers.edm import EDMPrecond, save_edm_weights
from onestep_cli.digits.data import NUM_CLASSES, load_digits_images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Output folder (created).")
    p.add_argument("--resolution", type=int, default=8, help="Image resolution, pixels (8 = the digits' own).")
    p.add_argument("--model-channels", type=int, default=32, help="Base channel count of the SongUNet.")
    p.add_argument("--channel-mult", type=str, default="1,2,2", help="Channel multiplier per resolution level.")
    p.add_argument("--num-blocks", type=int, default=2, help="Residual blocks per resolution level.")
    p.add_argument("--attn-resolutions", type=str, default="4", help="Resolutions with self-attention, pixels.")
    p.add_argument("--dropout", type=float, default=0.25, help="Dropout inside residual blocks while training.")
    p.add_argument("--batch", type=int, default=512, help="Images per step.")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate after the ramp.")
    p.add_argument("--lr-rampup-kimg", type=float, default=200, help="Linear learning-rate warm-up, kimg.")
    p.add_argument("--ema-halflife-kimg", type=float, default=500, help="Largest EMA half-life, kimg.")
    p.add_argument("--ema-rampup-ratio", type=float, default=0.05, help="EMA half-life <= this x images seen.")
    p.add_argument("--max-kimg", type=float, default=1561, help="Training length, kimg (the shipped teacher's).")
    p.add_argument("--minutes", type=float, default=30.0, help="Wall-clock cap, minutes (stops early if reached).")
    p.add_argument("--tick-seconds", type=float, default=20.0, help="Seconds between log lines.")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation and training noise.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the network's forward and backward (fp32 weights, optimizer and EMA).")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_teacher(args) -> EDMPrecond:
    return EDMPrecond(
        img_resolution=args.resolution, img_channels=1, label_dim=NUM_CLASSES, sigma_data=0.5,
        model_type="SongUNet", model_channels=args.model_channels, channel_mult=ints(args.channel_mult),
        num_blocks=args.num_blocks, attn_resolutions=ints(args.attn_resolutions), dropout=args.dropout,
        embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
        resample_filter=[1, 1],
    )


def edm_loss(net, images, labels, generator, p_mean=-1.2, p_std=1.2, sigma_data=0.5):
    """EDM's per-pixel weighted denoising loss, averaged over the batch."""
    rnd = torch.randn([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
    sigma = (rnd * p_std + p_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noise = torch.randn(images.shape, device=images.device, generator=generator) * sigma
    denoised = net(images + noise, sigma.flatten(), labels)
    return (weight * (denoised - images) ** 2).mean()


def save(ema: EDMPrecond, folder: Path, dropout: float) -> None:
    # The exported network is for inference: its config records dropout 0 (the weights are unchanged by this).
    export = copy.deepcopy(ema).cpu()
    export.init_kwargs = {**export.init_kwargs, "dropout": 0.0}
    save_edm_weights(export, folder)
    (folder / "training.json").write_text(json.dumps({"dropout_while_training": dropout}) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device=device).manual_seed(args.seed)

    images, labels = load_digits_images(args.resolution)
    images, onehot = images.to(device), torch.nn.functional.one_hot(labels, NUM_CLASSES).float().to(device)
    net = build_teacher(args).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    num_params = sum(p.numel() for p in net.parameters())

    log_path = args.out / "log.jsonl"
    with log_path.open("w") as log:
        log.write(json.dumps({"options": {k: str(v) for k, v in vars(args).items()}, "num_params": num_params,
                              "num_images": int(images.shape[0]), "torch": torch.__version__,
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}) + "\n")
        budget_s, start = args.minutes * 60, time.time()
        nimg, step, loss_sum, loss_count, saved_mid = 0, 0, 0.0, 0, False
        tick_time, tick_nimg = start, 0
        while True:
            idx = torch.randint(images.shape[0], (args.batch,), device=device, generator=gen)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                loss = edm_loss(net, images[idx], onehot[idx], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = args.lr * min(nimg / max(args.lr_rampup_kimg * 1000, 1e-8), 1)
            opt.step()
            nimg += args.batch
            step += 1
            # EDM's EMA: half-life min(ema_halflife, rampup_ratio * images seen), converted to a per-step decay.
            halflife_nimg = min(args.ema_halflife_kimg * 1000, nimg * args.ema_rampup_ratio)
            beta = 0.5 ** (args.batch / max(halflife_nimg, 1e-8))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1

            elapsed = time.time() - start
            progress = max(elapsed / budget_s, nimg / (args.max_kimg * 1000))
            done = progress >= 1
            if time.time() - tick_time >= args.tick_seconds or done:
                record = {"step": step, "kimg": nimg / 1000, "loss": float(loss_sum) / loss_count,
                          "lr": opt.param_groups[0]["lr"], "ema_halflife_kimg": halflife_nimg / 1000,
                          "images_per_s": (nimg - tick_nimg) / (time.time() - tick_time), "elapsed_s": elapsed}
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
                loss_sum, loss_count, tick_time, tick_nimg = 0.0, 0, time.time(), nimg
            if not saved_mid and progress >= 0.5:
                save(ema, args.out / "mid", args.dropout)
                log.write(json.dumps({"saved": "mid", "step": step, "kimg": nimg / 1000}) + "\n")
                saved_mid = True
            if done:
                break
        save(ema, args.out / "final", args.dropout)
        log.write(json.dumps({"saved": "final", "step": step, "kimg": nimg / 1000,
                              "wall_s": time.time() - start}) + "\n")


if __name__ == "__main__":
    main()

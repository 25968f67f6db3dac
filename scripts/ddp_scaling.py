"""DDP scaling of the CIFAR-10-size distill step: 1 GPU vs N GPUs at the same per-GPU batch (docs/benchmarks.md).

Builds a random-init EDM DDPM++ CIFAR-10 teacher (55.7M parameters, the real config), then runs
`onestep distill --preset cifar10-uncond-sid` on 1 and on N GPUs for a few steps and prints one table of images/s.
Usage: python scripts/ddp_scaling.py --gpus 2 --per-gpu-batch 128 --steps 40 --out /tmp/ddp
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from onestep_cli.denoisers.edm import EDMPrecond, save_edm_weights

DDPMPP_CIFAR10 = dict(model_type="SongUNet", img_resolution=32, img_channels=3, label_dim=0,
                      embedding_type="positional", encoder_type="standard", decoder_type="standard",
                      channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                      dropout=0.13)


def run(gpus: int, batch: int, steps: int, teacher: Path, out: Path, precision: str) -> dict:
    command = [sys.executable, "-m", "onestep_cli", "distill", "--preset", "cifar10-uncond-sid", "--gpus", str(gpus),
               "--set", f"teacher.path={teacher}", "--set", f"train.batch_size={batch}",
               "--set", f"train.max_steps={steps}", "--set", f"train.tick_every={steps // 2}",
               "--set", f"train.checkpoint_every={steps}", "--set", f"train.precision={precision}",
               "--out", str(out), "--json"]
    subprocess.run(command, check=True)
    last = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])  # Second half: warm-up excluded.
    return {"gpus": gpus, "global_batch": batch, "images_per_s": 1000 * last["kimg_per_s"],
            "peak_memory_gb": last.get("peak_memory_gb")}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--per-gpu-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddp"))
    args = parser.parse_args()
    teacher = args.out / "teacher"
    torch.manual_seed(0)
    save_edm_weights(EDMPrecond(**DDPMPP_CIFAR10), teacher)
    rows = [run(g, args.per_gpu_batch * g, args.steps, teacher, args.out / f"run-{g}gpu", args.precision)
            for g in (1, args.gpus)]
    print("| GPUs | global batch | images/s | peak GB per GPU | speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        speedup = row["images_per_s"] / rows[0]["images_per_s"]
        print(f"| {row['gpus']} | {row['global_batch']} | {row['images_per_s']:.0f} | {row['peak_memory_gb']} | "
              f"{speedup:.2f}x |")


if __name__ == "__main__":
    main()

"""Measure the shipped digits teacher: its deterministic-Heun samples against the real digits.

    python -m onestep_cli.digits.measure --num 1000 --steps 18 [--grid docs/images/digits_real_vs_teacher.png]

prints one JSON object: fd_digits and class_accuracy of the teacher's samples (seeds 0..num-1, the per-seed noise and
labels of `onestep_cli.sampling`), the same metrics for real digits as reference points, and a memorisation check
(each sample's distance to its nearest training digit, against the real digits' own nearest-neighbour distances).
`--grid` also writes a PNG: ten real digits per class (left) beside ten teacher samples per class (right).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ..config import resolve_asset_path
from ..sampling import generate_teacher, seeded_latents
from .data import NUM_CLASSES, load_digits_images
from .metrics import class_accuracy, fd_digits

SHIPPED_TEACHER = "@assets/digits_teacher"


def nearest_neighbour_distances(samples: torch.Tensor, data: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """L2 distance (in [-1, 1] pixel units) from each sample to its nearest image of `data`."""
    distances = torch.cdist(samples.flatten(1).double(), data.flatten(1).double())
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values


def measure_teacher(teacher_path: str = SHIPPED_TEACHER, num: int = 1000, num_steps: int = 18) -> dict:
    """Metrics of `num` Heun samples (`2 * num_steps - 1` evaluations each) of an EDM digits teacher."""
    from ..denoisers.edm import load_edm_weights

    teacher = load_edm_weights(resolve_asset_path(teacher_path))
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    real, labels = load_digits_images(teacher.img_resolution)
    seeds = list(range(num))
    start = time.time()
    samples = generate_teacher(teacher, seeds, shape, label_dim=teacher.label_dim, num_steps=num_steps, batch_size=500)
    seconds = time.time() - start
    _, cond = seeded_latents(seeds, shape, teacher.label_dim)
    fd, fd_provenance = fd_digits(samples)
    accuracy, accuracy_provenance = class_accuracy(samples, cond) if teacher.label_dim == NUM_CLASSES else (None, {})
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    half = len(real) // 2
    sample_nn = nearest_neighbour_distances(samples.clamp(-1, 1), real)
    real_nn = nearest_neighbour_distances(real, real, exclude_self=True)
    return {
        "teacher": str(teacher_path), "num_samples": num, "seeds": f"0-{num - 1}", "sampler": "EDM Heun, deterministic",
        "num_steps": num_steps, "nfe": 2 * num_steps - 1, "sampling_seconds": round(seconds, 1),
        "fd_digits": fd, "class_accuracy": accuracy,
        "real_class_accuracy": class_accuracy(real, labels)[0],
        "real_half_vs_other_half_fd": fd_digits(real[order[:half]], real[order[half:]])[0],
        "real_subset_vs_all_fd": fd_digits(real[order[:num]])[0] if num <= len(real) else None,
        "nearest_training_digit_median": float(sample_nn.median()),
        "real_nearest_other_digit_median": float(real_nn.median()),
        "provenance": {"fd_digits": fd_provenance, "class_accuracy": accuracy_provenance},
    }


def _grid(images: torch.Tensor, scale: int = 4, gap: int = 2) -> np.ndarray:
    """A 10x10 grid (rows = classes) of `[100, 1, R, R]` images in [-1, 1], as uint8 with grey gaps."""
    res = images.shape[-1]
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(10, 10, res, res).numpy()
    cell = res * scale + gap
    out = np.full((10 * cell + gap, 10 * cell + gap), 128, np.uint8)
    for row in range(10):
        for col in range(10):
            top, left = gap + row * cell, gap + col * cell
            block = np.kron(pixels[row, col], np.ones((scale, scale), np.uint8))
            out[top:top + res * scale, left:left + res * scale] = block
    return out


def write_grid(out_path: str, teacher_path: str = SHIPPED_TEACHER, num_steps: int = 18) -> None:
    """PNG of ten real digits per class beside ten Heun samples per class (noise from one generator seeded 0)."""
    from PIL import Image

    from ..denoisers.edm import load_edm_weights
    from ..sampling import heun_sample

    teacher = load_edm_weights(resolve_asset_path(teacher_path))
    res = teacher.img_resolution
    cond = torch.nn.functional.one_hot(torch.arange(NUM_CLASSES).repeat_interleave(10), NUM_CLASSES).float()
    noise = torch.randn(100, 1, res, res, generator=torch.Generator().manual_seed(0))
    samples = heun_sample(teacher, noise, num_steps, cond)
    real, labels = load_digits_images(res)
    real = torch.cat([real[labels == c][:10] for c in range(NUM_CLASSES)])
    left, right = _grid(real), _grid(samples)
    Image.fromarray(np.concatenate([left, np.full((left.shape[0], 16), 255, np.uint8), right], axis=1)).save(out_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Measure an EDM digits teacher's Heun samples against the digits.")
    parser.add_argument("--teacher", default=SHIPPED_TEACHER, help="Folder of the teacher (save_edm_weights).")
    parser.add_argument("--num", type=int, default=1000, help="Samples, seeds 0..num-1 (0: measure nothing).")
    parser.add_argument("--steps", type=int, default=18, help="Heun steps (2*steps-1 network evaluations).")
    parser.add_argument("--grid", default=None, help="Also write a PNG of real digits beside teacher samples.")
    args = parser.parse_args(argv)
    if args.grid:
        write_grid(args.grid, args.teacher, args.steps)
    if args.num > 0:
        print(json.dumps(measure_teacher(args.teacher, args.num, args.steps), indent=1))


if __name__ == "__main__":
    main()

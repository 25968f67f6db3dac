"""Write sklearn's 1797 digits as an image .npz (EDM's `samples` uint8 [N, H, W, C] plus `labels`), the reference
that `onestep eval --ref` and `eval.ref` read for FID against the training images, and the real images of the GAN
term (`gan.data`; onestep ships `--grey` ones at 8 and 32 pixels as '@assets/digits_real/digits{8,32}.npz'):

    python -m onestep_cli.digits.images_npz --resolution 32 --out digits32.npz
    onestep eval digits32.npz --metrics fid --save-stats digits32-fid.npz   # cache the Inception statistics once
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .data import NATIVE_RESOLUTION, load_digits_images


def digits_uint8(resolution: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The digits at `resolution` as uint8 [1797, H, W, channels] (3: grey repeated, as images are stored; 1: grey)
    and labels [1797]."""
    images, labels = load_digits_images(resolution)
    grey = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(grey[..., None], channels, axis=-1), labels.numpy()


def write_digits_npz(path: Path, resolution: int, channels: int = 3) -> Path:
    images, labels = digits_uint8(resolution, channels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, samples=images, labels=labels)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write sklearn's digits as an image .npz for `onestep eval --ref`.")
    parser.add_argument("--resolution", type=int, default=NATIVE_RESOLUTION,
                        help=f"Pixels per side (bilinear upsampling from {NATIVE_RESOLUTION}, as the teachers saw).")
    parser.add_argument("--out", type=Path, required=True, help="The .npz to write.")
    parser.add_argument("--grey", action="store_true", help="One channel, as the digits teachers make them.")
    args = parser.parse_args(argv)
    path = write_digits_npz(args.out, args.resolution, 1 if args.grey else 3)
    print(f"Wrote {path}: 1797 digits at {args.resolution}x{args.resolution}.")


if __name__ == "__main__":
    main()

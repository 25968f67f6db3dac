"""Writing and reading samples: PNG files for images, one .npz for non-image data, a JSON record of provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SAMPLES_NPZ = "samples.npz"
SAMPLES_META = "samples.json"


def is_image_shape(shape) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [N, C, H, W] -> uint8 [N, H, W, C]."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_samples(samples: torch.Tensor, seeds: list[int], out_dir: Path, meta: dict) -> list[Path]:
    """Write samples under `out_dir` (PNG per seed for images, samples.npz otherwise) plus samples.json."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if is_image_shape(samples.shape[1:]):
        for seed, image in zip(seeds, to_uint8_images(samples)):
            path = out_dir / f"{seed:06d}.png"
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
            written.append(path)
    else:
        path = out_dir / SAMPLES_NPZ
        np.savez(path, samples=samples.cpu().numpy(), seeds=np.asarray(seeds, dtype=np.int64))
        written.append(path)
    (out_dir / SAMPLES_META).write_text(json.dumps({**meta, "num": len(seeds)}, indent=1, default=str))
    return written


def read_samples(path: Path) -> tuple[torch.Tensor, dict]:
    """Samples from an .npz file (key 'samples', or its only array) or a folder holding samples.npz; with the
    folder's samples.json metadata when present."""
    path = Path(path)
    npz = path / SAMPLES_NPZ if path.is_dir() else path
    if not npz.is_file():
        raise FileNotFoundError(f"{path} holds no samples: expected an .npz file or a folder with {SAMPLES_NPZ}.")
    try:
        data = np.load(npz)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise ValueError(f"{npz} could not be read as an .npz file ({exc}).") from None
    if "samples" in data.files:
        array = data["samples"]
    elif len(data.files) == 1:
        array = data[data.files[0]]
    else:
        raise ValueError(f"{npz} holds arrays {data.files}; name the samples array 'samples'.")
    meta_path = npz.parent / SAMPLES_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return torch.from_numpy(np.asarray(array, dtype=np.float32)), meta

"""Writing and reading samples: PNG files for images, one .npz for non-image data, a JSON record of provenance; and
the image sources metrics read from (a folder, an array from an .npz or memory, a generator run in memory).

Every image source yields the same thing, whatever it was made from: uint8 batches [B, H, W, 3] (grey replicated to
three channels), so a folder, an .npz and a generator of the same images give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import MissingFileError, OnestepError
from .jsonio import to_json

SAMPLES_NPZ = "samples.npz"
SAMPLES_META = "samples.json"
CLASS_LABELS = "class_labels"  # samples.json key: seed -> class index of class-conditional samples.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Largest image read, checked in the file's header before any pixel is decoded: 48 MiB as RGB, and a batch of them
# stays in memory; the metrics' networks see a few hundred pixels a side.
MAX_IMAGE_PIXELS = 4096 * 4096
WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Grey of 16 (or 32) bits: scaled to 8 bits on reading.


class SourceError(OnestepError, ValueError):
    """Images that cannot be read as a set: named file or array, what is wrong, what to do."""


def is_image_shape(shape) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [N, C, H, W] -> uint8 [N, H, W, C]."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_samples(samples: torch.Tensor, seeds: list[int], out_dir: Path, meta: dict,
                  labels: np.ndarray | None = None) -> list[Path]:
    """Write samples under `out_dir` (PNG per seed for images, samples.npz otherwise) plus samples.json, which
    also maps each seed to its class label when the samples are class-conditional (so metrics such as
    class_accuracy can read a folder)."""
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
    if labels is not None:
        meta = {**meta, CLASS_LABELS: {str(seed): int(label) for seed, label in zip(seeds, labels)}}
    (out_dir / SAMPLES_META).write_text(to_json({**meta, "num": len(seeds)}, indent=1))
    return written


def _load_npz(npz: Path):
    try:
        return np.load(npz, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise SourceError(f"{npz} could not be read as an .npz file ({exc}).") from None


def _samples_array(npz: Path, data) -> np.ndarray:
    if "samples" in data.files:
        return data["samples"]
    arrays = [name for name in data.files if name not in ("seeds", "prompts", "labels")]
    if len(arrays) == 1:
        return data[arrays[0]]
    raise SourceError(f"{npz} holds arrays {data.files}; name the samples array 'samples'.")


def read_samples(path: Path) -> tuple[torch.Tensor, dict]:
    """Samples from an .npz file (key 'samples', or its only array) or a folder holding samples.npz; with the
    folder's samples.json metadata when present."""
    path = Path(path)
    npz = path / SAMPLES_NPZ if path.is_dir() else path
    if not npz.is_file():
        raise MissingFileError(f"{path} holds no samples: expected an .npz file or a folder with {SAMPLES_NPZ}.")
    array = _samples_array(npz, _load_npz(npz))
    return torch.from_numpy(np.asarray(array, dtype=np.float32)), read_meta(npz.parent)


def read_meta(folder: Path) -> dict:
    """samples.json of a folder written by `onestep sample`, or {}."""
    meta_path = Path(folder) / SAMPLES_META
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def meta_summary(meta: dict, source: Path) -> dict:
    """A samples.json without its per-image lists (each image's file, prompt and seed; each seed's class), which run
    to megabytes for 50k images: a result that describes its source names the file that keeps them instead."""
    summary = {key: value for key, value in meta.items() if key not in ("images", "prompts", CLASS_LABELS)}
    if len(summary) < len(meta):
        summary["per_image_records"] = str((source if source.is_dir() else source.parent) / SAMPLES_META)
    return summary


def format_seeds(seeds) -> str | None:
    """Compact seed list: '0-49999' or '0-9,20,30-31'; None when there are none."""
    seeds = [int(s) for s in seeds] if seeds is not None else []
    if not seeds:
        return None
    parts, start, prev = [], seeds[0], seeds[0]
    for seed in seeds[1:] + [None]:
        if seed is not None and seed == prev + 1:
            prev = seed
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if seed is not None:
            start = prev = seed
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Image sources


def as_uint8_nhwc(images, name: str = "images") -> np.ndarray:
    """uint8 [N, H, W, 3] from uint8 NHWC/NCHW or [-1, 1] float NCHW (tensor or array); grey becomes three channels.
    Float tensors are checked and quantised on their own device, so a quarter of their bytes reach the host."""
    if isinstance(images, torch.Tensor):
        images = images.detach()
        images = images.cpu().numpy() if images.dtype == torch.uint8 else images
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise SourceError(f"{name}: expected images [N, H, W, C] or [N, C, H, W], got shape {images.shape}.")
        if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
            images = images.transpose(0, 2, 3, 1)
    else:
        array = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if not array.is_floating_point() or array.ndim != 4 or array.shape[1] not in (1, 3):
            raise SourceError(f"{name}: expected uint8 images or float images [N, C, H, W] in [-1, 1] with C = 1 or "
                              f"3, got {array.dtype} of shape {tuple(array.shape)}.")
        if not torch.isfinite(array).all():
            bad = int((~torch.isfinite(array.reshape(array.shape[0], -1))).any(dim=1).sum())
            raise SourceError(f"{name}: {bad} of {array.shape[0]} images contain NaN or inf; metrics would be "
                              "meaningless.")
        images = to_uint8_images(array.float())
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise SourceError(f"{name}: images have {images.shape[-1]} channels; expected 1 (grey) or 3 (RGB).")
    return np.ascontiguousarray(images)


@dataclass
class ImageSource:
    """A fixed, ordered set of images read batch by batch as uint8 [B, H, W, 3]."""

    description: str
    num: int
    resolution: tuple[int, int]  # (height, width)
    names: list[str] | None = None  # Per-image names (file names) for pairing with prompts; None: by index.
    seeds: list[int] | None = None  # Per-image seeds when known.
    meta: dict = field(default_factory=dict)
    _read: Callable[[int, int], np.ndarray] | None = None  # (start, stop) -> uint8 [stop - start, H, W, 3].
    _labels: Callable[[int, int], np.ndarray] | None = None  # (start, stop) -> class indices; None: unknown.

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    def labels(self, start: int, stop: int) -> np.ndarray:
        """Class indices of images start..stop-1 (class-conditional generators, .npz files with 'labels')."""
        if self._labels is None:
            raise SourceError(f"{self.description} has no class labels: they come from a class-conditional "
                              "generator or an .npz with a 'labels' array.")
        return self._labels(start, stop)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start index, uint8 [B, H, W, 3]) in order, over images start..stop-1 (all by default)."""
        stop = self.num if stop is None else stop
        for begin in range(start, stop, batch_size):
            yield begin, self._read(begin, min(begin + batch_size, stop))

    def head(self, num: int) -> "ImageSource":
        """The first `num` images."""
        if num > self.num:
            raise SourceError(f"--num {num} asks for more images than {self.description} holds ({self.num}).")
        return ImageSource(self.description, num, self.resolution, self.names[:num] if self.names else None,
                           self.seeds[:num] if self.seeds else None, self.meta, self._read, self._labels)

    def provenance(self) -> dict:
        out = {"images": self.description, "num_images": self.num,
               "image_size": f"{self.resolution[0]}x{self.resolution[1]}"}
        out["seeds"] = format_seeds(self.seeds) if self.seeds else "not recorded"
        return out


def class_indices(labels, num: int, description: str) -> np.ndarray:
    """Class indices [N] from indices or one-hot rows."""
    labels = np.asarray(labels)
    labels = labels.argmax(axis=1) if labels.ndim == 2 else labels
    if labels.shape != (num,):
        raise SourceError(f"{description}: {num} images but labels of shape {labels.shape}; give one class index "
                          "(or one-hot row) per image.")
    return labels.astype(np.int64)


def array_source(images, description: str, seeds: list[int] | None = None, meta: dict | None = None,
                 labels=None) -> ImageSource:
    """Images held in memory (uint8 or [-1, 1] float, NCHW or NHWC), with optional class labels."""
    array = as_uint8_nhwc(images, description)
    if array.shape[0] == 0:
        raise SourceError(f"{description} holds no images.")
    indices = class_indices(labels, array.shape[0], description) if labels is not None else None
    return ImageSource(description, array.shape[0], (array.shape[1], array.shape[2]), None,
                       list(seeds) if seeds is not None else None, meta or {},
                       lambda start, stop: array[start:stop],
                       (lambda start, stop: indices[start:stop]) if indices is not None else None)


def npz_image_source(path: Path) -> ImageSource:
    """Images in an .npz: EDM-style 'samples' uint8 [N, H, W, C] or our [-1, 1] float [N, C, H, W]; optional 'seeds'.
    Float images in another range ([0, 1], [0, 255]) are refused rather than clipped."""
    path = Path(path)
    data = _load_npz(path)
    array = _samples_array(path, data)
    if np.issubdtype(array.dtype, np.floating) and array.size:
        _check_float_range(array, path)
    seeds = data["seeds"].tolist() if "seeds" in data.files else None
    labels = data["labels"] if "labels" in data.files else None
    looks_like_images = array.ndim == 4 and (array.shape[1] in (1, 3) or array.shape[-1] in (1, 3))
    if not looks_like_images:
        raise SourceError(f"{path} holds samples of shape {array.shape[1:]}, not images ([N, H, W, C] uint8 or "
                          "[N, C, H, W] float).")
    meta = read_meta(path.parent) if path.name == SAMPLES_NPZ else {}
    return array_source(array, str(path), seeds, meta, labels)


def _check_float_range(array: np.ndarray, path: Path) -> None:
    """Float images are read as [-1, 1]; refuse those whose values say they are in another range (values a little
    outside [-1, 1], as a generator's raw output has, are clipped)."""
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        return  # as_uint8_nhwc counts the images holding NaN or inf.
    if low >= 0:
        scale = "[0, 1]" if high <= 1 else "[0, 255]" if high <= 255 else f"[0, {high:g}]"
        raise SourceError(f"{path} holds float images with values from {low:g} to {high:g}, none below 0: they look "
                          f"like {scale} images, and onestep reads float images as [-1, 1]. Store them rescaled to "
                          "[-1, 1] (x * 2 - 1 for [0, 1]), or as uint8 [0, 255].")
    if low < -2 or high > 2:
        raise SourceError(f"{path} holds float images with values from {low:g} to {high:g}, far outside the [-1, 1] "
                          "onestep reads float images in (clipping would flatten them). Store them rescaled to "
                          "[-1, 1], or as uint8 [0, 255].")


def list_image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by their path relative to it."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def image_header(path: Path) -> tuple[int, int, str]:
    """(width, height, pixel mode) of an image file, read from its header without decoding a pixel; an error for
    images larger than MAX_IMAGE_PIXELS and for float pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # The size check below says it.
            with Image.open(path) as image:
                (width, height), mode = image.size, image.mode
    except Image.DecompressionBombError:
        raise SourceError(f"Image {path} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels (a decompression "
                          "bomb, or an image far too large to evaluate); remove it or resize it.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(f"Image {path} is corrupt or unreadable ({exc}); remove or replace it.") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise SourceError(f"Image {path} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} (4096x4096) "
                          "onestep reads; the metrics' networks see a few hundred pixels a side, so resize the images "
                          "first.")
    if mode == "F":
        raise SourceError(f"Image {path} holds floating-point pixels (mode F), whose range onestep cannot know; save "
                          "it as an 8- or 16-bit image.")
    return width, height, mode


def _open_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] of an image file; 16-bit grey is scaled to 8 bits (v * 255 / 65535, rounded), where a plain
    conversion would clip every value above 255 to white."""
    from PIL import Image, UnidentifiedImageError

    image_header(path)
    try:
        with Image.open(path) as image:
            if image.mode not in WIDE_INTEGER_MODES:
                return np.asarray(image.convert("RGB"))
            grey = np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(f"Image {path} is corrupt or unreadable ({exc}); remove or replace it.") from None
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise SourceError(f"Image {path} holds grey values from {grey.min()} to {grey.max()}, outside the 16-bit "
                          "range onestep reads; save it as an 8- or 16-bit image.")
    return np.repeat(np.round(grey * (255 / 65535)).astype(np.uint8)[..., None], 3, axis=-1)


def folder_source(folder: Path) -> ImageSource:
    """Every image file under `folder`, in sorted file-name order; all must have the same size."""
    folder = Path(folder)
    meta = read_meta(folder)
    files = list_image_files(folder)
    written = recorded_images(meta)
    if written:  # A folder of `onestep sample --prompts`: its samples, not its grid.png.
        files = [p for p in files if p.relative_to(folder).as_posix() in written]
    if not files:
        raise SourceError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); pass a folder of images, "
                          "an .npz, a run directory or a checkpoint.")
    sizes: dict[tuple[int, int], Path] = {}
    for path in files:  # Headers only: cheap, and mixed or huge sizes are caught before any pixel is decoded.
        width, height, _ = image_header(path)
        sizes.setdefault((height, width), path)
        if len(sizes) > 1:
            (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
            raise SourceError(f"{folder} mixes image sizes: {file_a.name} is {size_a[1]}x{size_a[0]} but "
                              f"{file_b.name} is {size_b[1]}x{size_b[0]} (width x height). Metrics compare sets of "
                              "one resolution; resize them first or split the folder.")
    resolution = next(iter(sizes))

    def read(start: int, stop: int) -> np.ndarray:
        return np.stack([_open_image(p) for p in files[start:stop]])

    names = [p.relative_to(folder).as_posix() for p in files]
    seeds = _seeds_from_names(names, meta)
    return ImageSource(str(folder), len(files), resolution, names, seeds, meta, read,
                       _labels_from_meta(folder, seeds, meta))


def _labels_from_meta(folder: Path, seeds: list[int] | None, meta: dict):
    """Class labels of a folder written by `onestep sample` from a class-conditional model (seed -> label in
    samples.json), as an ImageSource label reader; None when the folder records none."""
    recorded = meta.get(CLASS_LABELS)
    if not recorded or seeds is None:
        return None
    missing = [seed for seed in seeds if str(seed) not in recorded]
    if missing:
        raise SourceError(f"{folder / SAMPLES_META} records no class label for seed {missing[0]} "
                          f"({len(missing)} images without one); rewrite the folder with `onestep sample`.")
    indices = np.asarray([recorded[str(seed)] for seed in seeds], dtype=np.int64)
    return lambda start, stop: indices[start:stop]


def _seeds_from_names(names: list[str], meta: dict) -> list[int] | None:
    """Seeds of a folder written by `onestep sample` (files named by seed, NNNNNN.png)."""
    if not meta:
        return None
    try:
        return [int(Path(name).stem) for name in names]
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Prompts of text-to-image samples


def recorded_images(meta: dict) -> dict[str, dict]:
    """File name -> record ({"file", "prompt", "seed"}) of each image a samples.json lists (`onestep sample --prompts`
    writes the list); {} when it lists none."""
    return {entry["file"]: entry for entry in meta.get("images", []) if isinstance(entry, dict) and "file" in entry}


def recorded_prompts(source: ImageSource) -> list[str] | None:
    """The prompt of each image of a folder written by `onestep sample --prompts` (its samples.json), in the
    source's file order; None when the folder records none."""
    records = recorded_images(source.meta)
    prompts = [records.get(name, {}).get("prompt") for name in source.names or []]
    return prompts if prompts and None not in prompts else None


def pair_prompts(source: ImageSource, prompts: list[str], prompts_path: str | None = None) -> dict:
    """Check one prompt per image and describe the pairing (rule, count, first pair, hash of all pairs)."""
    if len(prompts) != source.num:
        raise SourceError(f"{prompts_path or 'The prompts'} holds {len(prompts)} prompts but {source.description} "
                          f"has {source.num} images; give exactly one prompt per image "
                          f"({'in sorted file-name order' if source.names else 'in generation order'}).")
    keys = source.names if source.names else [str(s) for s in (source.seeds or range(source.num))]
    digest = hashlib.sha256()
    for key, prompt in zip(keys, prompts):
        digest.update(f"{key}\t{prompt}\n".encode())
    return {"prompts": prompts_path, "num_prompts": len(prompts),
            "pairing": "line i <-> i-th image in sorted file-name order" if source.names
            else "line i <-> i-th image (generation / array order)",
            "first_pair": [keys[0], prompts[0]], "pairs_sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------------------------------
# Text-to-image sample folders


def image_grid(images: torch.Tensor, columns: int, padding: int = 2):
    """uint8 [H', W', 3] array tiling `images` ([-1, 1], [N, 3, H, W]) row by row, `columns` per row."""
    tiles = to_uint8_images(images)
    count, height, width, channels = tiles.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255,
                   dtype=np.uint8)
    for n, tile in enumerate(tiles):
        top, left = padding + (n // columns) * (height + padding), padding + (n % columns) * (width + padding)
        grid[top:top + height, left:left + width] = tile
    return grid


def write_prompt_samples(images: torch.Tensor, prompts: list[str], seeds: list[int], out_dir, meta: dict) -> list:
    """PNG per (prompt, seed) as `p{prompt index:04d}-s{seed:06d}.png`, `grid.png` (a row per prompt, a column per
    seed) and `samples.json` (with each file's prompt and seed)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, written = [], []
    for n, image in enumerate(to_uint8_images(images)):
        index, seed = divmod(n, len(seeds))
        name = f"p{index:04d}-s{seeds[seed]:06d}.png"
        Image.fromarray(image).save(out_dir / name)
        records.append({"file": name, "prompt": prompts[index], "seed": seeds[seed]})
        written.append(out_dir / name)
    Image.fromarray(image_grid(images, columns=len(seeds))).save(out_dir / "grid.png")
    (out_dir / SAMPLES_META).write_text(to_json({**meta, "num": len(records), "prompts": prompts,
                                                 "images": records}, indent=1))
    return written

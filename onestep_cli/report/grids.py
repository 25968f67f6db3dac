"""Side-by-side samples: every image generator of a comparison on the same per-sample seeds, with its own steps.

A model's grid is what `onestep sample --seeds` draws for those seeds (class-conditional generators get the labels
the seeds imply), tiled by `image_grid` with a column per seed. Text-to-image runs get a row per prompt for the first
prompts of their cached training prompts (RUN/prompts.safetensors), as `onestep sample --prompts` tiles them. Eval
results and generators of non-image data (the analytic gmm presets) are skipped, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .comparison import Comparison
from .sources import ReportError, Source

GRID_SEEDS = list(range(16))
GRID_PROMPTS = 2  # Text-to-image runs: rows for this many of the first cached training prompts.
GRID_BATCH = 1024  # Samples per forward pass: `onestep sample`'s default, so the images are bitwise its own.
LABEL_HEIGHT = 16  # Pixels of the band above each model's rows in the combined grid, holding its label.
LABEL_FONT_SIZE = 12
COMBINED = "grid.png"


class GridSkip(Exception):
    """A source with no images to show; the message says why, as a sentence."""


@dataclass(frozen=True)
class Grids:
    """The image generators of a comparison on the same seeds, and why the other sources have no grid."""

    seeds: list[int]
    panels: dict[str, np.ndarray]  # Label -> uint8 [H, W, 3]: a column per seed, a row (per prompt).
    prompts: dict[str, list[str]]  # Label -> the prompt of each row, for text-to-image generators.
    skipped: dict[str, str]  # Label -> why it has no grid.


@dataclass(frozen=True)
class GridFiles:
    combined: Path | None  # A row of models, each under its label; None when no source makes images.
    models: dict[str, Path]  # Label -> its own grid.


def model_images(source: Source, seeds: list[int], num_prompts: int = GRID_PROMPTS, device="cpu",
                 batch_size: int = GRID_BATCH) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] [rows * len(seeds), C, H, W] of `source`'s generator on `seeds` (row-major, a row per prompt
    for text-to-image generators, else one row) and the prompts of the rows; raise GridSkip when it makes none."""
    from ..errors import OnestepError
    from ..runs.loading import load_generator_source
    from ..sample_io import is_image_shape
    from ..sampling import generate

    if source.kind == "eval":
        raise GridSkip("it is an eval result: numbers, not a generator.")
    try:
        loaded = load_generator_source(source.path, device=device)
    except (OnestepError, FileNotFoundError) as error:  # Whatever keeps this run's generator from loading.
        raise GridSkip(f"its generator cannot be loaded: {error}") from None
    device = next(loaded.generator.parameters()).device
    if loaded.pipeline is not None:
        prompts = _cached_prompts(source, num_prompts)
        return _text_to_image(loaded, prompts, seeds, device, batch_size), prompts
    if not is_image_shape(loaded.data_shape):
        raise GridSkip(f"its generator makes samples of shape {tuple(loaded.data_shape)}, not images.")
    return generate(loaded.generator, seeds, loaded.data_shape, loaded.label_dim, batch_size, device), []


def sample_grids(comparison: Comparison, seeds: list[int] = GRID_SEEDS, num_prompts: int = GRID_PROMPTS,
                 device="cpu", batch_size: int = GRID_BATCH, log: Callable[[str], None] | None = None) -> Grids:
    """Each source's grid on `seeds`, in the comparison's order; `log` hears of every source skipped."""
    from ..sample_io import image_grid

    seeds = list(seeds)
    if not seeds:
        raise ReportError("The grids need at least one seed; pass e.g. --grid-seeds 0-15.")
    if num_prompts < 1:
        raise ReportError(f"num_prompts is {num_prompts}; text-to-image grids need at least one prompt per model.")
    panels, prompts, skipped = {}, {}, {}
    for source in comparison.sources:
        try:
            images, rows = model_images(source, seeds, num_prompts, device, batch_size)
        except GridSkip as reason:
            skipped[source.label] = str(reason)
            if log:
                log(f"No grid for {source.label}: {reason}")
            continue
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # Grey shown as grey RGB.
        panels[source.label] = image_grid(rgb, columns=len(seeds))
        if rows:
            prompts[source.label] = rows
    return Grids(seeds, panels, prompts, skipped)


def combined_grid(grids: Grids) -> np.ndarray:
    """uint8 [H, W, 3]: every model's grid under a band naming it, one model below the other, on white."""
    from PIL import Image, ImageDraw, ImageFont

    if not grids.panels:
        raise ReportError("No source of the comparison makes images, so there is no grid to combine.")
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = {label: _drawable(label, font) for label in grids.panels}
    width = max(max(panel.shape[1] for panel in grids.panels.values()),
                *(int(measure.textlength(text, font=font)) + 4 for text in labels.values()))
    height = sum(LABEL_HEIGHT + panel.shape[0] for panel in grids.panels.values())
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for label, panel in grids.panels.items():
        draw.text((2, top + 1), labels[label], fill="black", font=font)
        canvas.paste(Image.fromarray(panel), (0, top + LABEL_HEIGHT))
        top += LABEL_HEIGHT + panel.shape[0]
    return np.asarray(canvas)


def write_grids(grids: Grids, out_dir: str | Path) -> GridFiles:
    """COMBINED and one PNG per model (named after its label) into out_dir; nothing when no source makes images."""
    from PIL import Image

    if not grids.panels:
        return GridFiles(None, {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken = {COMBINED}
    models = {}
    for label, panel in grids.panels.items():
        models[label] = out_dir / _unique_name(label, taken)
        Image.fromarray(panel).save(models[label])
    combined = out_dir / COMBINED
    Image.fromarray(combined_grid(grids)).save(combined)
    return GridFiles(combined, models)


def _cached_prompts(source: Source, num_prompts: int) -> list[str]:
    from ..denoisers.diffusers import PromptFileError, load_prompt_cache
    from ..denoisers.diffusers.training import PROMPT_CACHE

    run_dir = source.path if source.kind == "run" else source.path.parent.parent
    cache = run_dir / PROMPT_CACHE
    if not cache.is_file():
        raise GridSkip(f"it is a text-to-image run without its prompt cache {cache}, whose prompts the grid draws.")
    try:
        return load_prompt_cache(cache).prompts[:num_prompts]
    except PromptFileError as error:
        raise GridSkip(str(error)) from None


def _text_to_image(loaded, prompts: list[str], seeds: list[int], device, batch_size: int) -> torch.Tensor:
    from ..sampling import generate_text_to_image

    loaded.pipeline.pipeline.vae.to(device)
    return generate_text_to_image(loaded.generator, loaded.pipeline, prompts, seeds, loaded.data_shape, batch_size,
                                  device)


def _drawable(text: str, font) -> str:
    """`text` as the font can draw it: the bitmap fallback font (Pillow without FreeType) knows Latin-1 only."""
    from PIL import ImageFont

    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def _unique_name(label: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    name, number = f"{stem}.png", 2
    while name in taken:
        name, number = f"{stem}-{number}.png", number + 1
    taken.add(name)
    return name

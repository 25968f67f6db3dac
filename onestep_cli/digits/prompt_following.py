"""Prompt following of digits text-to-image samples: does each image show the digit, weight and slant its prompt asks?

Each prompt is read with `captions.parse_prompt`; each image (grey = mean over channels, 32x32, in [-1, 1]) is judged
by the shipped 32x32 digits classifier and measured with `captions.ink_mass` and `captions.slant`:

- `prompt_accuracy`: the fraction of images the classifier assigns to the digit their prompt names;
- `weight_agreement`: among prompts asking `thin` or `bold`, the fraction of images whose ink mass lies below (thin)
  or above (bold) the median ink mass of the real images of the digit the prompt names (not the digit the classifier
  sees, so a wrong digit is not excused);
- `slant_agreement`: likewise among prompts asking `slanted left` (slant below the class median) or `slanted right`
  (above it).

Prompts asking `regular` or `upright`, or not stating the attribute, are not counted for it. The medians are those of
the 1797 real digits at 32x32, the images whose terciles the captions were written from; a generator that ignores an
attribute but draws each digit like the real ones agrees about half the time (a value equal to the median agrees with
neither side).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .captions import ATTRIBUTE_RESOLUTION, DigitPrompt, PromptGrammarError, ink_mass, parse_prompt, slant
from .classifier import DigitsClassifier, load_classifier
from .data import NUM_CLASSES, NUM_DIGITS, load_digits_images
from .metrics import classifier_info, classifier_predictions, prepare

RESOLUTION = 32  # The digits text-to-image teachers' resolution, and the judge's.
SHIPPED_CLASSIFIER32 = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier32"
# Which side of the class median each extreme level asks for: -1 below, +1 above.
WEIGHT_SIDE = {"thin": -1, "bold": 1}
SLANT_SIDE = {"slanted left": -1, "slanted right": 1}


@functools.lru_cache(maxsize=1)
def shipped_classifier32() -> DigitsClassifier:
    """The shipped 32x32 digits classifier (onestep_cli/assets/digits_classifier32), frozen, on the CPU."""
    return load_classifier(SHIPPED_CLASSIFIER32)


@functools.lru_cache(maxsize=1)
def classifier32_info() -> dict:
    """Provenance of the shipped 32x32 classifier: its name, weights' SHA-256 and held-out accuracy."""
    return classifier_info(SHIPPED_CLASSIFIER32,
                           "onestep digits classifier 32x32 (onestep_cli/assets/digits_classifier32)")


@functools.lru_cache(maxsize=1)
def attribute_medians() -> dict[str, torch.Tensor]:
    """Per-class medians `[10]` of ink mass and slant over the real digits at 32x32."""
    images, labels = load_digits_images(ATTRIBUTE_RESOLUTION)
    return {name: torch.stack([torch.quantile(values[labels == c], 0.5) for c in range(NUM_CLASSES)])
            for name, values in (("ink", ink_mass(images)), ("slant", slant(images)))}


def parse_prompts(prompts: list[str]) -> list[DigitPrompt]:
    """Every prompt parsed; the first one the grammar cannot read is an error naming the image it belongs to."""
    parsed = []
    for index, text in enumerate(prompts):
        try:
            parsed.append(parse_prompt(text))
        except PromptGrammarError as exc:
            raise PromptGrammarError(f"image {index}: {exc}") from exc
    return parsed


@dataclass(frozen=True)
class PromptChecks:
    """Per image: the digit asked and the one the classifier sees; per attribute, whether the prompt asks an extreme
    level (thin/bold, slanted left/right) and whether the image lies on that side of the class median."""

    asked_digit: torch.Tensor      # int64 [N]
    predicted_digit: torch.Tensor  # int64 [N]
    weight_asked: torch.Tensor     # bool [N]
    weight_agrees: torch.Tensor    # bool [N]; False where not asked.
    slant_asked: torch.Tensor      # bool [N]
    slant_agrees: torch.Tensor     # bool [N]; False where not asked.

    def as_columns(self) -> np.ndarray:
        """`[N, 6]` float columns in field order (the per-image features of the metrics registry)."""
        return torch.stack([getattr(self, field.name).double() for field in fields(self)], 1).numpy()

    @classmethod
    def from_columns(cls, columns: np.ndarray) -> PromptChecks:
        """The checks `as_columns` wrote (gathered from every batch and process)."""
        values = torch.as_tensor(np.asarray(columns, np.float64)).round().long()
        kinds = (torch.int64, torch.int64, torch.bool, torch.bool, torch.bool, torch.bool)
        return cls(*(values[:, i].to(kind) for i, kind in enumerate(kinds)))


def _grey32(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"prompt_accuracy measures images [N, 1 or 3, H, W], got shape {list(images.shape)}.")
    if images.shape[-2:] != (RESOLUTION, RESOLUTION):
        # No resizing: a resized digit's ink mass and strokes are not those the captions and classifier know.
        raise InputError(f"prompt_accuracy judges {RESOLUTION}x{RESOLUTION} digits (its classifier's and the digits "
                         f"text-to-image teachers' resolution), got {images.shape[-2]}x{images.shape[-1]}; generate "
                         f"or write the samples at {RESOLUTION}x{RESOLUTION}.")
    grey, _ = prepare(images.detach().float().mean(dim=1, keepdim=True), RESOLUTION)
    return grey


def _on_asked_side(values: torch.Tensor, medians: torch.Tensor, digits: torch.Tensor,
                   levels: list[str | None], sides: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    side = torch.tensor([sides.get(level, 0) for level in levels])  # 0: not asked, so never agrees.
    return side != 0, torch.sign(values - medians[digits]) * side > 0


def check_prompts(images: torch.Tensor, prompts: list[DigitPrompt]) -> PromptChecks:
    """The checks of `images` (`[N, 1 or 3, 32, 32]` in [-1, 1]) against their parsed `prompts`, one per image."""
    grey = _grey32(images)
    if len(prompts) != grey.shape[0]:
        raise InputError(f"prompt_accuracy needs one prompt per image: {grey.shape[0]} images, {len(prompts)} "
                         "prompts.")
    asked = torch.tensor([p.digit for p in prompts], dtype=torch.int64)
    medians = attribute_medians()
    weight_asked, weight_agrees = _on_asked_side(ink_mass(grey), medians["ink"], asked,
                                                 [p.weight for p in prompts], WEIGHT_SIDE)
    slant_asked, slant_agrees = _on_asked_side(slant(grey), medians["slant"], asked,
                                               [p.slant for p in prompts], SLANT_SIDE)
    return PromptChecks(asked, classifier_predictions(grey, shipped_classifier32()).long(), weight_asked,
                        weight_agrees, slant_asked, slant_agrees)


def _fraction(agrees: torch.Tensor, counted: torch.Tensor) -> float | None:
    return float(agrees[counted].float().mean()) if counted.any() else None


def summarise(checks: PromptChecks) -> tuple[float, dict]:
    """`prompt_accuracy` and its provenance: weight and slant agreement with the counts behind each fraction."""
    correct = checks.predicted_digit == checks.asked_digit
    per_digit = {int(d): round(float(correct[checks.asked_digit == d].float().mean()), 4)
                 for d in checks.asked_digit.unique()}
    return float(correct.float().mean()), {
        **classifier32_info(), "num_images": int(correct.numel()), "num_correct": int(correct.sum()),
        "per_digit_accuracy": per_digit,
        "weight_agreement": _fraction(checks.weight_agrees, checks.weight_asked),
        "weight_counted": int(checks.weight_asked.sum()),
        "slant_agreement": _fraction(checks.slant_agrees, checks.slant_asked),
        "slant_counted": int(checks.slant_asked.sum()),
        "attribute_rule": "thin/bold: ink mass below/above the asked digit's median; slanted left/right: slant "
                          "below/above it; regular, upright and unstated attributes not counted",
        "attribute_medians": f"per-class medians over the {NUM_DIGITS} real digits at {ATTRIBUTE_RESOLUTION}x"
                             f"{ATTRIBUTE_RESOLUTION} (sklearn load_digits, bilinear)",
        "preprocessing": "grey = mean over channels, clamped to [-1, 1]"}


def prompt_accuracy(images: torch.Tensor, prompts: list[str]) -> tuple[float, dict]:
    """Fraction of `images` (`[N, 1 or 3, 32, 32]` in [-1, 1]) showing the digit their prompt names, with weight and
    slant agreement in the provenance (definitions in the module docstring)."""
    return summarise(check_prompts(images, parse_prompts(prompts)))


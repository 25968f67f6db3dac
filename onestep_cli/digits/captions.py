"""Captions for the digits: a small grammar of the digit and two attributes measured from each image.

The attributes are relative to the other images of the same digit (a "bold one" has more ink than most ones):

- stroke weight, from the ink mass (mean intensity in [0, 1]): `thin` below the class's lower tercile, `bold` above
  its upper tercile, `regular` between;
- slant, from the image's second moments (the shear -mu11 / mu02, positive when the top leans right): `slanted left`
  below the lower tercile, `slanted right` above the upper one, `upright` between.

The terciles are those of the 1797 real digits at 32x32, so a caption says what a reader sees when comparing digits
of one kind. Training captions come from `TRAIN_TEMPLATES`; `HELDOUT_TEMPLATES` are phrasings no teacher was trained on,
for measuring prompt following. `parse_prompt` reads any phrasing by its words: a digit (numeral `7` or word `seven`),
optionally `thin`/`light`/`bold`/`thick`/`heavy`/`regular` and `left`/`right`/`upright`/`straight` for the slant, so
plain prompts such as `the digit 7` and `a handwritten seven` work as well as the trained ones.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ..errors import OnestepError
from .data import NUM_CLASSES, load_digits_images

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS = ("thin", "regular", "bold")
SLANTS = ("slanted left", "upright", "slanted right")
ATTRIBUTE_RESOLUTION = 32  # Terciles are measured on the real digits at this resolution (the t2i teachers').

# {d}: the digit as numeral or word; {w}: weight word; {s}: slant phrase. A template without {w} or {s} leaves that
# attribute unsaid.
TRAIN_TEMPLATES = (
    "the digit {d}", "a handwritten {d}", "a {w} handwritten {d}", "a handwritten {d}, {s}", "a {w} {d}, {s}",
    "the digit {d} in {w} strokes", "the digit {d}, {s}", "a {w} digit {d}, {s}",
    # The digit at other places and after other words, so a text encoder learns to find it anywhere.
    "{d}", "digit {d}", "a drawing of the digit {d}", "a scan of a {w} handwritten {d}", "the number {d}, {s}",
    "a {d} written by hand in {w} strokes", "{s}, a {w} {d}", "a photo of a handwritten {d} that looks {s}",
)
HELDOUT_TEMPLATES = (
    "a picture of the number {d}", "number {d} written in {w} strokes", "an image of a {d} that is {s}",
    "a {w}, {s} number {d}",
)

WEIGHT_WORDS = {"thin": "thin", "light": "thin", "bold": "bold", "thick": "bold", "heavy": "bold",
                "regular": "regular"}
_DIGIT = re.compile(r"(?<![\w.])(\d)(?!\w|\.\d)|\b(" + "|".join(DIGIT_WORDS) + r")\b")
_WEIGHT = re.compile(r"\b(" + "|".join(WEIGHT_WORDS) + r")\b")
_SLANT = re.compile(r"\b(left|right|upright|straight)\b")


@dataclass(frozen=True)
class DigitPrompt:
    """What a caption asks for: the digit, and the weight and slant where it says them (else None)."""

    digit: int
    weight: str | None = None  # One of WEIGHTS.
    slant: str | None = None   # One of SLANTS.


class PromptGrammarError(OnestepError, ValueError):
    """A prompt that names no digit, or more than one; the message quotes it and shows a form that works."""


def parse_prompt(text: str) -> DigitPrompt:
    """The digit and attributes a prompt asks for, read from its words (case-insensitive)."""
    lowered = text.lower()
    digits = {int(numeral) if numeral else DIGIT_WORDS.index(word) for numeral, word in _DIGIT.findall(lowered)}
    if len(digits) != 1:
        found = "no digit" if not digits else f"several digits {sorted(digits)}"
        raise PromptGrammarError(f"prompt {text!r} names {found}; a digits prompt names exactly one, as a numeral or a "
                                 "word, e.g. 'the digit 7' or 'a bold handwritten seven, slanted left'.")
    weights = {WEIGHT_WORDS[word] for word in _WEIGHT.findall(lowered)}
    slants = {_slant_of(word) for word in _SLANT.findall(lowered)}
    if len(weights) > 1 or len(slants) > 1:
        raise PromptGrammarError(f"prompt {text!r} asks for contradictory attributes "
                                 f"{sorted(weights | slants)}; give at most one weight and one slant.")
    return DigitPrompt(digits.pop(), next(iter(weights), None), next(iter(slants), None))


def _slant_of(word: str) -> str:
    return {"left": "slanted left", "right": "slanted right"}.get(word, "upright")


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Mean intensity in [0, 1] of grey `[N, 1, H, W]` (or RGB, averaged) images in [-1, 1]: `[N]`."""
    return _grey(images).mean(dim=(1, 2))


def slant(images: torch.Tensor) -> torch.Tensor:
    """The shear -mu11 / mu02 of each image's intensity (x right, y down): positive when the top leans right. `[N]`."""
    grey = _grey(images)
    height, width = grey.shape[-2:]
    ys = torch.arange(height, dtype=grey.dtype).view(1, height, 1)
    xs = torch.arange(width, dtype=grey.dtype).view(1, 1, width)
    mass = grey.sum(dim=(1, 2)).clamp_min(1e-8)
    cy = (grey * ys).sum(dim=(1, 2)) / mass
    cx = (grey * xs).sum(dim=(1, 2)) / mass
    dy, dx = ys - cy.view(-1, 1, 1), xs - cx.view(-1, 1, 1)
    mu11 = (grey * dx * dy).sum(dim=(1, 2)) / mass
    mu02 = (grey * dy * dy).sum(dim=(1, 2)).clamp_min(1e-8) / mass
    return -mu11 / mu02


def _grey(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"digit attributes are measured on [N, 1 or 3, H, W] images, got shape {list(images.shape)}.")
    return ((images.detach().to("cpu", torch.float32).mean(dim=1) + 1) / 2).clamp(0, 1)


@functools.lru_cache(maxsize=1)
def attribute_terciles() -> dict[str, torch.Tensor]:
    """Per-class lower and upper terciles `[10, 2]` of ink mass and slant over the real digits at 32x32."""
    images, labels = load_digits_images(ATTRIBUTE_RESOLUTION)
    quantiles = torch.tensor([1 / 3, 2 / 3])
    return {name: torch.stack([torch.quantile(values[labels == c], quantiles) for c in range(NUM_CLASSES)])
            for name, values in (("ink", ink_mass(images)), ("slant", slant(images)))}


def _level(values: torch.Tensor, digits: torch.Tensor, terciles: torch.Tensor) -> torch.Tensor:
    bounds = terciles[digits]
    return (values > bounds[:, 0]).long() + (values > bounds[:, 1]).long()


def describe(images: torch.Tensor, digits: torch.Tensor) -> list[DigitPrompt]:
    """The full description (digit, weight, slant) of each image of the given digits, measured as documented above."""
    digits = torch.as_tensor(digits).long().cpu()
    terciles = attribute_terciles()
    weights = _level(ink_mass(images), digits, terciles["ink"])
    slants = _level(slant(images), digits, terciles["slant"])
    return [DigitPrompt(int(d), WEIGHTS[w], SLANTS[s]) for d, w, s in zip(digits, weights, slants)]


def caption(prompt: DigitPrompt, template: str, use_word: bool) -> str:
    """`template` filled with the digit (as a word or numeral) and the prompt's attributes."""
    digit = DIGIT_WORDS[prompt.digit] if use_word else str(prompt.digit)
    return template.format(d=digit, w=prompt.weight or "regular", s=prompt.slant or "upright")


def random_caption(prompt: DigitPrompt, generator: torch.Generator, templates=TRAIN_TEMPLATES) -> str:
    """One caption of `prompt` in a template and digit form drawn with `generator` (training-time augmentation)."""
    index = int(torch.randint(len(templates), (1,), generator=generator))
    use_word = bool(torch.randint(2, (1,), generator=generator))
    return caption(prompt, templates[index], use_word)


def prompt_list(templates=TRAIN_TEMPLATES) -> list[str]:
    """Every caption of every digit, weight and slant in `templates`, numerals and words (deduplicated, in order)."""
    prompts = [caption(DigitPrompt(d, w, s), template, use_word)
               for template in templates for use_word in (False, True) for d in range(NUM_CLASSES)
               for w in WEIGHTS for s in SLANTS]
    return list(dict.fromkeys(prompts))

"""The digits caption grammar: prompts any user would type parse, captions of measured images read back as written,
contradictions and digit-less prompts are refused by name, and the shipped prompt files are the grammar's."""

import pytest
import torch

from onestep_cli.config import resolve_asset_path
from onestep_cli.digits import captions
from onestep_cli.digits.captions import DigitPrompt, PromptGrammarError, parse_prompt
from onestep_cli.digits.data import load_digits_images


@pytest.mark.parametrize("text, expected", [
    ("the digit 7", DigitPrompt(7)),
    ("a handwritten seven", DigitPrompt(7)),
    ("The digit 7.", DigitPrompt(7)),
    ("a bold handwritten seven, slanted left", DigitPrompt(7, "bold", "slanted left")),
    ("number 3 written in light strokes", DigitPrompt(3, "thin")),
    ("a heavy 0 leaning right", DigitPrompt(0, "bold", "slanted right")),
    ("an image of a four that is straight", DigitPrompt(4, None, "upright")),
])
def test_plain_and_attribute_prompts_parse(text, expected):
    assert parse_prompt(text) == expected


@pytest.mark.parametrize("text, message", [
    ("a red bicycle", "names no digit"),
    ("a 7 next to an 8", r"several digits \[7, 8\]"),
    ("version 2.5 of the digit", "names no digit"),
    ("a thin bold three", "contradictory attributes"),
])
def test_prompts_outside_the_grammar_are_refused_by_name(text, message):
    with pytest.raises(PromptGrammarError, match=message):
        parse_prompt(text)


def test_captions_of_measured_images_read_back_in_every_template():
    images, labels = load_digits_images(32)
    described = captions.describe(images[:50], labels[:50])
    assert [p.digit for p in described] == labels[:50].tolist()
    for prompt in described:
        for template in captions.TRAIN_TEMPLATES + captions.HELDOUT_TEMPLATES:
            for use_word in (False, True):
                parsed = parse_prompt(captions.caption(prompt, template, use_word))
                assert parsed.digit == prompt.digit
                assert parsed.weight in (None, prompt.weight) and parsed.slant in (None, prompt.slant)
                assert ("{w}" not in template or parsed.weight == prompt.weight)
                assert ("{s}" not in template or parsed.slant == prompt.slant)


def test_attributes_split_each_digit_into_terciles_and_follow_the_pixels():
    images, labels = load_digits_images(32)
    described = captions.describe(images, labels)
    for digit in range(10):
        weights = [p.weight for p, label in zip(described, labels) if label == digit]
        assert all(abs(weights.count(w) / len(weights) - 1 / 3) < 0.03 for w in captions.WEIGHTS)
    # Thickening strokes raises the ink mass; shearing the top to the right raises the slant.
    bolder = torch.nn.functional.max_pool2d(images[:20], 3, stride=1, padding=1)
    assert (captions.ink_mass(bolder) > captions.ink_mass(images[:20])).all()
    rows = torch.arange(32, dtype=torch.float32)
    shift = ((15.5 - rows) * 0.3).round().long()  # Top rows move right, bottom rows left.
    sheared = torch.stack([torch.roll(images[:20, :, r], int(shift[r]), dims=-1) for r in range(32)], dim=2)
    assert (captions.slant(sheared) > captions.slant(images[:20])).all()


def test_shipped_prompt_files_are_the_grammars_phrasings():
    for name, templates in (("train", captions.TRAIN_TEMPLATES), ("heldout", captions.HELDOUT_TEMPLATES)):
        path = resolve_asset_path(f"@assets/digits_t2i_prompts/{name}.txt")
        assert path.read_text().splitlines() == captions.prompt_list(templates)
    train = set(captions.prompt_list(captions.TRAIN_TEMPLATES))
    assert not train & set(captions.prompt_list(captions.HELDOUT_TEMPLATES))
    assert {"the digit 7", "a handwritten seven"} <= train


def test_random_captions_cover_templates_and_digit_forms():
    generator = torch.Generator().manual_seed(0)
    drawn = {captions.random_caption(DigitPrompt(2, "bold", "upright"), generator) for _ in range(400)}
    assert len(drawn) == len(captions.TRAIN_TEMPLATES) * 2

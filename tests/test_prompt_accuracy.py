"""prompt_accuracy: real 32x32 digits judged against their own captions, wrong captions and opposite attributes, and
through `onestep eval` on an .npz with --prompts and on a folder whose samples.json records the prompts (which the
result names rather than repeats)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_cli.digits.captions import PromptGrammarError, caption, describe
from onestep_cli.digits.data import load_digits_images
from onestep_cli.digits.prompt_following import prompt_accuracy

OPPOSITE = {"thin": "bold", "bold": "thin", "slanted left": "slanted right", "slanted right": "slanted left"}


@pytest.fixture(scope="module")
def digits32():
    images, labels = load_digits_images(32)
    return images.expand(-1, 3, -1, -1), labels  # Grey replicated, as the text-to-image teachers write them.


def _captions(descriptions, template="a {w} digit {d}, {s}"):
    return [caption(prompt, template, use_word=i % 2 == 1) for i, prompt in enumerate(descriptions)]


def test_real_digits_follow_their_captions_and_not_wrong_digits(digits32):
    images, labels = digits32
    right, provenance = prompt_accuracy(images, _captions(describe(images, labels), "the digit {d}"))
    wrong, _ = prompt_accuracy(images, _captions(describe(images, (labels + 1) % 10), "the digit {d}"))
    assert right > 0.95 and wrong < 0.1
    assert provenance["num_images"] == len(labels) and provenance["classifier_test_accuracy"] > 0.95
    assert provenance["weight_counted"] == provenance["slant_counted"] == 0  # "the digit 7" asks no attribute.
    assert provenance["weight_agreement"] is None


def test_attributes_agree_with_measured_extremes_and_not_with_their_opposites(digits32):
    images, labels = digits32
    measured = describe(images, labels)
    _, own = prompt_accuracy(images, _captions(measured))
    flipped = [type(p)(p.digit, OPPOSITE.get(p.weight, p.weight), OPPOSITE.get(p.slant, p.slant)) for p in measured]
    _, opposite = prompt_accuracy(images, _captions(flipped))
    thin_or_bold = sum(p.weight in ("thin", "bold") for p in measured)
    assert own["weight_counted"] == opposite["weight_counted"] == thin_or_bold > 0.5 * len(labels)
    assert own["slant_counted"] == sum(p.slant in ("slanted left", "slanted right") for p in measured)
    assert own["weight_agreement"] == own["slant_agreement"] == 1.0  # Beyond a tercile is beyond the median.
    assert opposite["weight_agreement"] == opposite["slant_agreement"] == 0.0
    coin = torch.Generator().manual_seed(0)  # Attributes asked at random: the real digits ignore them.
    random = [type(p)(p.digit, ("thin", "bold")[int(torch.randint(2, (), generator=coin))],
                      ("slanted left", "slanted right")[int(torch.randint(2, (), generator=coin))]) for p in measured]
    _, chance = prompt_accuracy(images, _captions(random))
    assert chance["weight_counted"] == chance["slant_counted"] == len(labels)
    assert abs(chance["weight_agreement"] - 0.5) < 0.05 and abs(chance["slant_agreement"] - 0.5) < 0.05


def test_refuses_other_resolutions_and_unreadable_prompts(digits32):
    images, labels = digits32
    prompts = [f"the digit {int(d)}" for d in labels[:4]]
    with pytest.raises(ValueError, match=r"32x32 digits .* got 16x16"):
        prompt_accuracy(images[:4, :, ::2, ::2], prompts)
    with pytest.raises(PromptGrammarError, match=r"image 2: prompt 'a picture of a cat' names no digit"):
        prompt_accuracy(images[:4], prompts[:2] + ["a picture of a cat"] + prompts[3:])


def _uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _eval(cli, *args):
    return cli.invoke("eval", *args, "--metrics", "prompt_accuracy", "--device", "cpu", "--json")


@pytest.mark.e2e
def test_eval_cli_on_an_npz_with_prompts_and_on_a_folder_recording_them(cli, digits32, tmp_path):
    images, labels = images_labels = digits32[0][:120], digits32[1][:120]
    prompts = _captions(describe(*images_labels), "an image of a {d} that is {s}")
    np.savez(tmp_path / "digits.npz", samples=_uint8_nhwc(images))
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    folder = tmp_path / "sampled"  # As `onestep sample --prompts` writes it: samples.json names each file's prompt.
    folder.mkdir()
    for i, array in enumerate(_uint8_nhwc(images)):
        Image.fromarray(array).save(folder / f"p{i:04d}-s000000.png")
    records = [{"file": f"p{i:04d}-s000000.png", "prompt": p, "seed": 0} for i, p in enumerate(prompts)]
    (folder / "samples.json").write_text(json.dumps({"prompts": prompts, "images": records}))

    from_npz = _eval(cli, tmp_path / "digits.npz", "--prompts", tmp_path / "prompts.txt")
    from_folder = _eval(cli, folder)
    assert from_npz.exit_code == 0 and from_folder.exit_code == 0, from_npz.output + from_folder.output
    npz_result, folder_result = json.loads(from_npz.stdout), json.loads(from_folder.stdout)
    assert npz_result["metrics"]["prompt_accuracy"] > 0.95
    assert folder_result["metrics"] == npz_result["metrics"]
    provenance = npz_result["provenance"]["prompt_accuracy"]
    assert provenance["slant_agreement"] == 1.0 and provenance["slant_counted"] > 40
    assert provenance["weight_counted"] == 0 and len(provenance["classifier_sha256"]) == 64
    assert folder_result["provenance"]["prompt_accuracy"]["prompt_pairing"]["prompts"].endswith("samples.json")
    # The result describes the folder without repeating its per-image records, and names the file that keeps them.
    described = folder_result["provenance"]["common"]["samples_meta"]
    assert "images" not in described and "prompts" not in described
    assert described["per_image_records"] == str(folder / "samples.json")


def test_eval_cli_names_an_unreadable_prompt_without_a_traceback(cli, digits32, tmp_path):
    np.savez(tmp_path / "digits.npz", samples=_uint8_nhwc(digits32[0][:3]))
    (tmp_path / "prompts.txt").write_text("the digit 0\nthe digits 1 and 2\nthe digit 2\n")
    result = _eval(cli, tmp_path / "digits.npz", "--prompts", tmp_path / "prompts.txt")
    assert result.exit_code == 2, result.output  # A usage error, reported as a sentence; a crash would exit 1.
    assert "'the digits 1 and 2' names several digits [1, 2]" in result.output
    assert "Traceback" not in result.output


@pytest.mark.e2e
def test_weight_and_slant_agreement_are_metrics_of_their_own(cli, digits32, tmp_path):
    images, labels = digits32[0][:200], digits32[1][:200]
    measured = describe(images, labels)
    flipped = [type(p)(p.digit, OPPOSITE.get(p.weight, p.weight), p.slant) for p in measured]
    np.savez(tmp_path / "digits.npz", samples=_uint8_nhwc(images))
    (tmp_path / "prompts.txt").write_text("\n".join(_captions(flipped)) + "\n")
    result = cli.invoke("eval", tmp_path / "digits.npz", "--prompts", tmp_path / "prompts.txt",
                        "--metrics", "prompt_accuracy,weight_agreement,slant_agreement", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["weight_agreement"] == 0.0 and metrics["slant_agreement"] == 1.0 and metrics["prompt_accuracy"] > 0.9
    (tmp_path / "plain.txt").write_text("the digit 7\n" * 200)
    refused = cli.invoke("eval", tmp_path / "digits.npz", "--prompts", tmp_path / "plain.txt",
                         "--metrics", "weight_agreement")
    assert refused.exit_code == 2 and "none of these 200 prompts" in refused.output

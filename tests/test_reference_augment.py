"""onestep's EDM augmentation against NVlabs/edm's own `AugmentPipe`: for the per-image parameters EDM drew, the same
output images and the same 9 labels, for each op alone and for all of them together.

The fixture holds four 32x32 photographs, and per run EDM's drawn parameters, output and labels; it was written by
`scripts/reference/edm_augment.py` (EDM commit, settings and command in the JSON beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep_cli.denoisers.edm.augment import Augmentation, augment

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "edm_augment.safetensors"
RUNS = json.loads(FIXTURE.with_suffix(".json").read_text())["runs"]
# float32 rounding (measured: up to 7e-6 on the CPU, 8e-6 on an H100): both sides sum the same 12-tap filters and
# bilinear weights in different orders. What it guards shows far above it: rotations pivoting 0.05 pixels away from
# EDM's pivot err by up to 0.15 on these images, padding unlike EDM's by 5e-5 to 1.5e-4.
IMAGE_ATOL = 1e-5
PARAMETERS = ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle", "translate")  # as the fixture names them


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


def edm_parameters(reference: dict[str, torch.Tensor], run: str) -> Augmentation:
    return Augmentation(**{name: reference[f"{run}.{name}"] for name in PARAMETERS})


@pytest.mark.parametrize("run", list(RUNS))
def test_augmented_images_equal_edms(reference, run):
    out = augment(reference["images"], edm_parameters(reference, run))
    error = (out - reference[f"{run}.output"]).abs().max().item()
    assert error <= IMAGE_ATOL, f"run {run}: max abs error {error:.3g} against EDM's AugmentPipe"


@pytest.mark.parametrize("run", list(RUNS))
def test_labels_equal_edms(reference, run):
    labels = edm_parameters(reference, run).labels()[:, RUNS[run]["label_columns"]]
    torch.testing.assert_close(labels, reference[f"{run}.labels"], atol=0, rtol=0)


def test_the_fixture_exercises_every_op(reference):
    """Each geometric op alone (p=1) moved all four images; each flip alone flipped some but not all (a coin)."""
    for op in ("scale", "rotate_frac", "aniso", "translate_frac"):
        assert (reference[f"{op}.labels"] != 0).any(dim=1).all(), op
    for op in ("xflip", "yflip"):
        assert 0 < reference[f"{op}.labels"].sum() < 4, op


@pytest.mark.parametrize("run", ["all_p0.5", "all_p1"])
def test_images_augmented_one_by_one_equal_edms_whole_batch(reference, run):
    """EDM pads a batch by the margin its widest-reaching image needs, and an image sliced from the batch keeps it
    (in a batch of its own, padded by its own margin, an image here would differ by up to 1.5e-4)."""
    whole = edm_parameters(reference, run)
    parts = torch.cat([augment(reference["images"][i:i + 1], whole[i:i + 1]) for i in range(len(whole))])
    error = (parts - reference[f"{run}.output"]).abs().max().item()
    assert error <= IMAGE_ATOL, f"run {run}: images augmented one by one differ from EDM's batch by {error:.3g}"

"""fd_digits and class_accuracy through `onestep eval`, on real digits stored as an .npz."""

import json

import numpy as np
import pytest
import torch

from onestep_cli.digits.data import load_digits_images


def _eval(cli, path, metrics, in_process=True):
    """`onestep eval --json`: in this process unless asked for the console script (once is enough for what a new
    interpreter adds)."""
    if in_process:
        result = cli.invoke("eval", path, "--metrics", metrics, "--json")
        assert result.exit_code == 0, result.output
    else:
        result = cli.run("eval", path, "--metrics", metrics, "--json")
    return json.loads(result.stdout)


@pytest.mark.e2e
def test_real_digits_score_well_and_wrong_labels_score_badly(cli, tmp_path):
    images, labels = load_digits_images(8)
    images, labels = images[:600], labels[:600]
    np.savez(tmp_path / "real.npz", samples=images.numpy(), labels=labels.numpy())
    shuffled = torch.roll(labels, 1)  # Neighbouring digits mostly differ in class.
    np.savez(tmp_path / "mislabelled.npz", samples=images.numpy(), labels=shuffled.numpy())
    noise = torch.rand(600, 1, 8, 8) * 2 - 1
    np.savez(tmp_path / "noise.npz", samples=noise.numpy(), labels=labels.numpy())

    real = _eval(cli, tmp_path / "real.npz", "fd_digits,class_accuracy", in_process=False)["metrics"]
    noisy = _eval(cli, tmp_path / "noise.npz", "fd_digits")["metrics"]
    wrong = _eval(cli, tmp_path / "mislabelled.npz", "class_accuracy")["metrics"]
    assert real["class_accuracy"] > 0.95
    expected_wrong = float((shuffled == labels).float().mean()) + 0.1
    assert wrong["class_accuracy"] < expected_wrong
    assert real["fd_digits"] < 0.05 * noisy["fd_digits"]

"""The embedded digits default: data, shipped teacher and classifier, fd_digits / class_accuracy, presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from onestep_cli.config import list_presets, resolve_config
from onestep_cli.digits.classifier import load_classifier, read_classifier_config
from onestep_cli.digits.data import NUM_CLASSES, load_digits_images, split_indices
from onestep_cli.digits.metrics import class_accuracy, fd_digits, frechet_distance, gaussian_fit
from onestep_cli.runs.networks import build_teacher
from onestep_cli.sampling import generate_teacher, seeded_latents

DIGITS_PRESETS = ["digits-sim", "digits-sid", "digits-dmd", "digits-di"]
EXTERNAL_PRESETS = {  # preset -> the EDM snapshot it expects
    **{f"cifar10-uncond-{o}": "edm-cifar10-32x32-uncond-vp.pkl" for o in ("sim", "sid", "dmd", "di")},
    **{f"cifar10-cond-{o}": "edm-cifar10-32x32-cond-vp.pkl" for o in ("sim", "sid", "dmd")},
    **{f"imagenet64-cond-{o}": "edm-imagenet-64x64-cond-adm.pkl" for o in ("sim", "sid", "dmd")},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits8():
    return load_digits_images(8)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(resolve_config("digits-sim").teacher)


# -- data -------------------------------------------------------------------------------------------------------------

def test_digits_loader_shapes_range_and_labels(digits8):
    from sklearn.datasets import load_digits

    images, labels = digits8
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1 and images.max() == 1
    assert torch.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()
    # At the native resolution the pixels are sklearn's 0..16 counts mapped linearly onto [-1, 1].
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    torch.testing.assert_close(images[:, 0], raw / 8 - 1)

    big, big_labels = load_digits_images(16)
    assert big.shape == (1797, 1, 16, 16) and torch.equal(big_labels, labels)
    assert big.min() >= -1 and big.max() <= 1
    # Bilinear upsampling keeps each digit: shrunk back by 2x2 averages it correlates closely with the original.
    shrunk = torch.nn.functional.avg_pool2d(big, 2)
    assert torch.corrcoef(torch.stack([shrunk.flatten(), images.flatten()]))[0, 1] > 0.95
    with pytest.raises(ValueError, match="below the digits' native"):
        load_digits_images(4)


def test_split_is_fixed_and_disjoint():
    train, test = split_indices()
    assert len(train) == 1348 and len(test) == 449
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(split_indices()[1], test)


# -- the shipped teacher ----------------------------------------------------------------------------------------------

def test_shipped_teacher_loads_from_the_asset_path_and_denoises(teacher, digits8):
    config = resolve_config("digits-sim").teacher
    assert str(config.path) == "@assets/digits_teacher" and config.resolved_path.is_dir()
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (8, 1, NUM_CLASSES)
    images, labels = digits8
    x0, onehot = images[:256], torch.nn.functional.one_hot(labels[:256], NUM_CLASSES).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((x0.shape[0],), 0.5)
    with torch.no_grad():
        denoised = teacher(x0 + 0.5 * noise, sigma, onehot)
        wrong_label = teacher(x0 + 0.5 * noise, sigma, onehot.roll(1, dims=1))
    noisy_error = (0.5 * noise).square().mean()
    error = (denoised - x0).square().mean()
    assert error < 0.2 * noisy_error  # A real denoiser: most of the noise is removed.
    assert error < (wrong_label - x0).square().mean()  # And it uses the class label.


def test_shipped_teacher_samples_are_digits_of_the_asked_class(teacher):
    seeds = list(range(40))
    samples = generate_teacher(teacher, seeds, (1, 8, 8), label_dim=NUM_CLASSES, num_steps=18)
    _, cond = seeded_latents(seeds, (1, 8, 8), NUM_CLASSES)
    accuracy, provenance = class_accuracy(samples, cond)
    assert accuracy >= 0.85, provenance


# -- classifier and metrics -------------------------------------------------------------------------------------------

def test_shipped_classifier_accuracy_on_held_out_digits(digits8):
    images, labels = digits8
    _, test = split_indices()
    classifier = load_classifier()
    with torch.no_grad():
        accuracy = (classifier(images[test]).argmax(1) == labels[test]).float().mean()
    assert accuracy > 0.9  # Measured 0.980 (docs/digits.md).
    assert read_classifier_config()["training"]["test_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)


def test_fd_digits_separates_real_from_noise(digits8):
    images, _ = digits8
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    first, second = images[order[:898]], images[order[898:]]
    real_vs_real, provenance = fd_digits(first, second)
    noise = torch.rand(898, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_vs_noise, _ = fd_digits(noise, second)
    assert real_vs_real < 0.05 * real_vs_noise
    assert provenance["num_samples"] == 898 and provenance["num_reference"] == 899
    # The default reference is all 1797 real digits.
    value, provenance = fd_digits(first)
    assert value < real_vs_real and provenance["num_reference"] == 1797
    with pytest.raises(ValueError, match="8x8 images"):
        fd_digits(load_digits_images(16)[0][:100])


def test_frechet_distance_matches_a_scipy_sqrtm_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.3
    (mu1, cov1), (mu2, cov2) = gaussian_fit(a), gaussian_fit(b)
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0, abs=1e-8)
    # Rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative.
    c = rng.normal(size=(8, 16))
    assert frechet_distance(*gaussian_fit(c), mu2, cov2) > 0


def test_class_accuracy_of_real_digits(digits8):
    images, labels = digits8
    accuracy, provenance = class_accuracy(images, labels)
    assert accuracy > 0.97 and set(provenance["per_class_accuracy"]) == set(range(10))
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES)
    assert class_accuracy(images, onehot)[0] == accuracy
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(images, shuffled)[0] < 0.2
    with pytest.raises(ValueError, match="one label per sample"):
        class_accuracy(images, labels[:10])


# -- presets ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIGITS_PRESETS + list(EXTERNAL_PRESETS))
def test_preset_validates_in_a_dry_run(cli, name):
    assert list_presets().get(name), f"preset {name} is missing or has no description"
    result = cli.invoke("distill", "--preset", name, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert resolved["teacher"]["kind"] == "edm" and resolved["eval"]["metrics"] == []


@pytest.mark.parametrize("name, expected_file", sorted(EXTERNAL_PRESETS.items()))
def test_external_teacher_missing_names_the_file_and_where_it_is_published(cli, name, expected_file, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # The presets look for the snapshot in the current folder.
    # fp32: the ImageNet presets' fp16/bf16 would be refused first on this CPU-only machine.
    result = cli.invoke("distill", "--preset", name, "--out", tmp_path / "run", "--set", "train.precision=fp32",
                        env={"COLUMNS": "1000"})
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert expected_file in message and f"https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/{expected_file}" in message


def test_missing_digits_asset_says_how_to_get_it_back():
    config = resolve_config("digits-sim", overrides=["teacher.path=@assets/no_such_teacher"])
    with pytest.raises(FileNotFoundError, match="reinstall onestep"):
        build_teacher(config.teacher)

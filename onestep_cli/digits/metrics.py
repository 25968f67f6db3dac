"""Domain metrics for digits samples, measured with the shipped digits classifier.

- `fd_digits`: Fréchet distance between Gaussian fits of the classifier's penultimate features (64-d) of the samples
  and of a reference set (by default all 1797 real digits), the FID recipe in a feature space that knows digits.
- `class_accuracy`: how often the classifier assigns a class-conditional sample to the class it was asked for.

Both return `(value, provenance)`. Samples are `[N, 1, R, R]` float images in [-1, 1] at the classifier's resolution R
(8 for the shipped one); they are clamped to [-1, 1], as writing them to 8-bit images would.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch

from ..errors import InputError
from .classifier import SHIPPED_CLASSIFIER, WEIGHTS_NAME, DigitsClassifier, load_classifier, read_classifier_config
from .data import NUM_DIGITS, load_digits_images

FEATURE_BATCH = 1000  # Images per classifier call.


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """`|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))`, in float64.

    The trace of the matrix square root is taken as `sum(sqrt(eig(S C2 S)))` with `S = C1^(1/2)`: `S C2 S` is
    symmetric positive semi-definite and has the eigenvalues of `C1 C2`, so only symmetric eigendecompositions are
    needed (no complex `sqrtm`, no singular-matrix offsets). Round-off negatives are clipped to zero.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance needs means of one shape and matching square covariances, got "
                         f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}.")
    eigval, eigvec = np.linalg.eigh((cov1 + cov1.T) / 2)
    sqrt_cov1 = (eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows are samples), float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows to fit a Gaussian, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def prepare(samples: torch.Tensor, resolution: int) -> tuple[torch.Tensor, str]:
    """Float32 `[N, 1, resolution, resolution]` in [-1, 1]; returns the images and a note of what was done."""
    if samples.ndim != 4 or samples.shape[1] != 1:
        raise InputError(f"digits metrics take grey images [N, 1, H, W], got shape {list(samples.shape)}.")
    if samples.shape[-2:] != (resolution, resolution):
        # No resizing: shrinking bilinearly upsampled digits back blurs them (real 16 px digits shrunk to 8 px score
        # an fd_digits near 50), so a resized number would mislead.
        raise InputError(f"digits metrics measure {resolution}x{resolution} images (the classifier's resolution), got "
                         f"{samples.shape[-2]}x{samples.shape[-1]}. Measure samples at that resolution, or train a "
                         f"classifier at yours with scripts/train_digits_classifier.py --resolution.")
    if not torch.isfinite(samples).all():
        raise InputError("samples contain NaN or inf; digits metrics would be meaningless.")
    return samples.detach().to("cpu", torch.float32).clamp(-1, 1), "clamped to [-1, 1]"


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: DigitsClassifier) -> np.ndarray:
    return torch.cat([classifier.features(images[i:i + FEATURE_BATCH])
                      for i in range(0, images.shape[0], FEATURE_BATCH)]).double().numpy()


@torch.no_grad()
def classifier_predictions(images: torch.Tensor, classifier: DigitsClassifier) -> torch.Tensor:
    return torch.cat([classifier(images[i:i + FEATURE_BATCH]).argmax(1)
                      for i in range(0, images.shape[0], FEATURE_BATCH)])


@functools.lru_cache(maxsize=1)
def shipped_classifier() -> DigitsClassifier:
    return load_classifier(SHIPPED_CLASSIFIER)


def classifier_info(folder, name: str) -> dict:
    """Provenance of a saved digits classifier: `name`, its weights' SHA-256, held-out accuracy and resolution."""
    config = read_classifier_config(folder)
    digest = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    training = config.get("training", {})
    return {"classifier": name, "classifier_sha256": digest, "classifier_test_accuracy": training.get("test_accuracy"),
            "classifier_resolution": config["init_kwargs"]["resolution"]}


@functools.lru_cache(maxsize=1)
def _shipped_classifier_info() -> dict:
    return classifier_info(SHIPPED_CLASSIFIER, "onestep digits classifier (onestep_cli/assets/digits_classifier)")


@functools.lru_cache(maxsize=1)
def _real_digit_stats() -> tuple[np.ndarray, np.ndarray]:
    classifier = shipped_classifier()
    images, _ = load_digits_images(classifier.resolution)
    return gaussian_fit(classifier_features(images, classifier))


def fd_digits(samples: torch.Tensor, reference: torch.Tensor | None = None) -> tuple[float, dict]:
    """Fréchet distance in the digits classifier's feature space between `samples` and `reference` images.

    `reference=None` compares with all 1797 real digits (statistics cached per process). Lower is better; two
    disjoint halves of the real digits score 4.6, the shipped teacher's 1000 samples against all digits 1.2, uniform
    noise about 360 (docs/digits.md).
    """
    classifier = shipped_classifier()
    images, note = prepare(samples, classifier.resolution)
    mu, cov = gaussian_fit(classifier_features(images, classifier))
    if reference is None:
        mu_ref, cov_ref = _real_digit_stats()
        reference_name, num_reference = "sklearn load_digits, all images", NUM_DIGITS
    else:
        ref_images, _ = prepare(reference, classifier.resolution)
        mu_ref, cov_ref = gaussian_fit(classifier_features(ref_images, classifier))
        reference_name, num_reference = "images given by the caller", ref_images.shape[0]
    value = frechet_distance(mu, cov, mu_ref, cov_ref)
    return value, {**_shipped_classifier_info(), "features": f"penultimate layer ({mu.shape[0]}-d)",
                   "num_samples": images.shape[0], "reference": reference_name, "num_reference": num_reference,
                   "preprocessing": note}


def class_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    """Fraction of `samples` the digits classifier assigns to their `labels` (class indices `[N]` or one-hot `[N, 10]`).

    Higher is better; the classifier's own accuracy on held-out real digits (in the provenance) is the ceiling to
    read it against.
    """
    classifier = shipped_classifier()
    images, note = prepare(samples, classifier.resolution)
    labels = torch.as_tensor(labels).cpu()
    if labels.ndim == 2:
        labels = labels.argmax(dim=1)
    if labels.shape != (images.shape[0],):
        raise InputError(f"class_accuracy needs one label per sample: {images.shape[0]} samples, labels of shape "
                         f"{list(labels.shape)}. Pass class indices [N] or one-hot labels [N, 10]; an unconditional "
                         "generator has no labels to check.")
    predicted = classifier_predictions(images, classifier)
    correct = (predicted == labels.long())
    per_class = {int(c): round(float(correct[labels == c].float().mean()), 4) for c in labels.unique()}
    return float(correct.float().mean()), {**_shipped_classifier_info(), "num_samples": images.shape[0],
                                           "per_class_accuracy": per_class, "preprocessing": note}

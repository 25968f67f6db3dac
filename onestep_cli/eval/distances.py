"""Distances between feature sets and scores over them: Fréchet distance, KID, Inception Score (numpy, float64)."""

from __future__ import annotations

import hashlib

import numpy as np

KID_SUBSETS = 100  # StyleGAN/clean-fid defaults.
KID_SUBSET_SIZE = 1000
KID_SEED = 0
IS_SPLITS = 10


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (N-1, as np.cov and EDM) of [N, D] features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Feature statistics need at least 2 samples of [N, D] features; got shape {features.shape}.")
    mu = features.mean(axis=0)
    centred = features - mu
    sigma = centred.T @ centred / (features.shape[0] - 1)
    return mu, sigma


def stats_sha256(mu: np.ndarray, sigma: np.ndarray) -> str:
    """Fingerprint of reference statistics (float64 little-endian bytes of mu then sigma)."""
    digest = hashlib.sha256()
    for array in (mu, sigma):
        digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
    return digest.hexdigest()


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition (negative rounding
    errors in the spectrum clipped to zero)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) for covariance matrices, computed as tr sqrt(A sigma2 A) with A = sqrt(sigma1).

    sigma1 sigma2 and A sigma2 A are similar, so they share their (real, non-negative) eigenvalues; the second is
    symmetric PSD, so no complex arithmetic and no failure on singular or near-singular covariances (fewer samples
    than dimensions), where scipy.linalg.sqrtm of the product returns NaN or imaginary parts.
    """
    root = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    middle = root @ np.asarray(sigma2, dtype=np.float64) @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between Gaussians: |mu1-mu2|^2 + tr(s1 + s2 - 2 sqrt(s1 s2))."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Fréchet distance between statistics of different dimension: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}.")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))  # Exactly zero for identical statistics up to rounding.


def kernel_inception_distance(features: np.ndarray, reference: np.ndarray, num_subsets: int = KID_SUBSETS,
                              max_subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> float:
    """KID (Bińkowski et al. 2018) as StyleGAN and clean-fid compute it: the unbiased MMD^2 with the cubic
    polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` random subsets of
    m = min(N, N_ref, max_subset_size) samples of each set. Subsets are drawn from a seeded generator (clean-fid's
    are not seeded), so the value is reproducible."""
    x_all = np.asarray(features, dtype=np.float64)
    y_all = np.asarray(reference, dtype=np.float64)
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"KID between features of different dimension: {x_all.shape[1]} and {y_all.shape[1]}.")
    dim = x_all.shape[1]
    m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set.")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


def inception_score(probs: np.ndarray, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) on consecutive splits (StyleGAN/EDM): mean and std over splits."""
    probs = np.asarray(probs, dtype=np.float64)
    num_splits = min(num_splits, probs.shape[0])
    scores = []
    for i in range(num_splits):
        part = probs[i * probs.shape[0] // num_splits:(i + 1) * probs.shape[0] // num_splits]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))

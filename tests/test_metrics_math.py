"""The numbers under every distribution metric, against independent numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from onestep_cli.eval.distances import (feature_stats, frechet_distance, inception_score,
                                        kernel_inception_distance, stats_sha256, trace_sqrt_product)
from onestep_cli.eval.inception import tf1_bilinear_resize


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_feature_stats_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).normal(size=(50, 4))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(loc=0.3, size=(300, 12)) @ rng.normal(size=(12, 12))
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-9)


def test_frechet_distance_of_commuting_covariances_has_closed_form_even_when_singular():
    # sigma1, sigma2 share eigenvectors: FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, whatever the conditioning.
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    a = np.concatenate([rng.uniform(0.5, 2.0, 10), np.zeros(6), np.full(4, 1e-13)])
    b = np.concatenate([rng.uniform(0.5, 2.0, 10), np.full(6, 1e-12), np.zeros(4)])
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    ours = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    # sqrt is ill-conditioned at 0: rounding of 1e-16 in an eigenvalue moves its root by 1e-8, hence the tolerance.
    assert ours == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite_and_zero_on_itself():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 64))  # Rank-5 covariance in 64 dimensions.
    mu, sigma = feature_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    y = rng.normal(size=(6, 64))
    value = frechet_distance(mu, sigma, *feature_stats(y))
    assert np.isfinite(value) and value > 0
    # tr sqrt(S1 S2) of a near-singular pair agrees with the eigenvalues of S1 S2 (which are real, >= 0).
    s2 = feature_stats(y)[1]
    eig = np.clip(np.linalg.eigvals(sigma @ s2).real, 0, None)
    assert trace_sqrt_product(sigma, s2) == pytest.approx(np.sqrt(eig).sum(), rel=1e-6)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def independent_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written out with loops."""
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_with_one_full_subset_is_the_unbiased_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(15, 5)), rng.normal(loc=0.5, size=(15, 5))
    # One subset of all samples is a permutation of each set, which leaves the statistic unchanged.
    ours = kernel_inception_distance(x, y, num_subsets=1, max_subset_size=15)
    assert ours == pytest.approx(independent_mmd2(x, y), rel=1e-10)


def test_kid_is_seeded_and_near_zero_for_one_distribution():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    first = kernel_inception_distance(x, y, num_subsets=20, max_subset_size=100)
    assert first == kernel_inception_distance(x, y, num_subsets=20, max_subset_size=100)
    assert abs(first) < 0.05 < kernel_inception_distance(x, y + 1.0, num_subsets=20, max_subset_size=100)


def test_inception_score_matches_scipy_entropy():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(40, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mean, std = inception_score(probs, num_splits=2)
    expected = [np.exp(np.mean([scipy.stats.entropy(p, part.mean(0)) for p in part]))
                for part in (probs[:20], probs[20:])]
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert std == pytest.approx(np.std(expected), rel=1e-8)
    assert inception_score(np.full((10, 7), 1 / 7), 1)[0] == pytest.approx(1.0)  # Uninformative classifier.


def test_stats_sha256_depends_on_values():
    mu, sigma = np.zeros(3), np.eye(3)
    assert stats_sha256(mu, sigma) == stats_sha256(mu.astype(np.float32), sigma)
    assert stats_sha256(mu, sigma) != stats_sha256(mu + 1e-9, sigma)


def tf1_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow 1's resize_bilinear(align_corners=False), pixel by pixel from its definition."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0, y1 = int(np.floor(y)), min(int(np.floor(y)) + 1, in_h - 1)
        for j in range(out_w):
            x = j * in_w / out_w
            x0, x1 = int(np.floor(x)), min(int(np.floor(x)) + 1, in_w - 1)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * (x - x0)
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


@pytest.mark.parametrize("size_in, size_out", [((5, 4), (7, 9)), ((9, 11), (4, 3)), ((8, 8), (8, 8))])
def test_tf1_bilinear_resize_matches_its_definition(size_in, size_out):
    image = np.random.default_rng(7).uniform(0, 255, size=size_in)
    ours = tf1_bilinear_resize(torch.from_numpy(image)[None, None], size_out)[0, 0].numpy()
    np.testing.assert_allclose(ours, tf1_reference(image, *size_out), rtol=1e-12, atol=1e-9)


def test_tf1_bilinear_resize_equals_the_shifted_grid_sample_of_stylegans_detector():
    # StyleGAN's Inception detector resizes with affine_grid + grid_sample(border), shifting the grid by
    # 1/in - 1/out so that output pixel i samples input coordinate i * in/out.
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 255
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += theta[0, 0] / 32 - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / 32 - theta[1, 1] / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    expected = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(tf1_bilinear_resize(x, (299, 299)), expected, rtol=1e-9, atol=1e-7)

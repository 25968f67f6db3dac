"""Registering metrics from other packages: a feature space gives fd_<space> (with an optional default reference),
labels reach extractors that ask for them, and the low-dimensional metrics keep their old entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onestep_cli.eval import registry as metrics
from onestep_cli.eval import (FeatureExtractor, FeatureSpace, MetricContext, MetricError, check_metric_names,
                              compute_metrics, mean_score_metric, register_feature_space, register_metric)
from onestep_cli.eval.distances import feature_stats, frechet_distance, stats_sha256
from onestep_cli.eval.reference import ReferenceStats


class MeanColour(FeatureExtractor):
    """A toy feature space: the mean of each channel."""

    space = key = "toy"

    def __init__(self, ctx):
        self.provenance = {"features": "channel means"}

    def extract(self, images, prompts=None):
        return images.reshape(images.shape[0], -1, 3).mean(axis=1)


class IsRedForLabel(FeatureExtractor):
    """Per image: 1 if the brightest channel equals the label (0=R, 1=G, 2=B)."""

    space = key = "toy_label"
    needs_labels = True

    def __init__(self, ctx):
        self.provenance = {"score": "brightest channel == label"}

    def extract(self, images, prompts=None, labels=None):
        return (images.reshape(images.shape[0], -1, 3).mean(axis=1).argmax(axis=1) == labels).astype(float)[:, None]


def toy_reference(extractor) -> ReferenceStats:
    mu, sigma = np.full(3, 127.5), np.eye(3) * 100
    return ReferenceStats(mu, sigma, None, {"reference": "built-in toy statistics",
                                            "reference_stats_sha256": stats_sha256(mu, sigma)})


@pytest.fixture()
def registered(monkeypatch):
    metrics.load_plugins()  # Into the real registry first: the copies below are thrown away after the test.
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    monkeypatch.setattr(metrics, "FEATURE_SPACES", dict(metrics.FEATURE_SPACES))
    register_feature_space(FeatureSpace("toy", "channel means", MeanColour, distribution=True,
                                        default_reference=toy_reference))
    register_feature_space(FeatureSpace("toy_label", "label check", IsRedForLabel))
    register_metric(mean_score_metric("toy_accuracy", "toy_label", "fraction of images of their label's colour"))


def test_a_registered_distribution_space_offers_fd_with_its_default_reference(registered):
    images = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    result = compute_metrics(["fd_toy"], images)["fd_toy"]
    expected = frechet_distance(*feature_stats(images.reshape(20, -1, 3).mean(1)), np.full(3, 127.5), np.eye(3) * 100)
    assert result.value == pytest.approx(expected)
    assert result.provenance["reference"] == "built-in toy statistics"


def test_labels_reach_extractors_that_ask_for_them(registered):
    images = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    for i in range(3):
        images[i, ..., i] = 200
    ctx = MetricContext(labels=np.array([0, 1, 0]))
    assert compute_metrics(["toy_accuracy"], images, context=ctx)["toy_accuracy"].value == pytest.approx(2 / 3)
    with pytest.raises(MetricError, match="class labels"):
        compute_metrics(["toy_accuracy"], images)


def test_names_are_checked_against_the_registries(registered):
    check_metric_names(["fid", "fd_clip", "fd_toy", "toy_accuracy", "swd"])
    with pytest.raises(MetricError, match="Did you mean 'fd_toy'"):
        check_metric_names(["fd_tyo"])
    with pytest.raises(MetricError, match="Unknown metric 'fd_toy_label'"):
        check_metric_names(["fd_toy_label"])  # Not a distribution space.
    with pytest.raises(ValueError, match="already registered"):
        register_metric(mean_score_metric("toy_accuracy", "toy_label", "again"))


def test_lowdim_metrics_keep_their_entry_point():
    from onestep_cli.denoisers.gmm import GaussianMixtureDenoiser

    teacher = GaussianMixtureDenoiser([[1.0, 0.0], [-1.0, 0.0]], [0.1, 0.1], [0.5, 0.5])
    samples = teacher.sample(200, torch.Generator().manual_seed(3))
    results = compute_metrics(["swd", "mode_coverage"], samples, teacher)
    assert results["mode_coverage"].value == 1.0 and results["swd"].provenance["num_samples"] == 200
    with pytest.raises(MetricError, match="NaN or inf"):
        compute_metrics(["swd"], samples * float("nan"), teacher)


def test_the_digits_metrics_come_through_their_entry_point_and_a_missing_one_says_how_to_fix_it(monkeypatch):
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group=metrics.PLUGIN_GROUP)] == ["onestep_cli.digits.registration:register"]
    assert metrics.get_metric("class_accuracy").name == "class_accuracy"
    monkeypatch.setattr(metrics, "entry_points", lambda group: [])
    with pytest.raises(MetricError, match="No metric plug-in is installed"):
        metrics.get_metric("no_such_metric")

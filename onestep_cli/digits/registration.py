"""Register `fd_digits` and `class_accuracy` with the metrics registry, so `onestep eval` offers them."""

from __future__ import annotations

import numpy as np
import torch

from ..metrics import FeatureExtractor, FeatureSpace, mean_score_metric, register_feature_space, register_metric
from ..metrics.reference import ReferenceStats
from .metrics import (_real_digit_stats, _shipped_classifier_info, classifier_features, classifier_predictions,
                      prepare, shipped_classifier)


def _grey(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] as written for evaluation -> float [B, 1, H, W] in [-1, 1] (first channel)."""
    return torch.from_numpy(np.ascontiguousarray(images[..., 0])).float().div(127.5).sub(1).unsqueeze(1)


class DigitsFeatures(FeatureExtractor):
    """Penultimate-layer features of the shipped digits classifier."""

    space = key = "digits"

    def __init__(self, context):
        self.classifier = shipped_classifier()
        self.provenance = _shipped_classifier_info()

    def extract(self, images, prompts=None):
        grey, _ = prepare(_grey(images), self.classifier.resolution)
        return classifier_features(grey, self.classifier)


class DigitsCorrect(FeatureExtractor):
    """1.0 per image the classifier assigns to the class it was generated for, else 0.0."""

    space = key = "digits_correct"
    needs_labels = True

    def __init__(self, context):
        self.classifier = shipped_classifier()
        self.provenance = _shipped_classifier_info()

    def extract(self, images, prompts=None, labels=None):
        grey, _ = prepare(_grey(images), self.classifier.resolution)
        labels = torch.as_tensor(labels).reshape(-1)
        return (classifier_predictions(grey, self.classifier) == labels).double().numpy()[:, None]


def _real_digits_reference(extractor) -> ReferenceStats:
    mu, sigma = _real_digit_stats()
    return ReferenceStats(mu, sigma, None, {"reference": "sklearn load_digits, all 1797 images"})


register_feature_space(FeatureSpace("digits", "features of the shipped digits classifier", DigitsFeatures,
                                    distribution=True, default_reference=_real_digits_reference))
register_feature_space(FeatureSpace("digits_correct", "digits classifier agrees with the sample's class", DigitsCorrect))
register_metric(mean_score_metric("class_accuracy", "digits_correct",
                                  "fraction of class-conditional samples the digits classifier assigns to their class"))

"""Register the digits metrics (`fd_digits`, `class_accuracy`; `prompt_accuracy`, `weight_agreement` and
`slant_agreement` for text-to-image digits) with the metrics registry, so `onestep eval` offers them."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..eval import (FeatureExtractor, FeatureSpace, Metric, MetricContext, MetricError, MetricResult,
                    mean_score_metric, register_feature_space, register_metric)
from ..eval.reference import ReferenceStats
from . import prompt_following
from .captions import PromptGrammarError
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




class DigitsPromptChecks(FeatureExtractor):
    """The `PromptChecks` of each digits image against its prompt, as six columns; every prompt is parsed (and a
    prompt the grammar cannot read refused) before any image is read."""

    space = key = "digits_prompt"
    needs_prompts = True

    def __init__(self, context: MetricContext):
        try:
            prompt_following.parse_prompts(context.prompts or [])
        except PromptGrammarError as exc:
            raise MetricError(f"prompt_accuracy reads digits prompts; {exc}") from exc
        self.provenance = prompt_following.classifier32_info()

    def extract(self, images, prompts=None):
        floats = torch.tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        try:
            checks = prompt_following.check_prompts(floats, prompt_following.parse_prompts(prompts))
        except InputError as exc:  # A resolution other than the classifier's: a usage error (exit code 2).
            raise MetricError(str(exc)) from exc
        return checks.as_columns()


def _prompt_accuracy(features, reference, ctx) -> MetricResult:
    checks = prompt_following.PromptChecks.from_columns(features[DigitsPromptChecks.space])
    value, provenance = prompt_following.summarise(checks)
    return MetricResult("prompt_accuracy", value, provenance)


def _attribute_agreement(name: str, asked: str, asks: str):
    """The finish of `name`: the fraction of images on the side of the class median their prompt asks for."""
    def finish(features, reference, ctx) -> MetricResult:
        checks = prompt_following.PromptChecks.from_columns(features[DigitsPromptChecks.space])
        _, provenance = prompt_following.summarise(checks)
        if provenance[name] is None:
            raise MetricError(f"{name} counts images whose prompt asks {asks}, and none of these "
                              f"{provenance['num_images']} prompts does; leave {name} out or use prompts that ask it.")
        return MetricResult(name, provenance[name], {**provenance, "counted": provenance[asked]})
    return finish


def register() -> None:
    """The `onestep.metrics` entry point: add the digits feature spaces and metrics to the registry."""
    register_feature_space(FeatureSpace("digits", "features of the shipped digits classifier", DigitsFeatures,
                                        distribution=True, default_reference=_real_digits_reference))
    register_feature_space(FeatureSpace("digits_correct", "digits classifier agrees with the sample's class",
                                        DigitsCorrect))
    register_metric(mean_score_metric("class_accuracy", "digits_correct", "fraction of class-conditional samples the "
                                      "digits classifier assigns to their class"))
    register_feature_space(FeatureSpace(DigitsPromptChecks.space, "digit, weight and slant of each digits image "
                                        "against its prompt", DigitsPromptChecks, needs_prompts=True))
    checks = (DigitsPromptChecks.space,)
    register_metric(Metric("prompt_accuracy", "image", "fraction of digits images the 32x32 digits classifier "
                           "assigns to the digit their prompt names (weight and slant agreement in the provenance)",
                           spaces=checks, needs_prompts=True, finish=_prompt_accuracy))
    register_metric(Metric("weight_agreement", "image", "fraction of digits images asked thin (bold) whose ink mass "
                           "is below (above) the real digits' median for that digit", spaces=checks,
                           needs_prompts=True, finish=_attribute_agreement("weight_agreement", "weight_counted",
                                                                           "for thin or bold strokes")))
    register_metric(Metric("slant_agreement", "image", "fraction of digits images asked slanted left (right) whose "
                           "slant is below (above) the real digits' median for that digit", spaces=checks,
                           needs_prompts=True, finish=_attribute_agreement("slant_agreement", "slant_counted",
                                                                           "for a left or right slant")))

"""Evaluation end to end: sources (runs, checkpoints, image folders, .npz) -> features -> metrics -> a result with
provenance. `eval.evaluate.evaluate` is the entry point; `register_metric` / `register_feature_space` add metrics
(docs/metrics.md)."""

from .base import (DEFAULT_FID_MODE, DEFAULT_SCORER_PRECISION, FID_MODES, SCORER_PRECISIONS, FeatureExtractor,
                   FeatureSpace, Metric, MetricContext, MetricError, MetricResult, check_scorer_precision)
from .builtin import mean_score_metric
from .compute import compute_metrics
from .registry import (FEATURE_SPACES, METRICS, check_metric_names, get_metric, is_image_metric, load_plugins,
                       needs_explicit_reference, register_feature_space, register_metric)
from .weights import MissingWeightsError, WeightsError

__all__ = ["METRICS", "FEATURE_SPACES", "Metric", "FeatureSpace", "FeatureExtractor", "MetricContext", "MetricError",
           "MetricResult", "MissingWeightsError", "WeightsError", "FID_MODES", "DEFAULT_FID_MODE", "SCORER_PRECISIONS",
           "DEFAULT_SCORER_PRECISION", "check_scorer_precision", "compute_metrics",
           "check_metric_names", "get_metric", "is_image_metric", "needs_explicit_reference", "register_metric",
           "register_feature_space", "mean_score_metric", "load_plugins"]

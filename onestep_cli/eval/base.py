"""What every metric shares: its result with provenance, the context it runs in, and the two kinds of metric.

A *low-dimensional* metric is a function of a float tensor of samples and the context (the analytic teacher).
An *image* metric reads one or more *feature spaces* (a network applied to every image: Inception pool features,
CLIP embeddings, a per-image score such as the aesthetic prediction) and turns the features of the samples (and of a
reference, when it compares distributions) into one number. Feature spaces are computed once per evaluation and
shared between metrics (fid and kid both read `inception`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from ..errors import OnestepError


class MetricError(OnestepError, ValueError):
    """A metric that cannot be computed here, with the reason and what to do (exit code 2: change the command)."""

    exit_code = 2


@dataclass
class MetricResult:
    name: str
    value: float
    provenance: dict = field(default_factory=dict)


FID_MODES = ("edm", "clean", "legacy_tensorflow")
DEFAULT_FID_MODE = "edm"
SCORER_PRECISIONS = ("fp32", "tf32", "bf16")  # Arithmetic of the per-image scorers (eval/scorer_precision.py).
DEFAULT_SCORER_PRECISION = "fp32"


@dataclass
class MetricContext:
    """Everything besides the samples that a metric may need; all optional."""

    teacher: Any = None  # Analytic teacher of low-dimensional metrics.
    reference: Any = None  # A `Reference` (statistics file or images) for distribution metrics.
    prompts: list[str] | None = None  # One per image, in the source's order.
    prompts_path: str | None = None
    labels: np.ndarray | None = None  # Class indices of samples given as a tensor/array (sources carry their own).
    fid_mode: str = DEFAULT_FID_MODE  # Preprocessing protocol in front of the Inception network.
    scorer_precision: str = DEFAULT_SCORER_PRECISION  # Arithmetic of the per-image scorers; features stay fp32.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64  # Images per network call.
    weights: dict[str, str] = field(default_factory=dict)  # Weight-set key -> user path, instead of the cache.
    options: dict[str, str] = field(default_factory=dict)  # "metric.option" -> value (e.g. clip_score.model).
    cache: dict = field(default_factory=dict)  # Networks loaded during this evaluation, shared between spaces.

    def __post_init__(self):
        if self.fid_mode not in FID_MODES:
            raise MetricError(f"FID mode '{self.fid_mode}' is not one of {', '.join(FID_MODES)}.")
        check_scorer_precision(self.scorer_precision)
        self.device = torch.device(self.device)

    def weights_override(self, key: str) -> Path | None:
        return Path(self.weights[key]) if key in self.weights else None


def check_scorer_precision(precision: str) -> None:
    """Refuse a scorer precision other than fp32, tf32 or bf16, naming the option."""
    if precision not in SCORER_PRECISIONS:
        raise MetricError(f"--scorer-precision {precision!r} is not one of {', '.join(SCORER_PRECISIONS)}; fp32 (the "
                          "default) scores in strict float32, tf32 lets CUDA matmuls use TF32, bf16 runs the scorers "
                          "under bfloat16 autocast.")


class FeatureExtractor:
    """A network applied to every image. Subclasses set `space`, `key` and `provenance` and implement `extract`."""

    space: str  # Registered feature-space name ("inception", "clip", "aesthetic", ...).
    key: str  # `space` plus whatever changes the features (e.g. "inception[edm]"): the cache key of reference stats.
    needs_prompts: bool = False
    needs_labels: bool = False  # If true, `extract` also receives `labels=` (class indices [B]).
    arithmetic = None  # The scorers' ScorerArithmetic (--scorer-precision); None: the network runs in fp32.
    provenance: dict

    def extract(self, images: np.ndarray, prompts: list[str] | None = None) -> np.ndarray:
        """uint8 images [B, H, W, 3] (and their prompts) -> float features [B, D]."""
        raise NotImplementedError


@dataclass(frozen=True)
class FeatureSpace:
    name: str
    description: str
    build: Callable[[MetricContext], FeatureExtractor]  # Loads the network; raises MissingWeightsError without it.
    distribution: bool = False  # Meaningful as a distribution, so fd_<name> is offered.
    needs_prompts: bool = False
    # Statistics to compare with when no --ref is given (e.g. a dataset shipped with the package); None: --ref needed.
    default_reference: Callable[[FeatureExtractor], Any] | None = None


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["lowdim", "image"]
    description: str
    # Low-dimensional metrics: (samples [N, ...] float tensor, context) -> MetricResult.
    compute: Callable[[torch.Tensor, MetricContext], MetricResult] | None = None
    # Image metrics: the spaces read on the samples, and (features, reference statistics, context) -> MetricResult.
    # `features` maps space name -> [N, D] array; `reference` maps space name -> ReferenceStats (or is empty).
    spaces: tuple[str, ...] = ()
    needs_reference: bool = False
    needs_reference_features: bool = False  # Reads the reference's features, not only mu/sigma (kid, precision).
    needs_prompts: bool = False
    finish: Callable[[dict, dict, MetricContext], MetricResult] | None = None

"""Metrics behind one entry point: `compute_metrics(names, samples, teacher)` returns values with provenance."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..denoisers.gmm import GaussianMixtureDenoiser
from .lowdim import mode_coverage, sliced_wasserstein

SWD_PROJECTIONS = 512
REFERENCE_SEED = 0  # Seed of the exact teacher samples the swd compares against.


@dataclass
class MetricResult:
    name: str
    value: float
    provenance: dict = field(default_factory=dict)


class MetricError(ValueError):
    """A metric that cannot be computed here, with the reason and what to do."""


def _need_mixture(name: str, teacher) -> GaussianMixtureDenoiser:
    if not isinstance(teacher, GaussianMixtureDenoiser):
        raise MetricError(f"Metric '{name}' compares against an analytic mixture teacher (teacher.kind: gmm); "
                          "this source's teacher is not one.")
    return teacher


def _swd(samples, teacher) -> MetricResult:
    mixture = _need_mixture("swd", teacher)
    n = samples.shape[0]
    reference = mixture.sample(n, torch.Generator().manual_seed(REFERENCE_SEED))
    second = mixture.sample(n, torch.Generator().manual_seed(REFERENCE_SEED + 1))
    value = sliced_wasserstein(samples, reference, SWD_PROJECTIONS)
    return MetricResult("swd", value, {
        "reference": "exact samples of the teacher mixture", "reference_seed": REFERENCE_SEED,
        "num_samples": n, "num_projections": SWD_PROJECTIONS,
        # The same distance between two exact sample sets: the floor a perfect generator reaches at this size.
        "exact_vs_exact": sliced_wasserstein(second, reference, SWD_PROJECTIONS),
    })


def _mode_coverage(samples, teacher) -> MetricResult:
    mixture = _need_mixture("mode_coverage", teacher)
    return MetricResult("mode_coverage", mode_coverage(samples, mixture), {
        "num_samples": samples.shape[0], "num_components": len(mixture.weights),
        "rule": "component covered if it receives >= 0.5 of its fair share (argmax posterior assignment)",
    })


METRICS = {"swd": _swd, "mode_coverage": _mode_coverage}


def check_metric_names(names: list[str]) -> None:
    for name in names:
        if name not in METRICS:
            hint = difflib.get_close_matches(name, METRICS, n=1)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            raise MetricError(f"Unknown metric '{name}'.{did_you_mean} Available: {', '.join(METRICS)}.")


def compute_metrics(names: list[str], samples: torch.Tensor, teacher) -> dict[str, MetricResult]:
    """Compute each named metric on `samples` (float tensor [num, ...]); non-finite samples are an error."""
    check_metric_names(names)
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples.reshape(samples.shape[0], -1))).any(dim=1).sum())
        raise MetricError(f"{bad} of {samples.shape[0]} samples contain NaN or inf; metrics would be meaningless.")
    results = {}
    for name in names:
        result = METRICS[name](samples, teacher)
        result.provenance = {"metric": name, "backend": f"onestep {__version__}", **result.provenance}
        results[name] = result
    return results

"""`compute_metrics`: named metrics of samples held in memory (low-dimensional tensors, images or an ImageSource)."""

from __future__ import annotations

import torch

from ..version import __version__
from . import registry
from .base import MetricContext, MetricError, MetricResult


def compute_metrics(names: list[str], samples, teacher=None, context: MetricContext | None = None
                    ) -> dict[str, MetricResult]:
    """Compute each named metric on `samples`: a float tensor [num, ...] for low-dimensional metrics; for image
    metrics, images ([-1, 1] float [N, C, H, W] or uint8) or an ImageSource. Non-finite samples are an error."""
    registry.check_metric_names(names)
    ctx = context if context is not None else MetricContext()
    if teacher is not None:
        ctx.teacher = teacher
    metrics = [registry.get_metric(name) for name in names]
    results: dict[str, MetricResult] = {}
    lowdim = [m for m in metrics if m.kind == "lowdim"]
    images = [m for m in metrics if m.kind == "image"]
    if lowdim:
        if not isinstance(samples, torch.Tensor):
            raise MetricError(f"Metric '{lowdim[0].name}' needs the samples as a tensor, not {type(samples).__name__}.")
        if not torch.isfinite(samples).all():
            bad = int((~torch.isfinite(samples.reshape(samples.shape[0], -1))).any(dim=1).sum())
            raise MetricError(f"{bad} of {samples.shape[0]} samples contain NaN or inf; metrics would be meaningless.")
        for metric in lowdim:
            results[metric.name] = metric.compute(samples, ctx)
    if images:
        from ..sample_io import ImageSource, array_source
        from .image_eval import compute_image_metrics

        source = samples if isinstance(samples, ImageSource) else array_source(samples, "samples",
                                                                                labels=ctx.labels)
        image_results, _, _ = compute_image_metrics(images, source, ctx, registry.FEATURE_SPACES)
        results.update(image_results)
    for name, result in results.items():
        result.provenance = {"metric": name, "onestep": __version__, "backend": f"onestep {__version__}",
                             **result.provenance}
    return {name: results[name] for name in names}

"""Improved precision and recall (Kynkäänniemi et al. 2019), as StyleGAN2-ADA's metrics/precision_recall.py.

Each feature set spans a manifold: the union of balls around its points, each ball reaching that point's k-th nearest
neighbour in the same set. Precision is the fraction of generated features inside the reference's manifold (are the
samples realistic?); recall the fraction of reference features inside the generated manifold (is the reference's
variety covered?). Distances are Euclidean, in float64, over every feature (no subsampling); the N x M distance matrix
is never held at once, only blocks of rows against all columns.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import MetricContext, MetricError, MetricResult

PR_NEIGHBOURHOOD = 3  # k of the k-NN balls: the paper's and StyleGAN's nhood_size.
PR_SPACE = "inception"  # Pool3 features, shared with fid/kid (StyleGAN's pr50k3 uses VGG16 features instead).
DISTANCE_BLOCK_ELEMENTS = 1 << 24  # Distances per block: 16M float64 = 128 MiB (335 rows of 50k columns).


def _rows_per_block(num_cols: int, row_batch: int | None) -> int:
    return row_batch if row_batch is not None else max(1, DISTANCE_BLOCK_ELEMENTS // num_cols)


def knn_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, row_batch: int | None = None) -> torch.Tensor:
    """Distance from each of the [N, D] `features` to its k-th nearest neighbour among the others ([N])."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k-NN radii with k={k} need more than k points; got {features.shape[0]}.")
    rows = _rows_per_block(features.shape[0], row_batch)
    # The (k+1)-th smallest distance of a row: its smallest is the point itself, at 0.
    return torch.cat([torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(rows)])


def manifold_fraction(probes, manifold, k: int = PR_NEIGHBOURHOOD, row_batch: int | None = None,
                      device: torch.device | str = "cpu") -> float:
    """Fraction of `probes` [N, D] within the k-NN radius of at least one point of `manifold` [M, D] (inclusive, as
    StyleGAN): precision with probes = generated and manifold = reference features, recall the other way round.
    `row_batch` is the number of rows of each distance block (default: a 128 MiB block)."""
    probes = torch.as_tensor(np.asarray(probes), dtype=torch.float64, device=device)
    manifold = torch.as_tensor(np.asarray(manifold), dtype=torch.float64, device=device)
    if probes.ndim != 2 or manifold.ndim != 2 or probes.shape[1] != manifold.shape[1]:
        raise ValueError(f"Precision/recall between features of shapes {tuple(probes.shape)} and "
                         f"{tuple(manifold.shape)}; both must be [N, D] with the same D.")
    radii = knn_radii(manifold, k, row_batch)
    rows = _rows_per_block(manifold.shape[0], row_batch)
    inside = [(torch.cdist(block, manifold) <= radii).any(dim=1) for block in probes.split(rows)]
    return float(torch.cat(inside).double().mean())


def _neighbourhood(metric: str, ctx: MetricContext) -> int:
    raw = ctx.options.get(f"{metric}.k")
    if raw is None:
        return PR_NEIGHBOURHOOD
    if not raw.strip().isdigit() or int(raw) < 1:
        raise MetricError(f"--option {metric}.k={raw} is not a positive integer; it is the number of nearest "
                          f"neighbours whose distance sets each ball's radius (default {PR_NEIGHBOURHOOD}).")
    return int(raw)


def _finish(metric: str, features: dict, reference: dict, ctx: MetricContext) -> MetricResult:
    generated, real = features[PR_SPACE], reference[PR_SPACE].features
    k = _neighbourhood(metric, ctx)
    if metric == "precision":  # Are the samples realistic: inside the reference's manifold?
        probes, manifold, probe_kind, manifold_kind = generated, real, "generated", "reference"
    else:  # Is the reference covered: inside the samples' manifold?
        probes, manifold, probe_kind, manifold_kind = real, generated, "reference", "generated"
    if manifold.shape[0] <= k:
        raise MetricError(f"{metric} with k={k} needs more than {k} {manifold_kind} images (each one's ball reaches "
                          f"its k-th nearest neighbour); there are {manifold.shape[0]}. Use more images, or a smaller "
                          f"k (--option {metric}.k=N).")
    value = manifold_fraction(probes, manifold, k, device=ctx.device)
    return MetricResult(metric, value, {
        "k": k, "num_real": int(real.shape[0]), "num_generated": int(generated.shape[0]),
        "feature_space": PR_SPACE, "subset": "all features (no subsampling)",
        "rule": f"fraction of {probe_kind} features within the distance of some {manifold_kind} feature to its k-th "
                f"nearest {manifold_kind} neighbour (Kynkäänniemi et al. 2019)",
        "distance": f"Euclidean, float64 on {ctx.device.type}, rows in blocks of "
                    f"{_rows_per_block(manifold.shape[0], None)}",
    })


def finish_precision(features: dict, reference: dict, ctx: MetricContext) -> MetricResult:
    """Improved precision of the generated Inception features against the reference's."""
    return _finish("precision", features, reference, ctx)


def finish_recall(features: dict, reference: dict, ctx: MetricContext) -> MetricResult:
    """Improved recall of the reference's Inception features by the generated ones."""
    return _finish("recall", features, reference, ctx)

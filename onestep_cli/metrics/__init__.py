"""Metrics behind one entry point: `compute_metrics(names, samples, teacher, context)` returns values with provenance.

Two registries: METRICS (name -> Metric) and FEATURE_SPACES (name -> FeatureSpace). Every distribution space `X`
also offers the metric `fd_X` (Fréchet distance in that space). Other packages add their own with
`register_metric` / `register_feature_space` (see docs/metrics.md).
"""

from __future__ import annotations

import difflib

import torch

from .. import __version__
from ..denoisers.gmm import GaussianMixtureDenoiser
from .base import (DEFAULT_FID_MODE, FID_MODES, FeatureExtractor, FeatureSpace, Metric, MetricContext, MetricError,
                   MetricResult)
from .distances import (IS_SPLITS, KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, feature_stats, frechet_distance,
                        inception_score, kernel_inception_distance)
from .lowdim import mode_coverage, sliced_wasserstein
from .precision_recall import finish_precision, finish_recall
from .weights import MissingWeightsError, WeightsError

SWD_PROJECTIONS = 512
REFERENCE_SEED = 0  # Seed of the exact teacher samples the swd compares against.
FD_PREFIX = "fd_"

__all__ = ["METRICS", "FEATURE_SPACES", "Metric", "FeatureSpace", "FeatureExtractor", "MetricContext", "MetricError",
           "MetricResult", "MissingWeightsError", "WeightsError", "FID_MODES", "DEFAULT_FID_MODE", "compute_metrics",
           "check_metric_names", "get_metric", "is_image_metric", "needs_explicit_reference", "register_metric",
           "register_feature_space", "mean_score_metric"]


# ---------------------------------------------------------------------------------------------------------------------
# Low-dimensional metrics of the analytic mixture


def _need_mixture(name: str, teacher) -> GaussianMixtureDenoiser:
    if not isinstance(teacher, GaussianMixtureDenoiser):
        raise MetricError(f"Metric '{name}' compares against an analytic mixture teacher (teacher.kind: gmm); "
                          "this source's teacher is not one.")
    return teacher


def _swd(samples, ctx: MetricContext) -> MetricResult:
    mixture = _need_mixture("swd", ctx.teacher)
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


def _mode_coverage(samples, ctx: MetricContext) -> MetricResult:
    mixture = _need_mixture("mode_coverage", ctx.teacher)
    return MetricResult("mode_coverage", mode_coverage(samples, mixture), {
        "num_samples": samples.shape[0], "num_components": len(mixture.weights),
        "rule": "component covered if it receives >= 0.5 of its fair share (argmax posterior assignment)",
    })


# ---------------------------------------------------------------------------------------------------------------------
# Image metrics


def _fid(features, reference, ctx) -> MetricResult:
    mu, sigma = feature_stats(features["inception"])
    ref = reference["inception"]
    return MetricResult("fid", frechet_distance(mu, sigma, ref.mu, ref.sigma),
                        {"formula": "|mu-mu_r|^2 + tr(S + S_r - 2 sqrt(S S_r)), sqrt via symmetric eigendecomposition",
                         **_edm_protocol_note(ctx, features["inception"].shape[0])})


def _edm_protocol_note(ctx: MetricContext, num: int) -> dict:
    if ctx.fid_mode != "edm":
        return {}
    return {"protocol": "EDM (50k samples, seeds 0-49999)" if num == 50000 else
            f"EDM preprocessing on {num} samples (EDM reports 50k, seeds 0-49999)"}


def _kid(features, reference, ctx) -> MetricResult:
    value = kernel_inception_distance(features["inception"], reference["inception"].features)
    return MetricResult("kid", value, {"kernel": "(x.y/d + 1)^3, unbiased MMD^2", "num_subsets": KID_SUBSETS,
                                       "max_subset_size": KID_SUBSET_SIZE, "subset_seed": KID_SEED})


def _is(features, reference, ctx) -> MetricResult:
    mean, std = inception_score(features["inception_probs"])
    return MetricResult("is", mean, {"std_over_splits": std, "num_splits": IS_SPLITS})


def _fd(space: str):
    def finish(features, reference, ctx) -> MetricResult:
        mu, sigma = feature_stats(features[space])
        ref = reference[space]
        return MetricResult(f"{FD_PREFIX}{space}", frechet_distance(mu, sigma, ref.mu, ref.sigma),
                            {"formula": "Fréchet distance of Gaussian fits, as FID", "feature_dim": int(mu.shape[0])})
    return finish


def mean_score_metric(name: str, space: str, description: str, needs_prompts: bool = False) -> Metric:
    """A metric that averages a per-image score (a feature space of dimension 1)."""

    def finish(features, reference, ctx) -> MetricResult:
        scores = features[space][:, 0]
        return MetricResult(name, float(scores.mean()), {
            "aggregate": "mean over images", "std": float(scores.std(ddof=1)) if scores.size > 1 else 0.0,
            "min": float(scores.min()), "max": float(scores.max())})

    return Metric(name, "image", description, spaces=(space,), needs_prompts=needs_prompts, finish=finish)


def _spaces():
    from .clip import AestheticScore, CLIPImageFeatures, CLIPScore
    from .hpsv2 import HPSv2Score
    from .imagereward import ImageRewardScore
    from .inception import InceptionFeatures, InceptionProbabilities
    from .transformers_models import DINOv2Features, PickScore

    return [
        FeatureSpace("inception", "Inception-v3 pool3 features (FID network)", InceptionFeatures, distribution=True),
        FeatureSpace("inception_probs", "Inception-v3 class probabilities", InceptionProbabilities),
        FeatureSpace("clip", "OpenAI CLIP ViT-L/14 image embeddings", CLIPImageFeatures, distribution=True),
        FeatureSpace("dinov2", "DINOv2 ViT-L/14 CLS features (EDM2's fd_dinov2)", DINOv2Features, distribution=True),
        FeatureSpace("clip_score", "CLIP score of each image with its prompt", CLIPScore, needs_prompts=True),
        FeatureSpace("aesthetic", "LAION aesthetic prediction of each image", AestheticScore),
        FeatureSpace("imagereward", "ImageReward v1.0 of each image with its prompt", ImageRewardScore,
                     needs_prompts=True),
        FeatureSpace("pickscore", "PickScore_v1 of each image with its prompt", PickScore, needs_prompts=True),
        FeatureSpace("hpsv2", "HPS v2.1 (or v2.0) of each image with its prompt", HPSv2Score, needs_prompts=True),
    ]


METRICS: dict[str, Metric] = {}
FEATURE_SPACES: dict[str, FeatureSpace] = {}


def register_metric(metric: Metric, replace: bool = False) -> None:
    """Add a metric to METRICS (an error if the name is taken, unless `replace`)."""
    if metric.name in METRICS and not replace:
        raise ValueError(f"Metric '{metric.name}' is already registered.")
    METRICS[metric.name] = metric


def register_feature_space(space: FeatureSpace, replace: bool = False) -> None:
    """Add a feature space; a distribution space `X` also makes `fd_X` available."""
    if space.name in FEATURE_SPACES and not replace:
        raise ValueError(f"Feature space '{space.name}' is already registered.")
    FEATURE_SPACES[space.name] = space


for _metric in [
    Metric("swd", "lowdim", "sliced Wasserstein-2 distance to exact teacher samples (analytic mixture)", compute=_swd),
    Metric("mode_coverage", "lowdim", "fraction of mixture components covered", compute=_mode_coverage),
    Metric("fid", "image", "Fréchet Inception Distance", spaces=("inception",), needs_reference=True, finish=_fid),
    Metric("kid", "image", "Kernel Inception Distance", spaces=("inception",), needs_reference=True,
           needs_reference_features=True, finish=_kid),
    Metric("precision", "image", "improved precision: generated Inception features inside the reference's k-NN "
           "manifold", spaces=("inception",), needs_reference=True, needs_reference_features=True,
           finish=finish_precision),
    Metric("recall", "image", "improved recall: reference Inception features inside the generated k-NN manifold",
           spaces=("inception",), needs_reference=True, needs_reference_features=True, finish=finish_recall),
    Metric("is", "image", "Inception Score", spaces=("inception_probs",), finish=_is),
    mean_score_metric("clip_score", "clip_score", "CLIP score (100 * cosine) with the prompt", needs_prompts=True),
    mean_score_metric("aesthetic", "aesthetic", "LAION improved aesthetic predictor"),
    mean_score_metric("imagereward", "imagereward", "ImageReward v1.0 with the prompt", needs_prompts=True),
    mean_score_metric("pickscore", "pickscore", "PickScore_v1 with the prompt", needs_prompts=True),
    mean_score_metric("hpsv2", "hpsv2", "HPS v2.1 (or v2.0) raw cosine with the prompt", needs_prompts=True),
]:
    register_metric(_metric)
for _space in _spaces():
    register_feature_space(_space)


def get_metric(name: str) -> Metric:
    """The registered metric, or the Fréchet distance `fd_<space>` of a distribution feature space."""
    if name in METRICS:
        return METRICS[name]
    space = FEATURE_SPACES.get(name[len(FD_PREFIX):]) if name.startswith(FD_PREFIX) else None
    if space is not None and space.distribution:
        return Metric(name, "image", f"Fréchet distance in {space.name} features", spaces=(space.name,),
                      needs_reference=True, finish=_fd(space.name))
    available = list(METRICS) + [f"{FD_PREFIX}{s}" for s, fs in FEATURE_SPACES.items() if fs.distribution]
    hint = difflib.get_close_matches(name, available, n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    raise MetricError(f"Unknown metric '{name}'.{did_you_mean} Available: {', '.join(available)}.")


def check_metric_names(names: list[str]) -> None:
    for name in names:
        get_metric(name)


def is_image_metric(name: str) -> bool:
    return get_metric(name).kind == "image"


def needs_explicit_reference(metric: Metric) -> bool:
    """Whether `metric` needs --ref: it compares distributions and some space it reads has no default reference."""
    return metric.needs_reference and any(FEATURE_SPACES[s].default_reference is None for s in metric.spaces)


def compute_metrics(names: list[str], samples, teacher=None, context: MetricContext | None = None
                    ) -> dict[str, MetricResult]:
    """Compute each named metric on `samples`: a float tensor [num, ...] for low-dimensional metrics; for image
    metrics, images ([-1, 1] float [N, C, H, W] or uint8) or an ImageSource. Non-finite samples are an error."""
    check_metric_names(names)
    ctx = context if context is not None else MetricContext()
    if teacher is not None:
        ctx.teacher = teacher
    metrics = [get_metric(name) for name in names]
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
        image_results, _, _ = compute_image_metrics(images, source, ctx, FEATURE_SPACES)
        results.update(image_results)
    for name, result in results.items():
        result.provenance = {"metric": name, "onestep": __version__, "backend": f"onestep {__version__}",
                             **result.provenance}
    return {name: results[name] for name in names}


# Domain metrics of the shipped digits teachers (fd_digits, class_accuracy, prompt_accuracy); imported last, they use
# the registry above.
from ..digits import registration as _digits_registration  # noqa: E402,F401

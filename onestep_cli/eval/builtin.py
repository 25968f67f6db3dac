"""The built-in metrics: sliced Wasserstein distance and mode coverage of the analytic mixture; FID, KID, precision,
recall, IS and the Fréchet distance of any distribution feature space; CLIP, aesthetic, ImageReward, PickScore and
HPSv2 scores."""

from __future__ import annotations

import torch

from ..denoisers.gmm import GaussianMixtureDenoiser
from .base import FeatureSpace, Metric, MetricContext, MetricError, MetricResult
from .distances import (IS_SPLITS, KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, feature_stats, frechet_distance,
                        inception_score, kernel_inception_distance)
from .lowdim import mode_coverage, sliced_wasserstein
from .precision_recall import finish_precision, finish_recall

SWD_PROJECTIONS = 512
REFERENCE_SEED = 0  # Seed of the exact teacher samples the swd compares against.
FD_PREFIX = "fd_"


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


def frechet_finish(space: str):
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


def builtin_spaces() -> list[FeatureSpace]:
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


BUILTIN_METRICS = [
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
]

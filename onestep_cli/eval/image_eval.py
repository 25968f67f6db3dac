"""Image metrics over one pass of a source: load every feature network first (so a missing weight file stops the run
before any image is read), stream the images once through all of them, then finish each metric.

Several processes (torchrun, srun, `onestep eval --gpus N`) share the pass: each extracts the features of a
contiguous run of whole batches (`shard_bounds`), rank 0 gathers them in image order and finishes the metrics alone.
"""

from __future__ import annotations

import numpy as np

from ..runtime.distributed import SINGLE, DistEnv, gather_rows
from .base import FeatureExtractor, Metric, MetricContext, MetricError, MetricResult


def shard_bounds(num: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Images start..stop-1 of process `rank` of `world_size`: whole batches of the one-process pass, split as evenly as
    possible (the first ranks take one more), so every network call sees the images it sees in one process and the
    features are the same bit for bit. A rank may get none (fewer batches than processes)."""
    batches = -(-num // batch_size)
    base, extra = divmod(batches, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return min(first * batch_size, num), min(last * batch_size, num)


def extract_all(source, extractors: dict[str, FeatureExtractor], batch_size: int,
                prompts: list[str] | None = None, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    """Features of images start..stop-1 of `source` (all by default) in each space: {space: [N, D] float32} (the
    networks' precision; statistics are then taken in float64). No images give [0, 0] arrays."""
    chunks: dict[str, list[np.ndarray]] = {space: [] for space in extractors}
    for first, images in source.batches(batch_size, start, stop):
        batch_prompts = prompts[first:first + len(images)] if prompts is not None else None
        for space, extractor in extractors.items():
            extra = {"labels": source.labels(first, first + len(images))} if extractor.needs_labels else {}
            features = np.asarray(extractor.extract(images, batch_prompts if extractor.needs_prompts else None,
                                                    **extra))
            if features.ndim != 2 or features.shape[0] != len(images):
                raise MetricError(f"Feature space '{space}' returned shape {features.shape} for {len(images)} images.")
            if not np.isfinite(features).all():
                raise MetricError(f"Feature space '{space}' produced NaN or inf on images {first}-"
                                  f"{first + len(images) - 1} of {source.description}.")
            chunks[space].append(features.astype(np.float32))
    return {space: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for space, parts in chunks.items()}


def extract_shared(source, extractors: dict[str, FeatureExtractor], batch_size: int, prompts: list[str] | None,
                   env: DistEnv) -> dict[str, np.ndarray] | None:
    """`extract_all` split over the processes of `env`: every image's features on rank 0, in image order; None on the
    other ranks. An error on any rank (a corrupt file, NaN features) is raised by rank 0."""
    start, stop = shard_bounds(source.num, batch_size, env.rank, env.world_size)
    try:
        features = extract_all(source, extractors, batch_size, prompts, start, stop)
    except Exception as exc:
        if not env.is_distributed:
            raise
        features = exc  # Handed to the gather, so that the other ranks stop too instead of waiting for this one.
    return gather_rows(features, env)


def compute_image_metrics(metrics: list[Metric], source, ctx: MetricContext, spaces_registry: dict,
                          extra_spaces: tuple[str, ...] = (), env: DistEnv = SINGLE
                          ) -> tuple[dict[str, MetricResult], dict, dict] | None:
    """Results of image `metrics` on `source`, plus the features and extractors of every space read (including
    `extra_spaces`, e.g. to save reference statistics). `spaces_registry` maps space names to FeatureSpace.

    With several processes in `env`, every rank calls this: each extracts its shard of the images, and rank 0 gathers
    the features and returns the results (reference images are read by rank 0 alone); the other ranks return None."""
    needs_prompts = [m.name for m in metrics if m.needs_prompts]
    if needs_prompts and ctx.prompts is None:
        raise MetricError(f"Metric {', '.join(map(repr, needs_prompts))} scores each image against its prompt; pass "
                          "--prompts FILE with one prompt per image (sorted file-name order for folders).")
    pairing = None
    if ctx.prompts is not None:
        from ..sample_io import pair_prompts

        pairing = pair_prompts(source, ctx.prompts, ctx.prompts_path)
    if ctx.reference is not None:  # --ref serves every distribution metric...
        if any(m.needs_reference for m in metrics):
            ctx.reference.check_resolution(source.resolution, source.description)
    else:  # ...without it, only those whose feature spaces bring a default reference can run.
        lacking = [m.name for m in metrics if m.needs_reference and
                   any(spaces_registry[s].default_reference is None for s in m.spaces)]
        if lacking:
            raise MetricError(f"Metric {', '.join(map(repr, lacking))} compares with a reference; pass --ref with "
                              "reference statistics (an EDM-style .npz of mu/sigma), a folder of images or an .npz "
                              "of images, at the samples' resolution.")

    spaces = list(dict.fromkeys([s for m in metrics for s in m.spaces] + list(extra_spaces)))
    extractors = {space: spaces_registry[space].build(ctx) for space in spaces}  # Every network before any work.
    labelled = [s for s, e in extractors.items() if e.needs_labels]
    if labelled and not source.has_labels:
        raise MetricError(f"Feature space {', '.join(map(repr, labelled))} compares images with their class labels, "
                          f"but {source.description} has none: use a class-conditional generator, or an .npz with a "
                          "'labels' array.")
    extract_reference = lambda src, ex: extract_all(src, {ex.space: ex}, ctx.batch_size)[ex.space]
    wanted = [(metric, space) for metric in metrics if metric.needs_reference for space in metric.spaces]
    reference_stats = lambda metric, space: ctx.reference.stats(
        extractors[space], extract_reference, features_for=metric.name if metric.needs_reference_features else None)
    if ctx.reference is not None and ctx.reference.kind == "stats":  # Read (and check) the file before any work.
        for metric, space in wanted:
            reference_stats(metric, space)
    features = extract_shared(source, extractors, ctx.batch_size, ctx.prompts, env)
    if features is None:  # Not rank 0: its features are with rank 0, which finishes the metrics.
        return None
    reference = {}
    for metric, space in wanted:
        if ctx.reference is None:  # The space's own default (checked above that it has one).
            reference[space] = spaces_registry[space].default_reference(extractors[space])
        else:
            stats = reference_stats(metric, space)
            if stats.mu.shape[0] != features[space].shape[1]:
                raise MetricError(f"Reference '{space}' statistics have dimension {stats.mu.shape[0]} but the "
                                  f"features have {features[space].shape[1]}; the reference was made with another "
                                  "network.")
            reference[space] = stats

    common = {**source.provenance(), "num_samples": source.num}
    if pairing:
        common["prompt_pairing"] = pairing
    results = {}
    for metric in metrics:
        result = metric.finish(features, reference, ctx)
        spaces_prov = {s: extractors[s].provenance for s in metric.spaces}
        reference_prov = {k: v for s in metric.spaces if s in reference for k, v in reference[s].provenance.items()}
        result.provenance = {**common, **(next(iter(spaces_prov.values())) if len(spaces_prov) == 1 else
                                          {"spaces": spaces_prov}), **reference_prov, **result.provenance}
        results[metric.name] = result
    return results, features, extractors

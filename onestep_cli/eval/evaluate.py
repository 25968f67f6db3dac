"""`evaluate`: metrics of a generator (run or checkpoint, generated in memory) or of stored samples (a folder of
images, an .npz), with provenance."""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch

from ..version import __version__
from ..config import ConfigError, is_preset, resolve_config
from ..errors import InputError, MissingFileError, UsageError
from ..runtime import distributed
from ..runs.loading import is_generator_source, load_generator_source
from ..runs.networks import build_teacher
from ..runs.run_dir import RunDir
from . import (DEFAULT_FID_MODE, DEFAULT_SCORER_PRECISION, FEATURE_SPACES, MetricContext, MetricError,
               check_metric_names, check_scorer_precision, compute_metrics, get_metric, needs_explicit_reference)
from ..denoisers.diffusers.prompts import read_prompts
from ..sample_io import (SAMPLES_META, SAMPLES_NPZ, SourceError, folder_source, format_seeds, is_image_shape,
                         list_image_files, meta_summary, npz_image_source, read_samples, recorded_prompts)
from ..sampling import generate, generator_source, generator_steps

DEFAULT_NUM = 2000  # Samples generated for low-dimensional metrics when neither --num nor --seeds is given.
DEFAULT_IMAGE_NUM = 50000  # Images generated for image metrics by default: the EDM protocol (seeds 0-49999).
DEFAULT_BATCH = 64


def teacher_from_reference(ref: str):
    """The teacher named by --ref: a run directory, a preset name, or a YAML config file."""
    path = Path(ref)
    if RunDir(path).is_run():
        return build_teacher(RunDir(path).read_config().teacher)
    if path.suffix in (".yaml", ".yml"):
        return build_teacher(resolve_config(config_file=path).teacher)
    if is_preset(ref):
        return build_teacher(resolve_config(ref).teacher)
    raise ConfigError(f"--ref {ref} is neither a run directory, a YAML config file nor a preset name.")


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(source: Path, metrics: list[str], num: int | None = None, seeds: list[int] | None = None,
             ref: str | None = None, *, prompts: Path | None = None, fid_mode: str = DEFAULT_FID_MODE,
             batch_size: int = DEFAULT_BATCH, device: str | torch.device = "auto", precision: str = "fp32",
             weights: dict[str, str] | None = None, options: dict[str, str] | None = None,
             save_stats: Path | None = None, compile_generator: bool = False,
             scorer_precision: str = DEFAULT_SCORER_PRECISION) -> dict | None:
    """Compute `metrics` on `source`; returns {"source", "metrics": {name: value}, "provenance": {...}}.

    Sources: a run directory or checkpoint (samples generated in memory from `seeds`, default 0..num-1), a folder
    of images (sorted file names), an .npz of images or of low-dimensional samples, a folder with samples.npz.
    Image metrics take `ref` (reference statistics .npz, or images), `prompts` (one line per image), `fid_mode`,
    `weights` (weight-set key -> local path instead of the cache) and `options` ("metric.option" -> value);
    `save_stats` writes the source's feature statistics as a reference file (EDM's mu/sigma format);
    `compile_generator` compiles a generator source's blocks first (as train.compile; channels_last on CUDA);
    `scorer_precision` (fp32, tf32 or bf16) is the arithmetic of the per-image scorers (eval/scorer_precision.py).

    Under torchrun or srun (or in a process group the caller set up) every process calls this for image metrics: each
    generates or reads a contiguous run of whole batches of the images and extracts their features on its own device
    (cuda:LOCAL_RANK, or CPU with gloo); rank 0 gathers them in image order, computes the metrics exactly as one
    process does and returns the result, recording `processes`; the other ranks return None.
    """
    check_scorer_precision(scorer_precision)
    image_metrics = _check_source_and_metrics(source, metrics, save_stats)
    source = Path(source)
    if image_metrics:
        env, device, initialised = _join_processes(device)
        try:
            return _evaluate_images(source, metrics, num, seeds, ref, prompts, fid_mode, batch_size, device,
                                    precision, weights or {}, options or {}, save_stats, env, compile_generator,
                                    scorer_precision)
        finally:
            distributed.shutdown(initialised)
    if prompts is not None:
        raise MetricError("--prompts pairs prompts with images; none of the requested metrics uses them.")
    if (distributed.launcher_env() or distributed.current()).is_distributed:
        check_splittable(source, metrics, save_stats)
    return _evaluate_lowdim(source, metrics, num, seeds, ref)


def _check_source_and_metrics(source: Path, metrics: list[str], save_stats: Path | None) -> bool:
    """Whether these are image metrics (else low-dimensional), after checking the source exists and that they are
    not a mix of both."""
    check_metric_names(metrics)
    if not Path(source).exists():
        raise MissingFileError(f"Source {source} does not exist; pass a run directory, checkpoint, .npz or folder.")
    image_names = [m for m in metrics if get_metric(m).kind == "image"]
    if image_names or save_stats is not None:
        lowdim = [m for m in metrics if m not in image_names]
        if lowdim:
            raise MetricError(f"Metrics {', '.join(map(repr, lowdim))} (low-dimensional) and "
                              f"{', '.join(map(repr, image_names))} (image) cannot be computed on the same samples; "
                              "evaluate them separately.")
        return True
    return False


def check_splittable(source: Path, metrics: list[str], save_stats: Path | None = None) -> None:
    """Refuse, before any process starts, an evaluation that several processes cannot share: only image metrics are
    split (low-dimensional ones take seconds in one process)."""
    if not _check_source_and_metrics(source, metrics, save_stats):
        raise MetricError(f"Low-dimensional metrics ({', '.join(map(repr, metrics))}) are computed in one process: a "
                          "few thousand samples take seconds. Run without --gpus/--nnodes, torchrun or srun; several "
                          "processes share image metrics only.")


def _join_processes(device_choice: str | torch.device) -> tuple[distributed.DistEnv, torch.device, bool]:
    """The process group of a torchrun/srun launch (or the caller's), each rank on its own GPU; else one process."""
    device = _resolve_device(device_choice)
    if distributed.launcher_env() is None and not distributed.current().is_distributed:
        return distributed.SINGLE, device, False
    return distributed.init(str(device))


def _text_to_image_images(loaded, source, prompts, num, seeds, device, precision, description):
    """A text-to-image run's images of every prompt of --prompts with every seed (default: seed 0), generated in
    memory in `onestep sample --prompts` order, and the prompt of each image."""
    from ..sampling import prompt_major_pairs, text_to_image_source

    if prompts is None:
        raise MetricError(f"{source} is a text-to-image run: give the prompts to draw with --prompts FILE (.txt, "
                          ".jsonl or COCO .json); each prompt is drawn with every seed of --seeds (default 0).")
    texts = read_prompts(prompts)
    seeds = seeds if seeds is not None else [0]
    loaded.pipeline.pipeline.vae.to(device)
    images = text_to_image_source(loaded.generator, loaded.pipeline, texts, seeds, loaded.data_shape, device,
                                  precision, description)
    if num is not None:
        images = images.head(num)
    return images, [texts[index] for index, _ in prompt_major_pairs(len(texts), seeds)][:images.num]


def _compile_generator(generator: torch.nn.Module, device: torch.device) -> bool:
    """`--compile`: the generator's blocks compiled as train.compile does, then NHWC on CUDA (together the fastest
    one-step sampling measured, docs/benchmarks.md; eager NHWC is slower, so only when compiled)."""
    from ..runtime.precision import compile_blocks, use_channels_last

    compiled = compile_blocks([generator], device, setting="--compile")
    if compiled:  # Blocks compile at their first call, so the layout set now is the one they are traced with.
        use_channels_last([generator], device)
    return compiled


def _common() -> dict:
    return {"onestep": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _evaluate_lowdim(source: Path, metrics, num, seeds, ref) -> dict:
    common = _common()
    if is_generator_source(source):
        loaded = load_generator_source(source)
        seeds = seeds if seeds is not None else list(range(num or DEFAULT_NUM))
        samples = generate(loaded.generator, seeds, loaded.data_shape, loaded.label_dim)
        teacher = teacher_from_reference(ref) if ref else loaded.teacher
        common.update(source_kind="generator", step=loaded.step, kimg=loaded.kimg, seeds=format_seeds(seeds),
                      generation=_generation(loaded.generator))
    else:
        if source.is_dir() and not (source / SAMPLES_NPZ).is_file() and list_image_files(source):
            raise MetricError(f"{', '.join(metrics)} measure low-dimensional samples, but {source} holds images; "
                              "ask for image metrics (--metrics fid,kid,aesthetic,...).")
        samples, meta = read_samples(source)
        if num is not None:
            if num > samples.shape[0]:
                raise UsageError(f"--num {num} asks for more samples than {source} holds ({samples.shape[0]}).")
            samples = samples[:num]
        if ref:
            teacher = teacher_from_reference(ref)
        elif meta.get("source") and is_generator_source(Path(meta["source"])):
            teacher = load_generator_source(Path(meta["source"])).teacher
        else:
            raise ConfigError(f"{source} does not say which teacher it belongs to; pass --ref RUN_DIR, a preset or a "
                              "config.")
        common.update(source_kind="samples", samples_meta=meta_summary(meta, Path(source)))
    results = compute_metrics(metrics, samples, teacher)
    return _result(source, results, {**common, "num_samples": int(samples.shape[0])})


def _generation(generator) -> str:
    steps = generator_steps(generator)
    return "in memory, one step" if steps == 1 else f"in memory, {steps} steps"


def open_image_source(path: Path):
    """A folder of images, a folder holding samples.npz, or an .npz of images."""
    path = Path(path)
    if path.is_dir():
        return npz_image_source(path / SAMPLES_NPZ) if (path / SAMPLES_NPZ).is_file() else folder_source(path)
    if path.suffix == ".npz":
        return npz_image_source(path)
    raise SourceError(f"{path} is not a folder of images, an .npz, a run directory or a checkpoint.")


def _evaluate_images(source: Path, metrics, num, seeds, ref, prompts, fid_mode, batch_size, device, precision,
                     weights, options, save_stats, env: distributed.DistEnv, compile_generator: bool = False,
                     scorer_precision: str = DEFAULT_SCORER_PRECISION) -> dict | None:
    from .image_eval import compute_image_metrics
    from .reference import open_reference, write_reference_stats

    common = _common()
    if is_generator_source(source):
        loaded = load_generator_source(source, device=device)
        if loaded.pipeline is None and not is_image_shape(loaded.data_shape):  # Text-to-image: latents, decoded.
            raise MetricError(f"Image metrics need images, but {source} generates samples of shape "
                              f"{tuple(loaded.data_shape)}; use swd or mode_coverage.")
        compiled = compile_generator and _compile_generator(loaded.generator, device)
        description = f"generator of {source} (step {loaded.step})"
        if loaded.pipeline is not None:
            images, prompt_list = _text_to_image_images(loaded, source, prompts, num, seeds, device, precision,
                                                        description)
        else:
            if prompts is not None:
                raise MetricError(f"The generator of {source} takes no text prompts, so --prompts cannot be paired "
                                  "with its images; --prompts applies to text-to-image generators and to stored "
                                  "images.")
            prompt_list = None
            seeds = seeds if seeds is not None else list(range(num or DEFAULT_IMAGE_NUM))
            if num is not None and num != len(seeds):
                raise UsageError(f"--num {num} disagrees with --seeds ({len(seeds)} seeds); give one or make them "
                                 "match.")
            images = generator_source(loaded.generator, seeds, loaded.data_shape, loaded.label_dim, batch_size,
                                      device, precision, description=description)
        common.update(source_kind="generator", step=loaded.step, kimg=loaded.kimg,
                      generation=_generation(loaded.generator), precision=precision, compiled=compiled)
        if loaded.pipeline is not None:
            common.update(text_to_image="image i * len(seeds) + j is prompt i of --prompts with seed j "
                                        "(the order of `onestep sample --prompts` file names)")
    else:
        if seeds is not None:
            raise UsageError("--seeds chooses what a generator makes; for stored images use --num (the first N).")
        prompt_list = read_prompts(prompts) if prompts is not None else None
        images = open_image_source(source)
        if num is not None:
            images = images.head(num)
        if prompt_list is None:  # A folder of `onestep sample --prompts` says which prompt made each image.
            prompt_list = recorded_prompts(images)
            prompts = Path(source) / SAMPLES_META if prompt_list is not None else None
        common.update(source_kind="images", samples_meta=meta_summary(images.meta, Path(source)))
    # Ranks use cuda:0, cuda:1, ...: record the kind of device, as one process given --device auto or cuda does.
    common.update(images.provenance(), device=device.type if env.is_distributed else str(device),
                  processes=env.world_size, batch_size=batch_size)

    reference = None
    if ref is not None:
        if RunDir(Path(ref)).is_run() or is_preset(ref):
            raise MetricError(f"--ref {ref} names a teacher; image metrics compare with reference statistics or images."
                              f" Sample the teacher first (`onestep sample RUN --teacher --out DIR`) and pass DIR.")
        reference = open_reference(ref)
    ctx = MetricContext(reference=reference, prompts=prompt_list, prompts_path=str(prompts) if prompts else None,
                        fid_mode=fid_mode, device=device, batch_size=batch_size, weights=weights, options=options,
                        scorer_precision=scorer_precision)

    extra_spaces: tuple[str, ...] = ()
    to_compute = metrics  # Without --ref, metrics that need one raise a clear error in compute_image_metrics...
    if save_stats is not None:
        extra_spaces = tuple(save_stats_spaces(metrics))
        if not extra_spaces:
            raise MetricError("--save-stats writes statistics of distribution features; ask for a metric that uses "
                              "them (fid, kid, fd_clip, fd_dinov2, ...).")
        # ...unless the statistics are the point: then those metrics are skipped.
        to_compute = [m for m in metrics if reference is not None or not needs_explicit_reference(get_metric(m))]
    computed = compute_image_metrics([get_metric(m) for m in to_compute], images, ctx, FEATURE_SPACES, extra_spaces,
                                     env)
    if computed is None:  # Not rank 0: rank 0 holds the result.
        return None
    results, features, extractors = computed
    if any(getattr(e, "arithmetic", None) is not None for e in extractors.values()):
        common.update(scorer_precision=scorer_precision)  # As asked; each score's provenance says what ran.
    for name, result in results.items():
        result.provenance = {"metric": name, "onestep": __version__, **result.provenance}
    out = _result(source, results, {**common, "num_samples": images.num})
    if save_stats is not None:
        keep = {s for m in map(get_metric, metrics) if m.needs_reference_features for s in m.spaces}
        out["stats"] = write_reference_stats(
            save_stats, {s: features[s] for s in extra_spaces}, extractors, images.resolution, images.provenance(),
            keep_features=keep)
        out["skipped_without_reference"] = [m for m in metrics if m not in to_compute]
    return out


def save_stats_spaces(metrics: list[str]) -> list[str]:
    """Distribution feature spaces read by `metrics` (what --save-stats writes)."""
    spaces = [s for m in metrics for s in get_metric(m).spaces if FEATURE_SPACES[s].distribution]
    return list(dict.fromkeys(spaces))


def _result(source: Path, results: dict, common: dict) -> dict:
    for name, result in results.items():
        if isinstance(result.value, (int, float)) and not math.isfinite(result.value):
            raise InputError(f"Metric '{name}' came out {result.value} on {source}, which is no result: the samples "
                             "or the reference hold NaN or inf, or too few samples were given; check them.")
    return {
        "source": str(source),
        "metrics": {name: r.value for name, r in results.items()},
        "provenance": {"common": common, **{name: r.provenance for name, r in results.items()}},
    }


def store_result(result: dict, source: Path) -> Path | None:
    """Keep a run's evaluation next to it (RUN/eval/*.json) so `onestep compare` finds it."""
    source = Path(source)
    run = RunDir(source) if RunDir(source).is_run() else (
        RunDir(source.parent.parent) if source.name.startswith("step-") else None)
    if run is None or not run.is_run() or not result["metrics"]:
        return None
    return run.write_eval_result(result)

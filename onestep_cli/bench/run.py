"""Time the benchmark rows on the current device: the engine's real Trainer step, one-step sampling, EDM Heun.

Each measurement builds its networks afresh, runs `warmup` untimed iterations (compilation and cuDNN's algorithm
search happen there), then `iters` timed ones. On CUDA every iteration is timed with events recorded between
iterations, without extra synchronisation, so the step runs exactly as in training; the median gives images/s.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from ..config import TrainConfig, validate_config
from ..denoisers.edm.layers import GroupNorm
from ..denoisers.generator import OneStepGenerator
from ..engine.networks import build_networks
from ..engine.precision import (autocast, compile_blocks, resolve_device, resolve_precision, set_tf32,
                                use_channels_last)
from ..engine.trainer import Trainer
from ..sampling import heun_sample
from .count import Work, count_work
from .rows import EVAL_WORK, ROWS, Row, build_network

# The rates a row's floor and FLOP utilisation are measured against: one H100 80GB HBM3 of this workplace
# (docs/benchmarks.md): an 8192^3 bf16 matrix product at 798 TFLOP/s, a device-to-device copy at 3.0 TB/s.
PEAK_BF16_FLOPS = 800e12
PEAK_BANDWIDTH = 3.0e12  # Bytes per second, read plus written.
GENERATOR_SIGMA_INIT = 2.5  # SiD's and our presets' sigma_init for EDM teachers.
QUICK_BATCH = {"train": 4, "sample": 16, "heun": 4}


@dataclass(frozen=True)
class Options:
    """How the rows run: the engine's switches plus the measurement's own settings."""

    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16, as train.precision.
    tf32: bool = True  # TF32 matrix units for float32 work (CUDA).
    channels_last: bool = TrainConfig.model_fields["channels_last"].default  # As train.channels_last.
    fused_optimizer: bool = TrainConfig.model_fields["fused_optimizer"].default  # As train.fused_optimizer.
    compile: bool = TrainConfig.model_fields["compile"].default  # As train.compile.
    cuda_graph: bool = TrainConfig.model_fields["cuda_graph"].default  # As train.cuda_graph (training rows).
    fp32_group_norm: bool = False  # Autocast's float32 GroupNorm (GroupNorm.autocast_float32), for comparison rows.
    cudnn_benchmark: bool = False  # Let cuDNN time its convolution algorithms for each shape (CUDA).
    batch: int | None = None  # Images per step; None: the row's default.
    warmup: int | None = None  # Untimed iterations; None: 3 (1 for Heun).
    iters: int | None = None  # Timed iterations; None: 10 (20 for one-step sampling, 2 for Heun).
    heun_steps: int = 18  # EDM Heun steps (2 * steps - 1 evaluations).
    tiny: bool = False  # Small stand-in networks (the CPU check).
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides) -> "Options":
        """Tiny networks, a couple of iterations, CPU: checks that every row runs, says nothing about speed."""
        return cls(**{"tiny": True, "device": "cpu", "warmup": 1, "iters": 2, "heun_steps": 2, **overrides})


_WORK_CACHE: dict[tuple, Work] = {}


def run_benchmarks(rows: list[Row], options: Options, log=None) -> list[dict]:
    """Measure each row under `options`; returns one result dict per row (see `measure_row`)."""
    results = [measure_row(row, options, log) for row in rows]
    by_name = {r["row"]: r for r in results}
    for result in results:
        base = by_name.get(ROWS[result["row"]].relative_to or "")
        if base and base.get("images_per_s") and result.get("images_per_s") and not options.tiny:
            result["met"] = result["images_per_s"] >= 2 * base["images_per_s"]
    return results


def measure_row(row: Row, options: Options, log=None) -> dict:
    """Time one row. The dict holds the setting (row, batch, device, versions, options) and the measurement:
    images_per_s (median iteration), seconds_per_iter (median, min, max), first_iter_s (compilation included),
    peak_memory_gb (CUDA), flops_per_image, flop_utilisation (of PEAK_BF16_FLOPS), floor_images_per_s, target, met.
    Evaluation rows (fid, score) are measured by `eval_rows.measure_eval_row`, which says what its dict holds."""
    log = log or (lambda message: None)
    if row.work in EVAL_WORK:  # Evaluation as `onestep eval` runs it: its own measurement and columns.
        from .eval_rows import measure_eval_row

        return measure_eval_row(row, options, log)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    batch = options.batch or (QUICK_BATCH[row.work] if options.tiny else row.batch)
    result = {"row": row.name, "work": row.work, "batch": batch, "precision": precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "options": asdict(replace(options, batch=batch)), "target": row.target}
    work = _work(row, options, device)
    flops = work.flops(batch)
    result.update(flops_per_image=flops, matrix_bytes_per_image=work.bytes(batch),
                  floor_images_per_s=1 / work.floor_seconds(batch, PEAK_BF16_FLOPS, PEAK_BANDWIDTH))
    log(f"{row.name}: batch {batch}, {precision}, {_describe(options)}")
    if device.type == "cuda":
        set_tf32(options.tf32)
        torch.backends.cudnn.benchmark = options.cudnn_benchmark
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
    GroupNorm.autocast_float32 = options.fp32_group_norm
    try:
        iterate, compiled, graph_captured = _prepare(row, batch, precision, options, device)
        timings = _time(iterate, device, *_counts(row, options))
        if graph_captured is not None:
            result["graph_captured"] = graph_captured()
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
        return result
    finally:
        GroupNorm.autocast_float32 = False
        iterate = None
        _free(device)
    first, seconds = timings
    median = statistics.median(seconds)
    images_per_s = batch / median
    result.update(compiled=compiled, first_iter_s=first, seconds_per_iter=median, seconds_min=min(seconds),
                  seconds_max=max(seconds), images_per_s=images_per_s,
                  flop_utilisation=flops * images_per_s / PEAK_BF16_FLOPS)
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if row.target_images_per_s is not None and not options.tiny:  # Tiny networks meet nothing.
        result["met"] = images_per_s >= row.target_images_per_s
    return result


def _describe(options: Options) -> str:
    flags = [name for name in ("channels_last", "fused_optimizer", "compile", "cuda_graph", "fp32_group_norm",
                               "cudnn_benchmark") if getattr(options, name)]
    return ", ".join(flags + [f"tf32 {'on' if options.tf32 else 'off'}"])


def _counts(row: Row, options: Options) -> tuple[int, int]:
    warmup = options.warmup if options.warmup is not None else (1 if row.work == "heun" else 3)
    iters = options.iters if options.iters is not None else {"train": 10, "sample": 20, "heun": 2}[row.work]
    return warmup, iters


def _prepare(row: Row, batch: int, precision: str, options: Options, device: torch.device):
    """A function running one iteration of `row`, whether its networks were compiled, and (training rows under
    cuda_graph, else None) a function saying whether the step was captured as a CUDA graph."""
    if row.work == "train":
        trainer = _trainer(row, batch, precision, options, device)
        captured = None
        if options.cuda_graph:
            captured = lambda: trainer.step_graph is not None and trainer.step_graph.captured  # noqa: E731
        return trainer.step, trainer.compiled, captured
    network = build_network(row.network, options.tiny).to(device)
    if options.channels_last:
        use_channels_last([network], device)
    compiled = options.compile and compile_blocks([network], device)
    z, cond = _inputs(network, batch, device)
    if row.work == "sample":
        generator = OneStepGenerator(network, GENERATOR_SIGMA_INIT)

        def iterate():
            with torch.no_grad(), autocast(precision, device):
                return generator(z, cond)
    else:
        def iterate():
            with autocast(precision, device):
                return heun_sample(network, z, options.heun_steps, cond)
    return iterate, compiled, None


def _trainer(row: Row, batch: int, precision: str, options: Options, device: torch.device) -> Trainer:
    """The engine's Trainer on random-init copies of the row's network, SiD's CIFAR-10 recipe otherwise."""
    config = validate_config({
        "teacher": {"kind": "edm", "path": "random-init"},  # Never read: the networks are passed in.
        "generator": {"sigma_init": GENERATOR_SIGMA_INIT},
        "objective": {"name": row.objective},
        "train": {"batch_size": batch, "lr": 1e-5, "ema_halflife_kimg": 500, "precision": precision,
                  "device": device.type, "tf32": options.tf32, "channels_last": options.channels_last,
                  "fused_optimizer": options.fused_optimizer, "compile": options.compile,
                  "cuda_graph": options.cuda_graph},
        "eval": {"metrics": []},
    })
    networks = build_networks(config, teacher=build_network(row.network, options.tiny))
    return Trainer(config, networks, device, precision)


def _inputs(network, batch: int, device: torch.device):
    z = torch.randn(batch, network.img_channels, network.img_resolution, network.img_resolution, device=device)
    cond = None
    if network.label_dim:
        labels = torch.randint(network.label_dim, (batch,), device=device)
        cond = torch.nn.functional.one_hot(labels, network.label_dim).float()
    return z, cond


def _time(iterate, device: torch.device, warmup: int, iters: int) -> tuple[float, list[float]]:
    """(seconds of the first iteration, seconds of each timed iteration)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    iterate()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        iterate()
    sync()
    if device.type != "cuda":
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            iterate()
            seconds.append(time.perf_counter() - start)
        return first, seconds
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for index in range(iters):
        iterate()
        events[index + 1].record()
    sync()
    return first, [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:])]


def _work(row: Row, options: Options, device: torch.device) -> Work:
    """Per-image work of a row, counted once (eager float32, batch 1) and cached."""
    key = (row.name, options.tiny, options.heun_steps, device.type)
    if key not in _WORK_CACHE:
        _WORK_CACHE[key] = count_row(row, options.tiny, device, options.heun_steps)
    return _WORK_CACHE[key]


def count_row(row: Row, tiny: bool = False, device: torch.device | str = "cpu", heun_steps: int = 18) -> Work:
    """Matrix-product FLOPs and bytes of one iteration of `row` (eager float32, counted at batch 1 and 2).

    Heun and one-step sampling are counted as evaluations of one network forward (no gradient), so that the real
    networks can be counted on a CPU too."""
    if row.work in EVAL_WORK:
        raise ValueError(f"count_row counts the engine's rows; {row.name} is an evaluation row, whose work "
                         "eval_rows.measure_eval_row counts (the scorers) or does not (FID).")
    device = torch.device(device)
    if row.work == "train":
        options = Options(channels_last=False, fused_optimizer=False, tiny=tiny)
        work = count_work(lambda batch: _trainer(row, batch, "fp32", options, device).step)
    else:
        network = build_network(row.network, tiny).to(device)

        def forward_at(batch):
            z, cond = _inputs(network, batch, device)
            sigma = torch.full((batch,), GENERATOR_SIGMA_INIT, device=device)
            return torch.no_grad()(lambda: network(z, sigma, cond))

        one = count_work(forward_at)
        evaluations = 2 * heun_steps - 1 if row.work == "heun" else 1
        work = Work(*(evaluations * value for value in (one.flops_per_image, one.flops_fixed, one.bytes_per_image,
                                                          one.bytes_fixed)))
    _free(device)
    return work


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

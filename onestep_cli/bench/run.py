"""Time the benchmark rows on the current device: the engine's real Trainer step, one-step sampling, EDM Heun.

Each measurement builds its networks afresh, runs `warmup` untimed iterations (compilation and cuDNN's algorithm
search happen there), then `iters` timed ones (bench/timing.py); the median gives images/s. The FLOP utilisation and
the floor are measured against this device's own rates: a large matrix product in the row's precision and a large
copy, measured once per invocation.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace

import torch

from ..config import validate_config
from ..denoisers.generator import OneStepGenerator
from ..runs.networks import build_networks
from ..runtime.precision import (autocast, compile_blocks, resolve_device, resolve_precision, set_tf32,
                                 use_channels_last)
from ..engine.switches import SWITCHES, EngineSwitches, resolve_switches
from ..engine.trainer import Trainer
from ..sampling import heun_sample
from .count import Work, count_work
from .eval_rows import measure_eval_row
from .rows import EVAL_WORK, GENERATOR_SIGMA_INIT, NETWORK_FAMILIES, Options, Row, build_network
from .timing import (copy_rate, device_name, free_memory, matmul_rate, peak_memory_gb, reset_peak_memory,
                     time_iterations)

QUICK_BATCH = {"train": 4, "sample": 16, "heun": 4}

_WORK_CACHE: dict[tuple, Work] = {}


def run_benchmarks(rows: list[Row], options: Options, log=None) -> list[dict]:
    """Measure each row under `options`; returns one result dict per row (see `measure_row`)."""
    return [measure_row(row, options, log) for row in rows]


def measure_row(row: Row, options: Options, log=None) -> dict:
    """Time one row. The dict holds the setting (row, batch, device, versions, options) and the measurement:
    images_per_s (median iteration), seconds_per_iter (median, min, max), first_iter_s (compilation included),
    peak_memory_gb (CUDA), flops_per_image, matmul_flops_per_s and copy_bytes_per_s (this device's rates, measured),
    flop_utilisation (of matmul_flops_per_s), floor_images_per_s. Evaluation rows (fid, score) are measured by
    `eval_rows.measure_eval_row`, which says what its dict holds."""
    log = log or (lambda message: None)
    if row.work in EVAL_WORK:  # Evaluation as `onestep eval` runs it: its own measurement and columns.
        return measure_eval_row(row, options, log)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    batch = options.batch or (QUICK_BATCH[row.work] if options.tiny else row.batch)
    result = {"row": row.name, "work": row.work, "batch": batch, "precision": precision,
              "device": device_name(device), "torch": torch.__version__,
              "options": asdict(replace(options, batch=batch))}
    work = _work(row, options, device)
    if device.type == "cuda":
        set_tf32(options.tf32)
    flops, peak_flops, bandwidth = work.flops(batch), matmul_rate(device, precision), copy_rate(device)
    result.update(flops_per_image=flops, matrix_bytes_per_image=work.bytes(batch), matmul_flops_per_s=peak_flops,
                  copy_bytes_per_s=bandwidth, floor_images_per_s=1 / work.floor_seconds(batch, peak_flops, bandwidth))
    if row.work == "train":  # What the presets' auto would run here, measured with --auto.
        result["auto_engine"] = auto_engine(row, precision, device).record()
    log(f"{row.name}: batch {batch}, {precision}, {_describe(options, row)}")
    free_memory(device)
    reset_peak_memory(device)
    try:
        iterate, compiled, graph_captured = prepare_row(row, batch, precision, options, device)
        if row.work == "train":
            # The switches the row's Trainer (whose bound step `iterate` is) runs with, as a run records them.
            result["engine"] = iterate.__self__.switches.record()
        timings = time_iterations(iterate, device, *_counts(row, options))
        if graph_captured is not None:
            result["graph_captured"] = graph_captured()
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
        return result
    finally:
        iterate = None
        free_memory(device)
    first, seconds = timings
    median = statistics.median(seconds)
    images_per_s = batch / median
    result.update(compiled=compiled, first_iter_s=first, seconds_per_iter=median, seconds_min=min(seconds),
                  seconds_max=max(seconds), images_per_s=images_per_s,
                  flop_utilisation=flops * images_per_s / peak_flops, **peak_memory_gb(device))
    return result


def _describe(options: Options, row: Row) -> str:
    if options.auto_engine and row.work == "train":
        flags = ["compile, cuda_graph and channels_last auto"] + ["fused_optimizer"] * options.fused_optimizer
    else:
        flags = [name for name in ("channels_last", "fused_optimizer", "compile", "cuda_graph")
                 if getattr(options, name)]
    return ", ".join(flags + [f"tf32 {'on' if options.tf32 else 'off'}"])


def auto_engine(row: Row, precision: str, device: torch.device) -> EngineSwitches:
    """The switches `auto` picks for a training row on `device` (one process, as the row runs; torch.compile assumed
    to work, which a run with --auto checks)."""
    return resolve_switches("auto", "auto", "auto", device_type=device.type, precision=precision,
                            family=NETWORK_FAMILIES[row.network])


def _counts(row: Row, options: Options) -> tuple[int, int]:
    warmup = options.warmup if options.warmup is not None else (1 if row.work == "heun" else 3)
    iters = options.iters if options.iters is not None else {"train": 10, "sample": 20, "heun": 2}[row.work]
    return warmup, iters


def prepare_row(row: Row, batch: int, precision: str, options: Options, device: torch.device):
    """A function running one iteration of `row`, whether its networks were compiled, and (training rows under
    cuda_graph, else None) a function saying whether the step was captured as a CUDA graph."""
    if row.work == "train":
        trainer = build_trainer(row, batch, precision, options, device)
        captured = None
        if trainer.defer_checks:
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


def build_trainer(row: Row, batch: int, precision: str, options: Options, device: torch.device) -> Trainer:
    """The engine's Trainer on random-init copies of the row's network, SiD's CIFAR-10 recipe otherwise."""
    config = validate_config({
        "teacher": {"kind": "edm", "path": "random-init"},  # Never read: the networks are passed in.
        "generator": {"sigma_init": GENERATOR_SIGMA_INIT},
        "objective": {"name": row.objective},
        "train": {"batch_size": batch, "lr": 1e-5, "ema_halflife_kimg": 500, "precision": precision,
                  "device": device.type, "tf32": options.tf32, "fused_optimizer": options.fused_optimizer,
                  **{name: "auto" if options.auto_engine else getattr(options, name) for name in SWITCHES}},
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
        work = count_work(lambda batch: build_trainer(row, batch, "fp32", options, device).step)
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
    free_memory(device)
    return work

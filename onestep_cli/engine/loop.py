"""The distillation loop on every rank: steps, ticks, evals and checkpoints; resume, preemption and export.

Rank 0 alone prints and writes config.yaml, stats.jsonl, metrics.jsonl and run.json, and holds the run directory's
lock (unless the `--gpus` launcher holds it for all ranks); every rank takes part in checkpoints (written together,
visible only once all have finished).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..errors import MissingFileError, OnestepError
from ..eval import MetricContext, check_metric_names, compute_metrics
from ..eval.registry import is_image_metric
from ..sample_io import is_image_shape
from ..sampling import generate_with_labels
from ..runtime import distributed
from ..runs.checkpoint import checkpoint_name, find_resume_checkpoint, remove_partial_checkpoints
from .cuda_graph import WARMUP_STEPS
from ..runtime.distributed import DistEnv, barrier, broadcast_object, on_main, print0
from ..runs.networks import Networks, build_networks
from .parallel import batch_split, fsdp_record, ignored_fsdp_note, resolve_parallelism, training_state_bytes
from ..runtime.compile_cache import compile_cache_dir
from ..runtime.precision import resolve_precision, set_tf32
from .progress import Progress
from .real_images import RealImages, load_gan_data
from ..runs.lock import RunLock, lock_held_for_me
from ..runs.run_dir import RunDir
from .signals import StopRequest
from .switches import any_auto
from .tracking import check_trackers, open_trackers
from .trainer import Trainer, training_mode


@dataclass
class RunSummary:
    out_dir: Path
    step: int
    kimg: float
    wall_seconds: float
    resumed_from: int | None
    final_metrics: dict
    stopped_by: str | None = None  # The signal that preempted the run (a checkpoint was written), None if it finished.
    rank: int = 0  # This process's rank (only rank 0 reports).
    world_size: int = 1


class GeneratorEvaluator:
    """The metrics of `eval:` on the training generator's samples (fixed per-sample seeds, so every evaluation of a
    run sees the same noise and labels). Feature networks and reference statistics are loaded once per run."""

    def __init__(self, config: RunConfig, trainer: Trainer):
        self.config = config.eval
        self.seeds = list(range(self.config.seed, self.config.seed + self.config.num_samples))
        self.image_metrics = is_image_shape(trainer.data_shape)
        self.context = None
        if self.image_metrics:
            from ..eval.reference import open_reference

            ref = self.config.resolved_ref
            self.context = MetricContext(reference=open_reference(ref) if ref is not None else None,
                                         fid_mode=self.config.fid_mode, device=trainer.device,
                                         batch_size=self.config.batch_size)

    def __call__(self, trainer: Trainer) -> dict:
        with training_mode(trainer.sampling_generator, False):  # No dropout in samples of a generator without EMA.
            samples, labels = generate_with_labels(trainer.sampling_generator, self.seeds, trainer.data_shape,
                                                   trainer.label_dim, device=trainer.device)
        if self.context is not None:
            self.context.labels = labels
        results = compute_metrics(self.config.metrics, samples, trainer.teacher, self.context)
        seeds = f"{self.seeds[0]}-{self.seeds[-1]}"
        return {"metrics": {k: r.value for k, r in results.items()},
                "provenance": {k: {**r.provenance, "seeds": seeds} for k, r in results.items()}}


def check_inputs(config: RunConfig) -> None:
    """Fail before any work on what the config names but this machine lacks: metrics, trackers, eval.ref."""
    check_metric_names(config.eval.metrics)
    check_trackers(config.logging)
    reference = config.eval.resolved_ref
    if config.eval.metrics and reference is not None and not reference.exists():
        raise MissingFileError(f"eval.ref {reference} does not exist; pass reference statistics (.npz with mu and "
                               "sigma, e.g. from `onestep eval IMAGES --save-stats FILE`), an .npz of images or a "
                               "folder of images.")


def distill(config: RunConfig, out_dir: Path, *, log=None, progress: bool | None = None,
            networks: Networks | None = None) -> RunSummary:
    """Distil the configured teacher into a one-step generator in `out_dir`, resuming it if a run is there.

    Under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set) every process calls this and they
    train together; `train.batch_size` is the global batch. SIGTERM, SIGUSR1, SIGINT (Ctrl-C) and SIGHUP end the run
    early with a checkpoint. Everything that can be checked without training is checked before the run directory is
    created or changed; while it trains, the run holds the directory's lock, so a second run there stops at once.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_inputs(config)
    env, device, initialised = distributed.init(config.train.device)
    try:
        return _distill(config, Path(out_dir), env, device, print0(env, log), progress if env.is_main else False,
                        networks)
    except BaseException as exc:
        if initialised:  # Free the DDP/FSDP modules the traceback holds while their process group still exists.
            traceback.clear_frames(exc.__traceback__)
            gc.collect()
        raise
    finally:
        distributed.shutdown(initialised)


def _distill(config: RunConfig, out_dir: Path, env: DistEnv, device: torch.device, log, progress,
             networks: Networks | None) -> RunSummary:
    batch_split(config.train, env.world_size)  # Fail before any work.
    run = RunDir(out_dir)
    # Build (and so load the teacher) first: a missing teacher file must not leave a run directory behind that
    # would refuse the corrected command as a different configuration.
    networks = networks or build_networks(config, run_dir=run.path)
    _check_metrics_fit(config, networks.data_shape)
    # Real images of the GAN term, read before the run directory exists: a wrong gan.data leaves nothing behind.
    real_images = load_gan_data(config, networks.data_shape, networks.label_dim) if config.gan else None
    lock = RunLock(run.path, warn=log)
    holds_lock = env.is_main and not lock_held_for_me(run.path)
    on_main(lambda: lock.acquire() if holds_lock else None, env)  # Refused on every rank alike.
    try:
        trainer, resumed_from = _start(config, run, env, device, log, networks, real_images)
        try:
            return _train(config, run, trainer, resumed_from, env, device, log, progress)
        except BaseException as exc:
            _record_failure(run, trainer, env, exc)
            raise
    finally:
        lock.release()


def _record_failure(run: RunDir, trainer: Trainer, env: DistEnv, exc: BaseException) -> None:
    """run.json says that the run failed and why (best effort: the failure may be a full disk)."""
    if env.is_main:
        interrupted = isinstance(exc, KeyboardInterrupt)
        error = str(exc) if isinstance(exc, OnestepError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        with contextlib.suppress(OSError):
            run.write_status(status="interrupted" if interrupted else "failed", step=trainer.step_count,
                             kimg=trainer.kimg, error=error, processes=env.world_size, engine=engine_record(trainer))


def _check_metrics_fit(config: RunConfig, data_shape) -> None:
    images = [name for name in config.eval.metrics if is_image_metric(name)]
    if images and not is_image_shape(data_shape):
        raise ConfigError(f"eval.metrics has {', '.join(images)}, which need images, but this teacher's samples are "
                          f"points of shape {list(data_shape)}; use metrics of points such as swd, or "
                          "--set eval.metrics=[] for none.")


def _train(config: RunConfig, run: RunDir, trainer: Trainer, resumed_from: int | None, env: DistEnv,
           device: torch.device, log, progress) -> RunSummary:
    train = config.train
    micro, rounds = batch_split(train, env.world_size)
    if env.is_distributed or rounds > 1:
        log(f"Training on {env.world_size} process{'es' if env.is_distributed else ''} "
            f"({trainer.parallelism.upper()}, {device.type}): global batch {train.batch_size} = {micro} per "
            f"micro-batch x {rounds} accumulation rounds x {env.world_size} processes.")
    if any_auto(train):  # What auto chose, and why not the rest: once, from rank 0.
        log(trainer.switches.describe())
    if note := ignored_fsdp_note(train, trainer.sharded, env.world_size):
        log(note)
    if trainer.step_graph is not None:
        log(f"train.cuda_graph={str(train.cuda_graph).lower()}: after {WARMUP_STEPS} eager steps the whole step is "
            f"captured as a CUDA graph and replayed; NaN/inf steps are skipped on the GPU and checked every "
            f"{train.tick_every} steps.")
    engine = engine_record(trainer)

    start_time, tick_start, tick_step = time.time(), time.time(), trainer.step_count
    sums: dict[str, torch.Tensor] = {}
    if env.is_main:
        run.write_status(status="running", step=trainer.step_count, kimg=trainer.kimg, processes=env.world_size,
                         engine=engine)
    final_metrics, saved_step, evaluator = {}, None, None
    reached_end_here = False  # The same on every rank, unlike final_metrics (rank 0's alone).
    trackers = open_trackers(config, run.path, resumed_from, enabled=env.is_main)  # TensorBoard, W&B (rank 0).

    def evaluate_and_record(step: int) -> dict:
        nonlocal evaluator
        evaluator = evaluator or GeneratorEvaluator(config, trainer)
        result = evaluator(trainer)  # Sharded networks need every rank in each forward.
        if env.is_main:
            run.append(run.metrics_path, {"step": step, "kimg": trainer.kimg, **result})
            trackers.log_metrics(step, result["metrics"])
        return result["metrics"]

    evaluating_rank = env.is_main or trainer.sharded
    if config.eval.at_start and config.eval.metrics and trainer.step_count == 0 and evaluating_rank:
        evaluate_and_record(0)
    stop_request = StopRequest(second_interrupt_aborts=not env.is_distributed, notify=lambda name: log(
        f"Received {name}: stopping after the current step, with a checkpoint"
        + (" (Ctrl-C again stops at once, without it)." if name == "SIGINT" and not env.is_distributed else ".")))
    with stop_request as stop, trackers, Progress(train.max_steps, trainer.step_count, enabled=progress,
                                                  log=log) as bar:
        compiling = trainer.compiled  # This process's first step compiles the blocks (or loads them from the cache).
        if compiling and trainer.step_count < train.max_steps:
            bar.note(f"compiling the networks' blocks in the first step (minutes on a new machine; cached in "
                     f"{compile_cache_dir()})")
        while trainer.step_count < train.max_steps:
            first_step_start = time.time()
            stats = trainer.step()
            if compiling:
                bar.note(f"compiled: the first step took {time.time() - first_step_start:.0f} s")
                compiling = False
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value.float()
            step = trainer.step_count
            if step % train.tick_every == 0 or step == train.max_steps:
                record = _tick_record(trainer, sums, step - tick_step, time.time() - tick_start,
                                      time.time() - start_time, device, env)
                if env.is_main:
                    run.append(run.stats_path, record)
                    trackers.log_stats(record)
                bar.tick(step, record)
                sums, tick_start, tick_step = {}, time.time(), step
            if step == train.max_steps:  # The last checkpoint before the last evaluation, which may fail.
                trainer.save(run)
                saved_step, reached_end_here = step, True
            evaluate_now = step == train.max_steps or (config.eval.every_steps and step % config.eval.every_steps == 0)
            if evaluate_now and config.eval.metrics and evaluating_rank:
                final_metrics = evaluate_and_record(step)
            if step % train.checkpoint_every == 0 and saved_step != step:
                trainer.save(run)
                saved_step = step
            if step < train.max_steps and distributed.any_rank(stop.requested, env, device):
                return _stop(trainer, run, env, log, stop.signal_name, saved_step, start_time, resumed_from)
        if not reached_end_here:  # Resumed at its end: the last evaluation's row, unless it failed or eval.* changed.
            rows = on_main(lambda: run.read_records(run.metrics_path), env)
            last = rows[-1] if rows else {}
            final_metrics = last.get("metrics", {})
            up_to_date = last.get("step") == trainer.step_count and set(config.eval.metrics) <= set(final_metrics)
            if config.eval.metrics and not up_to_date and evaluating_rank:
                final_metrics = evaluate_and_record(trainer.step_count)
    export_generator(trainer, run)
    wall = time.time() - start_time
    if env.is_main:
        run.write_status(status="complete", step=trainer.step_count, kimg=trainer.kimg, wall_seconds=wall,
                         metrics=final_metrics, processes=env.world_size, engine=engine_record(trainer))
    return RunSummary(run.path, trainer.step_count, trainer.kimg, wall, resumed_from, final_metrics,
                      rank=env.rank, world_size=env.world_size)


def _start(config: RunConfig, run: RunDir, env: DistEnv, device: torch.device, log,
           networks: Networks, real_images: RealImages | None = None) -> tuple[Trainer, int | None]:
    """Prepare the run directory (rank 0), build the trainer and restore the newest intact checkpoint if any."""
    train = config.train
    continuing = on_main(lambda: run.prepare(config, log=log), env)
    precision = resolve_precision(train.precision, device)
    if device.type == "cuda":
        set_tf32(train.tf32)
    latest = None
    if continuing:
        if env.is_main:
            remove_partial_checkpoints(run.checkpoints)
        barrier(env)
        latest = find_resume_checkpoint(run.checkpoints, warn=log, env=env)
    state_bytes = training_state_bytes(networks.teacher, networks.generator, networks.fake,
                                       bool(train.ema_halflife_kimg))
    resumed_parallelism = latest[0].get("parallelism", "ddp") if latest else None
    parallelism = broadcast_object(  # Every rank must wrap the same way, whatever its GPU reports.
        resolve_parallelism(train.parallelism, device, state_bytes, resumed_parallelism), env)
    trainer = Trainer(config, networks, device, precision, env, parallelism, real_images)
    resumed_from = None
    if latest is not None:
        state, folder = latest
        trainer.load(state, folder)
        resumed_from = trainer.step_count
        log(f"Resuming {run.path} from {folder.name} (step {trainer.step_count}, {trainer.kimg:.1f} kimg) on "
            f"{env.world_size} process{'es' if env.is_distributed else ''}.")
    if continuing and env.is_main:  # Without a checkpoint the run starts again at step 0: every old row is stale.
        run.truncate_records_after(trainer.step_count if latest is not None else -1)
    return trainer, resumed_from


def engine_record(trainer: Trainer) -> dict:
    """run.json's "engine": the speed switches this run uses (train.* auto resolved), why any is off, the FSDP2
    overlap settings of a sharded run, and where compiled kernels are cached."""
    record = trainer.switches.record()
    if trainer.sharded:
        record["fsdp"] = fsdp_record(trainer.config.train)
    if trainer.compiled:
        record["compile_cache"] = str(compile_cache_dir())
    return record


def _tick_record(trainer: Trainer, sums: dict, steps: int, seconds: float, elapsed: float, device, env) -> dict:
    """One stats.jsonl row: per-step means since the last tick (losses already averaged over ranks)."""
    batch = trainer.config.train.batch_size
    record = {"step": trainer.step_count, "kimg": trainer.kimg, **{k: float(v) / steps for k, v in sums.items()},
              "nonfinite_total": trainer.nonfinite_total, "seconds_per_step": seconds / steps,
              "kimg_per_s": steps * batch / 1000 / max(seconds, 1e-9), "elapsed_seconds": elapsed}
    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        record["peak_memory_gb"] = float(distributed.all_reduce(peak, env, torch.distributed.ReduceOp.MAX))
    return record


def _stop(trainer: Trainer, run: RunDir, env: DistEnv, log, signal_name, saved_step, start_time,
          resumed_from) -> RunSummary:
    """Preemption: checkpoint the finished step (unless just done), record it in run.json, and return."""
    step = trainer.step_count
    if saved_step != step:
        trainer.save(run)
    wall = time.time() - start_time
    reason = signal_name or "a stop signal on another rank"
    if env.is_main:
        run.write_status(status="stopped", step=step, kimg=trainer.kimg, signal=reason, wall_seconds=wall,
                         processes=env.world_size, engine=engine_record(trainer))
    log(f"Received {reason}: stopped after step {step} with checkpoint {checkpoint_name(step)} written. Run the "
        "same command again to continue from it.")
    return RunSummary(run.path, step, trainer.kimg, wall, resumed_from, {}, stopped_by=reason, rank=env.rank,
                      world_size=env.world_size)


def export_generator(trainer: Trainer, run: RunDir) -> Path:
    """Inference weights of the (EMA) generator: export/generator.safetensors + export/config.yaml (rank 0)."""
    from safetensors.torch import save_file

    from ..runs.run_dir import write_atomic

    module = trainer.sampling_generator
    if trainer.sharded:  # Gather the shards (every rank takes part); rank 0 receives the full tensors.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = module.state_dict()
    if trainer.env.is_main:
        run.export.mkdir(exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(weights, str(run.export / "generator.safetensors"))
        write_atomic(run.export / "config.yaml", run.config_path.read_text())
    barrier(trainer.env)
    return run.export

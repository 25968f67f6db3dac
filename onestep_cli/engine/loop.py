"""The distillation loop: k fake-score updates, one generator update, EMA; ticks, evals and checkpoints."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LogNormalSigmaConfig, RunConfig
from ..metrics import check_metric_names, compute_metrics
from ..objectives import build_objective, fake_score_loss
from ..objectives.sigmas import sample_sigma
from ..sampling import generate
from .checkpoint import find_latest_checkpoint, remove_partial_checkpoints, save_checkpoint, unflatten_optimizer
from .ema import EMA, ema_beta
from .networks import Networks, build_networks
from .precision import autocast, make_scaler, resolve_device, resolve_precision
from .progress import Progress
from .run_dir import RunDir


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN or inf losses or gradients."""


@dataclass
class RunSummary:
    out_dir: Path
    step: int
    kimg: float
    wall_seconds: float
    resumed_from: int | None
    final_metrics: dict


def make_optimizer(config: RunConfig, params, lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.train.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(config.train.betas), weight_decay=config.train.weight_decay)


class Trainer:
    """Holds the state of one run; `step()` performs one iteration (fake updates, generator update, EMA)."""

    def __init__(self, config: RunConfig, networks: Networks, device: torch.device, precision: str):
        self.config, self.device, self.precision = config, device, precision
        self.teacher = networks.teacher.to(device)
        self.generator = networks.generator.to(device)
        self.fake = networks.fake.to(device)
        self.data_shape, self.label_dim = networks.data_shape, networks.label_dim
        self.objective = build_objective(config.objective)
        self.fake_sigma = LogNormalSigmaConfig(mean_log=config.fake.sigma_mean_log, std_log=config.fake.sigma_std_log)
        train = config.train
        self.opt_generator = make_optimizer(config, self.generator.parameters(), train.generator_learning_rate)
        self.opt_fake = make_optimizer(config, self.fake.parameters(), train.fake_learning_rate)
        self.scaler_generator = make_scaler(precision, device)
        self.scaler_fake = make_scaler(precision, device)
        self.ema = EMA(self.generator, ema_beta(train.batch_size, train.ema_halflife_kimg)) if train.ema_halflife_kimg else None
        # All training randomness comes from this one generator, so a checkpoint can restore it exactly.
        self.rng = torch.Generator(device=device).manual_seed(train.seed)
        self.sigma_rng = torch.Generator().manual_seed(train.seed + 1)  # Noise levels are drawn on the CPU.
        self.step_count = 0
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0

    @property
    def kimg(self) -> float:
        return self.step_count * self.config.train.batch_size / 1000

    @property
    def sampling_generator(self):
        return self.ema.module if self.ema else self.generator

    def _latents(self, batch: int):
        z = torch.randn((batch, *self.data_shape), generator=self.rng, device=self.device)
        cond = None
        if self.label_dim:
            labels = torch.randint(self.label_dim, (batch,), generator=self.rng, device=self.device)
            cond = torch.nn.functional.one_hot(labels, self.label_dim).float()
        return z, cond

    def _sigma(self, config, batch: int) -> torch.Tensor:
        return sample_sigma(config, batch, self.sigma_rng, self.device)

    def _apply(self, loss, module, optimizer, scaler) -> tuple[float | torch.Tensor, bool]:
        """Backward, clip, and step unless the loss or gradients are not finite; returns (grad norm, stepped)."""
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        max_norm = self.config.train.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if finite:
            scaler.step(optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return grad_norm.detach(), finite

    def step(self) -> dict:
        """One iteration; returns detached per-step statistics (tensors, to avoid a host sync per step)."""
        cfg, batch = self.config, self.config.train.batch_size
        finite = True
        for _ in range(cfg.train.fake_updates_per_step):
            z, cond = self._latents(batch)
            with torch.no_grad(), autocast(self.precision, self.device):
                x_g = self.generator(z, cond)
            sigma = self._sigma(self.fake_sigma, batch)
            noise = torch.randn(x_g.shape, generator=self.rng, device=self.device)
            with autocast(self.precision, self.device):
                loss_fake = fake_score_loss(self.fake, x_g.float(), sigma, noise, cond, cfg.fake.sigma_data).float().mean()
            grad_fake, ok = self._apply(loss_fake, self.fake, self.opt_fake, self.scaler_fake)
            finite &= ok

        # Generator update: the fake score's parameters are frozen, its inputs still carry gradients.
        self.fake.requires_grad_(False)
        try:
            z, cond = self._latents(batch)
            sigma = self._sigma(cfg.objective.sigma, batch)
            with autocast(self.precision, self.device):
                x_g = self.generator(z, cond).float()
                noise = torch.randn(x_g.shape, generator=self.rng, device=self.device)
                loss_gen = self.objective.generator_loss(x_g, sigma, noise, self.teacher, self.fake, cond).float().mean()
            grad_gen, ok = self._apply(loss_gen, self.generator, self.opt_generator, self.scaler_generator)
            finite &= ok
        finally:
            self.fake.requires_grad_(True)

        if finite:
            self.consecutive_nonfinite = 0
        else:
            self.consecutive_nonfinite += 1
            self.nonfinite_total += 1
            if self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self.consecutive_nonfinite} consecutive steps had NaN/inf losses or gradients (step "
                    f"{self.step_count}); the run stops here and its last checkpoint is intact. Lower train.lr, "
                    "set train.grad_clip, or use train.precision=fp32.")
        if self.ema:
            self.ema.update(self.generator)
        self.step_count += 1
        return {"loss_generator": loss_gen.detach(), "loss_fake": loss_fake.detach(),
                "grad_norm_generator": grad_gen, "grad_norm_fake": grad_fake}

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"generator": self.generator, "fake": self.fake}
        if self.ema:
            mods["ema"] = self.ema.module
        return mods

    def save(self, run: RunDir) -> Path:
        return save_checkpoint(
            run.checkpoints, self.step_count, self.modules(),
            {"generator": self.opt_generator, "fake": self.opt_fake},
            {"train": self.rng.get_state(), "sigma": self.sigma_rng.get_state()},
            {"kimg": self.kimg, "nonfinite_total": self.nonfinite_total,
             "scalers": {"generator": self.scaler_generator.state_dict(), "fake": self.scaler_fake.state_dict()}},
            self.config.train.keep_checkpoints,
        )

    def load(self, state: dict, weights: dict, tensors: dict) -> None:
        for name, module in self.modules().items():
            module.load_state_dict(weights[name])
        for name, optimizer in (("generator", self.opt_generator), ("fake", self.opt_fake)):
            optimizer.load_state_dict(unflatten_optimizer(name, tensors, state["optimizers"][name]))
        self.scaler_generator.load_state_dict(state["scalers"]["generator"])
        self.scaler_fake.load_state_dict(state["scalers"]["fake"])
        self.rng.set_state(tensors["rng.train"])
        self.sigma_rng.set_state(tensors["rng.sigma"])
        self.step_count = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)


def evaluate_generator(trainer: Trainer, config: RunConfig) -> dict:
    seeds = list(range(config.eval.seed, config.eval.seed + config.eval.num_samples))
    samples = generate(trainer.sampling_generator, seeds, trainer.data_shape, trainer.label_dim, device=trainer.device)
    results = compute_metrics(config.eval.metrics, samples, trainer.teacher)
    return {"metrics": {k: r.value for k, r in results.items()},
            "provenance": {k: {**r.provenance, "seeds": f"{seeds[0]}-{seeds[-1]}"} for k, r in results.items()}}


def distill(config: RunConfig, out_dir: Path, *, log=None, progress: bool | None = None,
            networks: Networks | None = None) -> RunSummary:
    """Distil the configured teacher into a one-step generator in `out_dir`, resuming it if a run is there."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_metric_names(config.eval.metrics)
    run = RunDir(out_dir)
    continuing = run.prepare(config)
    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    trainer = Trainer(config, networks or build_networks(config), device, precision)

    resumed_from = None
    if continuing:
        remove_partial_checkpoints(run.checkpoints)
        latest = find_latest_checkpoint(run.checkpoints, warn=log)
        if latest is not None:
            state, weights, tensors, folder = latest
            trainer.load(state, weights, tensors)
            resumed_from = trainer.step_count
            log(f"Resuming {out_dir} from {folder.name} (step {trainer.step_count}, {trainer.kimg:.1f} kimg).")
        run.truncate_records_after(trainer.step_count)

    train = config.train
    start_time, tick_start, tick_step = time.time(), time.time(), trainer.step_count
    sums: dict[str, torch.Tensor] = {}
    run.write_status(status="running", step=trainer.step_count, kimg=trainer.kimg)
    final_metrics = {}
    with Progress(train.max_steps, trainer.step_count, enabled=progress, log=log) as bar:
        while trainer.step_count < train.max_steps:
            stats = trainer.step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value.float()
            step = trainer.step_count
            if step % train.tick_every == 0 or step == train.max_steps:
                seconds = time.time() - tick_start
                steps = step - tick_step
                record = {"step": step, "kimg": trainer.kimg, **{k: float(v) / steps for k, v in sums.items()},
                          "nonfinite_total": trainer.nonfinite_total, "seconds_per_step": seconds / steps,
                          "kimg_per_s": steps * train.batch_size / 1000 / max(seconds, 1e-9),
                          "elapsed_seconds": time.time() - start_time}
                if device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                run.append(run.stats_path, record)
                bar.tick(step, record)
                sums, tick_start, tick_step = {}, time.time(), step
            evaluate_now = step == train.max_steps or (config.eval.every_steps and step % config.eval.every_steps == 0)
            if evaluate_now and config.eval.metrics:
                result = evaluate_generator(trainer, config)
                run.append(run.metrics_path, {"step": step, "kimg": trainer.kimg, **result})
                final_metrics = result["metrics"]
            if step % train.checkpoint_every == 0 or step == train.max_steps:
                trainer.save(run)
    if not final_metrics:
        rows = run.read_records(run.metrics_path)
        final_metrics = rows[-1]["metrics"] if rows else {}
    export_generator(trainer, run)
    wall = time.time() - start_time
    run.write_status(status="complete", step=trainer.step_count, kimg=trainer.kimg, wall_seconds=wall,
                     metrics=final_metrics)
    return RunSummary(Path(out_dir), trainer.step_count, trainer.kimg, wall, resumed_from, final_metrics)


def export_generator(trainer: Trainer, run: RunDir) -> Path:
    """Inference weights of the (EMA) generator: export/generator.safetensors + export/config.yaml."""
    from safetensors.torch import save_file

    from .run_dir import write_atomic

    run.export.mkdir(exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in trainer.sampling_generator.state_dict().items()}
    save_file(weights, str(run.export / "generator.safetensors"))
    write_atomic(run.export / "config.yaml", run.config_path.read_text())
    return run.export

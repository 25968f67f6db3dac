"""One training iteration on every rank: k fake-score updates, one generator update, EMA; and its full state.

As in SiD, a network is in training mode (dropout on) only in its own update: the generator's samples that train the
fake score come from the generator in eval mode, and the fake score is in eval mode inside the generator loss; the
teacher is always in eval mode. With fake.augment_p > 0 the fake score trains on EDM-augmented samples with their
labels; the generator loss sees neither.

Every rank draws the whole global batch's latents, noise levels and noise from the same generators and computes
its own contiguous share (split again into grad_accumulation micro-batches). The per-sample randomness therefore
does not depend on how the batch is split: one process with batch B, or N processes with B/N each, train the same
networks up to floating-point summation order, and any rank count can resume any checkpoint.

The order of updates inside a step is train.update_order: SiD's (k fake updates, then the generator) or DMD2's
(the generator, then k fake updates, the first on the samples the generator update drew, before it changed them).

A multi-step generator (generator.num_steps > 1) is trained by DMD2's backward simulation: each update draws one step
index on the host, and its samples are the generator's estimate at that step, made from the generator's own earlier
steps without gradients; the re-noising noise is drawn with the batch's other noise.

With a `gan:` section (DMD2's GAN term, objectives/gan.py) the fake score carries a classifier head on its bottleneck:
every fake update adds the head's real-vs-generated loss on a fresh batch of real images, and the generator update
adds the loss of fooling it; without one, the step is exactly what it is without GAN code.

Under train.cuda_graph the device part of the step (`_iteration`, everything but drawing the noise levels and
computing the EMA's decay on the CPU) is recorded once as a CUDA graph and replayed (`cuda_graph.py`); its checks for
NaN/inf are deferred: the fused optimizer skips a non-finite update on the GPU, and the host reads the count of
skipped steps every tick.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..denoisers.edm.augment import augment, draw_augmentation
from ..errors import OnestepError
from ..objectives import build_objective, fake_score_loss
from ..objectives.gan import GANTerm, attach_discriminator_head
from ..objectives.sigmas import sample_sigma
from ..runs.checkpoint import (CheckpointError, commit, gather_hashes, hash_files, is_sharded, load_optimizer_state,
                               read_checkpoint, read_rng, read_sharded, saving, unflatten_optimizer, write_full,
                               write_rng, write_sharded)
from .cuda_graph import StepGraph
from ..runtime.distributed import SINGLE, DistEnv, all_gather_object, all_reduce
from .ema import EMA, ema_beta
from .lr_schedule import warmup_factor
from .real_images import RealImages, load_gan_data
from ..runs.networks import Networks
from .parallel import batch_split, gradient_sync, wrap
from .switches import EngineSwitches, resolve_switches
from ..denoisers.blocks import network_family
from ..runtime.precision import autocast, compile_blocks, compile_failure, make_scaler, use_channels_last
from ..runs.run_dir import RunDir


class NonFiniteError(OnestepError, RuntimeError):
    """Too many consecutive steps with NaN or inf losses or gradients. The user's to fix: the message says which
    settings to lower (learning rate, precision); the run's last checkpoint is intact."""


def make_optimizer(config: RunConfig, params, lr: float, fused: bool = False,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or AdamW as configured; `fused`: one kernel for the whole parameter list (same update); `capturable`:
    its step count lives on the GPU, so that a CUDA graph can record the step."""
    cls = torch.optim.AdamW if config.train.optimizer == "adamw" else torch.optim.Adam
    extra = {"fused": True} if fused else {}
    if capturable:
        extra["capturable"] = True
    return cls(params, lr=lr, betas=tuple(config.train.betas), eps=config.train.eps,
               weight_decay=config.train.weight_decay, **extra)


@contextlib.contextmanager
def training_mode(module: torch.nn.Module, training: bool):
    """Put `module` (and its submodules) in training or eval mode for the block, then back as they were."""
    previous = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, mode in previous:
            m.training = mode


def from_host(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device`; on CUDA copied from pinned memory, asynchronously: no host sync per step."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a replicated DTensor (FSDP's grad norm), unchanged otherwise."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@dataclass
class RealBatch:
    """One fake update's inputs of the GAN term: real images, their conditions, and the noise levels at which the
    real and the generated images are classified (global batch)."""

    images: torch.Tensor
    cond: torch.Tensor | None
    sigma_real: torch.Tensor
    sigma_fake: torch.Tensor


class Trainer:
    """Holds the state of one run on one rank; `step()` performs one iteration on every rank together."""

    def __init__(self, config: RunConfig, networks: Networks, device: torch.device, precision: str,
                 env: DistEnv = SINGLE, parallelism: str = "ddp", real_images: RealImages | None = None):
        self.config, self.device, self.precision, self.env = config, device, precision, env
        self.parallelism = parallelism
        train = config.train
        self.sample_condition = networks.sample_condition  # Per-sample text conditions; None: class labels.
        self.fake_train_guidance_scale = networks.fake_train_guidance_scale  # kappa1 of a guided fake score.
        # The condition that replaces dropped prompts in the fake score's update (fake.prompt_dropout, SiD-LSG's).
        self.null_condition = networks.fake.null_condition if config.fake.prompt_dropout else None
        prompts_on_host = False
        if hasattr(self.sample_condition, "draws_on_host"):  # Training prompts, cached or streamed.
            self.sample_condition.place(device)
            prompts_on_host = (self.sample_condition.draws_on_host(device)
                               and getattr(self.sample_condition, "host_draw_reason", True))
        # Resolved before the networks are moved: a run that cannot be captured fails here.
        self.switches = self._resolve_switches(networks, prompts_on_host)
        self.defer_checks = self.switches.cuda_graph
        micro, rounds = batch_split(train, env.world_size)
        share_start = env.rank * micro * rounds
        # This rank's micro-batches, as slices of the global batch.
        self.micro_batches = [slice(share_start + i * micro, share_start + (i + 1) * micro) for i in range(rounds)]
        self.data_shape, self.label_dim = networks.data_shape, networks.label_dim
        self.gan, self.real_images = None, None
        if config.gan is not None:  # The head joins the fake score before it is moved, wrapped and optimised.
            if parallelism == "fsdp":
                raise ConfigError("gan: runs with DDP, not FSDP (its classifier head is called outside the fake "
                                  "score's forward); set train.parallelism=ddp.")
            self.real_images = real_images or load_gan_data(config, networks.data_shape, networks.label_dim)
            attach_discriminator_head(networks.fake, self.data_shape, train.seed)
            self.gan = GANTerm(config.gan, networks.fake, self.data_shape)
        self.teacher = networks.teacher.to(device)
        self.generator = networks.generator.to(device)
        self.fake = networks.fake.to(device)
        # Losses are sums over a sample's elements; train.grad_clip is in the units of their mean (DMD2's).
        self.max_grad_norm = (train.grad_clip * math.prod(self.data_shape)) if train.grad_clip else math.inf
        if self.switches.channels_last:  # Before the EMA copy, so that the average and its source share one layout.
            use_channels_last([self.teacher, self.generator, self.fake], device)
        self.objective = build_objective(config.objective)
        self.ema = None
        if train.ema_halflife_kimg:  # Copied before wrapping: under FSDP the EMA is sharded like the generator.
            self.ema = EMA(self.generator)
        # The GAN term reads the fake score's bottleneck block through a hook: that block stays eager.
        hooked = (self.gan.bottleneck.module,) if self.gan else ()
        self.compiled = self.switches.compile and compile_blocks([self.teacher, self.generator, self.fake],
                                                                 device, eager=hooked)
        if self.switches.compile and not self.compiled:  # compile_blocks said why, in a warning.
            self.switches = self.switches.without_compile("torch.compile does not work here")
        wrapped = wrap(self.teacher, self.generator, self.fake, self.ema.module if self.ema else None, parallelism,
                       precision, device, env, train.checkpointed_networks, train.fsdp_reshard_after_forward,
                       train.fsdp_prefetch)
        self.generator_train, self.fake_train = wrapped.generator_train, wrapped.fake_train
        self.sharded = wrapped.sharded
        self.reshard_networks = wrapped.reshard
        # Deferred checks (under train.cuda_graph): no host synchronisation in the step. The fused optimizer skips a
        # non-finite update on the device and the skipped steps are counted there; the host looks every
        # train.tick_every steps.
        graphed = self.defer_checks and device.type == "cuda"
        # Optimizers are built after sharding, so under FSDP they hold (and step) only this rank's shards.
        fused = (train.fused_optimizer and device.type == "cuda" and not self.sharded) or self.defer_checks
        self.opt_generator = make_optimizer(config, self.generator.parameters(), train.generator_learning_rate, fused,
                                            capturable=graphed)
        self.opt_fake = make_optimizer(config, self.fake.parameters(), train.fake_learning_rate, fused,
                                       capturable=graphed)
        self.scaler_generator = make_scaler(precision, device, self.sharded)
        self.scaler_fake = make_scaler(precision, device, self.sharded)
        # All training randomness comes from these generators, identical on every rank, restored by a checkpoint.
        self.rng = torch.Generator(device=device).manual_seed(train.seed)
        self.sigma_rng = torch.Generator().manual_seed(train.seed + 1)  # Noise levels are drawn on the CPU.
        if self.gan:
            self.real_rng = torch.Generator().manual_seed(train.seed + 2)  # Which real images each update sees.
        if env.rank:  # Dropout draws from the global RNG: other masks on each rank; rank 0 keeps 1-process streams.
            torch.manual_seed(train.seed + env.rank)
        self.step_count = 0
        self.consecutive_nonfinite = 0
        self._nonfinite_total = 0
        if self.defer_checks:  # The device-side counts: skipped steps in a row, and in all.
            self._nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)
            self._nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
        self.step_graph = None
        if graphed:
            self.step_graph = StepGraph(self._iteration, device, [self.rng])
        elif self.defer_checks:
            warnings.warn("train.cuda_graph is set but the device is the CPU: the step runs eagerly (with its "
                          "checks deferred as on a GPU). Turn train.cuda_graph off to silence this.", stacklevel=2)

    def _resolve_switches(self, networks: Networks, prompts_on_host: bool | str) -> EngineSwitches:
        """train.compile, cuda_graph and channels_last for this run (engine/switches.py); where auto would compile,
        a probe first checks that torch.compile works on this device."""
        train = self.config.train

        def resolve(failure: str | None = None) -> EngineSwitches:
            return resolve_switches(train.compile, train.cuda_graph, train.channels_last, device_type=self.device.type,
                                    precision=self.precision, family=network_family(networks.generator),
                                    world_size=self.env.world_size, parallelism=self.parallelism,
                                    prompts_on_host=prompts_on_host, lr_warmup=train.lr_warmup_iterations > 0,
                                    compile_failure=failure, generator_steps=networks.generator.num_steps)

        switches = resolve()
        if switches.compile and train.compile == "auto":
            failure = compile_failure(self.device)
            if failure is not None:
                switches = resolve(failure)
        return switches

    @property
    def kimg(self) -> float:
        return self.step_count * self.config.train.batch_size / 1000

    @property
    def sampling_generator(self):
        return self.ema.module if self.ema else self.generator

    @property
    def sharded_checkpoints(self) -> bool:
        return self.parallelism == "fsdp"

    @property
    def nonfinite_total(self) -> int:
        """Steps skipped so far for NaN/inf losses or gradients (a host sync under deferred checks)."""
        return int(self._nonfinite_count) if self.defer_checks else self._nonfinite_total

    @nonfinite_total.setter
    def nonfinite_total(self, value: int) -> None:
        if self.defer_checks:
            self._nonfinite_count.fill_(value)
        else:
            self._nonfinite_total = value

    # -- one iteration -------------------------------------------------------------------------------------------

    def _draw(self, sigma: torch.Tensor):
        """The global batch's latents, labels and noise (same on every rank), with its noise levels `sigma`, and the
        re-noising noise of a multi-step generator's later steps (None for one step)."""
        batch = self.config.train.batch_size
        z = torch.randn((batch, *self.data_shape), generator=self.rng, device=self.device)
        cond = None
        if self.sample_condition is not None:
            cond = self.sample_condition(batch, self.rng, self.device)
        elif self.label_dim:
            labels = torch.randint(self.label_dim, (batch,), generator=self.rng, device=self.device)
            cond = torch.nn.functional.one_hot(labels, self.label_dim).float()
        noise = torch.randn((batch, *self.data_shape), generator=self.rng, device=self.device)
        step_noise = None
        if self.generator.num_steps > 1:
            step_noise = torch.randn((batch, self.generator.num_steps - 1, *self.data_shape), generator=self.rng,
                                     device=self.device)
        return z, cond, sigma, noise, step_noise

    def _update(self, micro_loss, wrapped, module, optimizer, scaler,
                lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor, str | torch.Tensor]:
        """Accumulate gradients over this rank's micro-batches, then clip and step unless the loss (averaged over
        ranks) or the global grad norm is not finite. Returns (loss, grad norm, outcome), the same on every rank;
        outcome is "ok", "nonfinite", or "overflow": an fp16 GradScaler still searching for its scale; under
        deferred checks it is a boolean tensor, True when the update was made. `micro_loss(index, part)` is the
        mean loss of micro-batch `index`, the slice `part` of the global batch; `lr`: this update's learning rate
        (during a warm-up), None: the optimizer's."""
        optimizer.zero_grad(set_to_none=True)
        rounds = len(self.micro_batches)
        total = 0
        for index, part in enumerate(self.micro_batches):
            with gradient_sync(wrapped, enabled=index == rounds - 1):
                loss = micro_loss(index, part)
                scaler.scale(loss / rounds if rounds > 1 else loss).backward()
            total = total + loss.detach()
        self.reshard_networks()  # FSDP: nothing stays gathered past an update (Wrapped.reshard says why).
        loss = all_reduce(total / rounds if rounds > 1 else total, self.env)
        if self.env.is_distributed:
            loss = loss / self.env.world_size
        scaler.unscale_(optimizer)
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(module.parameters(), self.max_grad_norm))
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if self.defer_checks:  # No host sync: the fused optimizer reads the verdict on the device.
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            optimizer.found_inf = (~finite).float()  # 1 skips the update, moments and step count included.
            optimizer.step()
            return loss, grad_norm.detach(), finite
        finite_loss, finite_grad = bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))
        outcome = "ok" if finite_loss and finite_grad else "nonfinite"
        if finite_loss and not finite_grad and scaler.is_enabled() and scaler.get_scale() >= 1:
            outcome = "overflow"  # The scaler halves its scale and retries: its normal search, not divergence.
        if outcome == "ok":
            scaler.step(optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return loss, grad_norm.detach(), outcome

    @property
    def generator_first(self) -> bool:
        return self.config.train.update_order == "generator_first"

    def step(self) -> dict:
        """One iteration; returns detached per-step statistics (tensors, to avoid a host sync per step)."""
        cfg = self.config
        # The host part of the step: noise levels from the CPU generator, in the order the updates use them, and
        # the EMA's decay for the images seen so far.
        fakes = [cfg.fake.sigma] * cfg.train.fake_updates_per_step
        sigma_configs = [cfg.objective.sigma, *fakes] if self.generator_first else [*fakes, cfg.objective.sigma]
        where = "cpu" if self.step_graph is not None else self.device  # The graph copies them into its buffers.
        inputs = [sample_sigma(config, cfg.train.batch_size, self.sigma_rng) for config in sigma_configs]
        if self.gan:
            inputs += self._gan_host_inputs()
        beta = 1.0
        if self.ema:
            beta = ema_beta(cfg.train.batch_size, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup_ratio,
                            nimg=self.step_count * cfg.train.batch_size)
        steps = self._draw_generator_steps(len(sigma_configs))
        inputs = [from_host(x, where) for x in [*inputs, torch.tensor([beta])]]
        stats = self.step_graph(inputs) if self.step_graph is not None else self._iteration(inputs, steps)
        self.step_count += 1
        last = self.step_count == cfg.train.max_steps
        if self.defer_checks and (self.step_count % cfg.train.tick_every == 0 or last):
            self.check_nonfinite()
        return stats

    def _draw_generator_steps(self, updates: int) -> list[int] | None:
        """How many steps of a multi-step generator make each update's samples: a uniform step index per update,
        shared by the whole batch (DMD2's selected_step, main/sd_unified_model.py L138), plus one; None (nothing
        drawn) for a one-step generator."""
        num_steps = self.generator.num_steps
        if num_steps == 1:
            return None
        return [int(index) + 1 for index in torch.randint(num_steps, (updates,), generator=self.sigma_rng)]

    def _warmup_lr(self, update: int) -> float | None:
        """The learning rate of this step's `update`-th fake update (-1: its generator update) during a warm-up,
        None otherwise. Counted as DMD2 counts iterations: one per fake update, the generator update sharing the
        iteration of the fake update next to it."""
        train = self.config.train
        if not train.lr_warmup_iterations:
            return None
        k = train.fake_updates_per_step
        iteration = self.step_count * k + (update if update >= 0 else 0 if self.generator_first else k - 1)
        base = train.generator_learning_rate if update < 0 else train.fake_learning_rate
        return base * warmup_factor(iteration, train.lr_warmup_iterations)

    def _gan_host_inputs(self) -> list[torch.Tensor]:
        """The GAN term's host inputs of one step: the generator's classification levels, then per fake update its
        real images, their labels (class-conditional teachers) and the levels of the real and generated images."""
        batch, gan = self.config.train.batch_size, self.config.gan
        inputs = [sample_sigma(gan.sigma, batch, self.sigma_rng)]
        for _ in range(self.config.train.fake_updates_per_step):
            images, labels = self.real_images.draw(batch, self.real_rng)
            inputs += [images, *([labels] if labels is not None else []),
                       sample_sigma(gan.sigma, batch, self.sigma_rng), sample_sigma(gan.sigma, batch, self.sigma_rng)]
        return inputs

    def _gan_inputs(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[RealBatch]]:
        """The generator's classification levels and each fake update's RealBatch, from `_gan_host_inputs`."""
        per_update = 4 if self.real_images.labels is not None else 3
        batches = []
        for start in range(1, len(inputs), per_update):
            images, *labels, sigma_real, sigma_fake = inputs[start:start + per_update]
            batches.append(RealBatch(images, labels[0] if labels else None, sigma_real, sigma_fake))
        return inputs[0], batches

    def _iteration(self, inputs: list[torch.Tensor], steps: list[int] | None = None) -> dict:
        """The device work of one iteration, given its host inputs: the noise levels of each update in the order they
        run (train.update_order), the GAN term's inputs if any, then the EMA's decay beta (a 1-element tensor);
        `steps`: the generator steps of each update's samples, in the same order (None: one step, or all of them)."""
        updates = 1 + self.config.train.fake_updates_per_step
        sigmas, beta = inputs[:updates], inputs[-1]
        steps = steps or [None] * updates
        gan_sigma, real_batches, gan_stats = None, None, {}
        if self.gan:
            gan_sigma, real_batches = self._gan_inputs(inputs[updates:-1])
        outcomes = []
        if self.generator_first:
            loss_gen, grad_gen, outcome, drawn = self._generator_update(sigmas[0], steps[0], gan_sigma, gan_stats)
            outcomes.append(outcome)
            loss_fake, grad_fake = self._fake_updates(sigmas[1:], outcomes, reuse=drawn, steps=steps[1:],
                                                      real_batches=real_batches,
                                                      gan_stats=gan_stats)
        else:
            loss_fake, grad_fake = self._fake_updates(sigmas[:-1], outcomes, steps=steps[:-1],
                                                      real_batches=real_batches, gan_stats=gan_stats)
            loss_gen, grad_gen, outcome, _ = self._generator_update(sigmas[-1], steps[-1], gan_sigma, gan_stats)
            outcomes.append(outcome)

        cfg = self.config
        if self.defer_checks:
            skipped = (~torch.stack(outcomes).all()).long()
            self._nonfinite_streak.mul_(skipped).add_(skipped)  # Back to 0 after a good step.
            self._nonfinite_count.add_(skipped)
        elif all(outcome == "ok" for outcome in outcomes):
            self.consecutive_nonfinite = 0
        else:  # Every skipped step is counted; fp16 scale-search overflows alone do not bring the stop closer.
            self._nonfinite_total += 1
            self.consecutive_nonfinite += "nonfinite" in outcomes
            if self.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                self._stop_nonfinite(self.consecutive_nonfinite, self.step_count + 1)
        if self.ema:
            self.ema.update(self.generator, beta.reshape(()))
        return {"loss_generator": loss_gen, "loss_fake": loss_fake,
                "grad_norm_generator": grad_gen, "grad_norm_fake": grad_fake, **gan_stats}

    def _mean_stat(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The mean of per-micro-batch statistics over this rank's micro-batches and all ranks, as `_update`'s loss."""
        mean = all_reduce(torch.stack(values).mean(), self.env)
        return mean / self.env.world_size if self.env.is_distributed else mean

    def _fake_updates(self, sigmas: list[torch.Tensor], outcomes: list, reuse=None, steps: list[int | None] = (),
                      real_batches: list[RealBatch] | None = None, gan_stats: dict | None = None):
        """One fake-score update per noise-level tensor; `reuse`: (latents, conditions, samples per micro-batch) of the
        generator update just made, whose samples the first of them trains on; `steps`: the generator steps of each
        update's samples (DMD2 trains its fake score on the multi-step generator's backward-simulated outputs);
        `real_batches`: each update's inputs of the GAN term (its statistics, of the last update, go to
        `gan_stats`). Returns the last loss and grad norm."""
        cfg = self.config
        for index, sigma_fake in enumerate(sigmas):
            step_noise, generator_steps = None, steps[index] if steps else None
            if reuse is not None and index == 0:
                z, cond, samples = reuse
                noise = torch.randn((cfg.train.batch_size, *self.data_shape), generator=self.rng, device=self.device)
                sigma = sigma_fake
            else:
                (z, cond, sigma, noise, step_noise), samples = self._draw(sigma_fake), None
            if self.null_condition is not None:  # Drawn for the global batch, so any split drops the same prompts.
                draw = torch.rand(cfg.train.batch_size, generator=self.rng, device=self.device)
                cond = cond.where(draw >= cfg.fake.prompt_dropout, self.null_condition)
            augmentation = None
            if cfg.fake.augment_p:  # Drawn for the global batch, like the noise, so any split sees the same.
                augmentation = draw_augmentation(cfg.train.batch_size, cfg.fake.augment_p, self.rng, self.device)
            real = real_batches[index] if real_batches is not None else None
            if real is not None:  # The classifier's noise for the real and the generated images.
                real_noise, gan_noise = (torch.randn((cfg.train.batch_size, *self.data_shape), generator=self.rng,
                                                     device=self.device) for _ in range(2))
            micro_stats = []

            def fake_loss(round_index, part):
                c = cond[part] if cond is not None else None
                if samples is not None:
                    x_g = samples[round_index]
                else:
                    with torch.no_grad(), autocast(self.precision, self.device), training_mode(self.generator, False):
                        x_g = self._generate(self.generator, z, c, step_noise, generator_steps, part)
                x_clean, labels = x_g, None
                if augmentation is not None:
                    x_g, labels = augment(x_g, augmentation[part]), augmentation[part].labels()
                with autocast(self.precision, self.device):
                    loss = fake_score_loss(self.fake_train, x_g, sigma[part], noise[part], c, cfg.fake.sigma_data,
                                           augment_labels=labels,
                                           guidance_scale=self.fake_train_guidance_scale)
                    if real is not None:  # DMD2's guidance_cls_loss on real and (un-augmented) generated images.
                        real_cond = real.cond[part] if real.cond is not None else None
                        gan_loss, stats = self.gan.discriminator_loss(
                            self.fake, real.images[part], real_cond, real.sigma_real[part], real_noise[part],
                            x_clean, c, real.sigma_fake[part], gan_noise[part])
                        loss = loss + gan_loss
                        micro_stats.append(stats)
                    return loss.float().mean()

            loss_fake, grad_fake, outcome = self._update(fake_loss, self.fake_train, self.fake, self.opt_fake,
                                                         self.scaler_fake, self._warmup_lr(index))
            outcomes.append(outcome)
            if micro_stats:
                gan_stats.update({key: self._mean_stat([s[key] for s in micro_stats]) for key in micro_stats[0]})
        return loss_fake, grad_fake

    def _generate(self, generator, z, cond, step_noise, steps: int | None, part: slice) -> torch.Tensor:
        """Micro-batch `part` of the generator's samples (float32): one step, or the x0 of step `steps` of a multi-step
        generator, its input made by the generator's own earlier steps (backward simulation)."""
        if step_noise is None:
            return generator(z[part], cond).float()
        return generator(z[part], cond, step_noise[part], steps).float()

    def _generator_update(self, sigma: torch.Tensor, steps: int | None = None, gan_sigma: torch.Tensor | None = None,
                          gan_stats: dict | None = None):
        """The generator update: the fake score's parameters (and its GAN head's) are frozen, its inputs still carry
        gradients; `steps`: which step of a multi-step generator is trained (its earlier steps only make that step's
        input); `gan_sigma`: the levels at which the GAN term classifies the samples (its statistic goes to
        `gan_stats`). Returns (loss, grad norm, outcome, (latents, conditions, this rank's samples per micro-batch,
        detached))."""
        trainable = [p for p in self.fake.parameters() if p.requires_grad]  # Restored as they were (LoRA, frozen).
        self.fake.requires_grad_(False)
        samples, micro_stats = [], []
        try:
            z, cond, sigma, noise, step_noise = self._draw(sigma)
            if gan_sigma is not None:
                gan_noise = torch.randn((self.config.train.batch_size, *self.data_shape), generator=self.rng,
                                        device=self.device)

            def generator_loss(round_index, part):
                c = cond[part] if cond is not None else None
                with autocast(self.precision, self.device):
                    x_g = self._generate(self.generator_train, z, c, step_noise, steps, part)
                    if self.generator_first:  # The next fake update trains on these.
                        samples.append(x_g.detach())
                    loss = self.objective.generator_loss(x_g, sigma[part], noise[part], self.teacher, self.fake, c)
                    if gan_sigma is not None:  # DMD2's gen_cls_loss: fool the head.
                        gan_loss, stat = self.gan.generator_loss(self.fake, x_g, gan_sigma[part], gan_noise[part], c)
                        loss = loss + gan_loss
                        micro_stats.append(stat)
                    return loss.float().mean()

            with training_mode(self.fake, False):
                loss, grad_norm, outcome = self._update(generator_loss, self.generator_train, self.generator,
                                                        self.opt_generator, self.scaler_generator, self._warmup_lr(-1))
        finally:
            for parameter in trainable:
                parameter.requires_grad_(True)
        if micro_stats:
            gan_stats["loss_gan_generator"] = self._mean_stat(micro_stats)
        return loss, grad_norm, outcome, (z, cond, samples)

    def check_nonfinite(self) -> None:
        """Under deferred checks: stop the run (NonFiniteError) if the device counted train.max_consecutive_nonfinite
        skipped steps in a row. One host sync; step() calls it every train.tick_every steps and at the last."""
        streak = int(self._nonfinite_streak)
        if streak >= self.config.train.max_consecutive_nonfinite:
            self._stop_nonfinite(streak, self.step_count)

    def _stop_nonfinite(self, streak: int, last: int) -> None:
        limit = self.config.train.max_consecutive_nonfinite
        raise NonFiniteError(
            f"{streak} consecutive steps had NaN/inf losses or gradients (steps {last - streak + 1}-{last}, "
            f"train.max_consecutive_nonfinite={limit}); the run stops here and its last checkpoint is intact. "
            "Lower train.lr, set train.grad_clip, or use train.precision=fp32.")

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"generator": self.generator, "fake": self.fake}
        if self.ema:
            mods["ema"] = self.ema.module
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_generator, "fake": self.opt_fake}

    def _rank_rng(self) -> dict[str, torch.Tensor]:
        """This process's global RNG states (dropout draws from them)."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _sharded_state(self) -> dict:
        """Networks and optimizers keyed by parameter name, as this rank's shards (plain tensors without FSDP)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {name: get_model_state_dict(module) for name, module in self.modules().items()}
        for name, optimizer in self.optimizers().items():
            state[f"optimizer.{name}"] = get_optimizer_state_dict(self.modules()[name], optimizer)
        return state

    def save(self, run: RunDir) -> Path:
        """Write the full state for the current step on every rank together; returns the checkpoint folder."""
        env = self.env
        rng = {"train": self.rng.get_state(), "sigma": self.sigma_rng.get_state()}
        if self.gan:
            rng["real"] = self.real_rng.get_state()
        for rank, states in enumerate(all_gather_object(self._rank_rng(), env)):
            rng.update({f"rank{rank}.{kind}": value for kind, value in states.items()})
        state = {"kimg": self.kimg, "nonfinite_total": self.nonfinite_total, "parallelism": self.parallelism,
                 "world_size": env.world_size, "modules": list(self.modules()),
                 "scalers": {"generator": self.scaler_generator.state_dict(), "fake": self.scaler_fake.state_dict()}}
        with saving(run.checkpoints, self.step_count, env) as tmp:
            written = []
            if self.sharded_checkpoints:
                written = write_sharded(tmp, self._sharded_state(), env)
                if env.is_main:
                    written += write_rng(tmp, rng)
            elif env.is_main:  # Every rank holds identical full networks: rank 0 writes them.
                written, state["optimizers"] = write_full(tmp, self.modules(), self.optimizers(), rng)
            hashes = gather_hashes(hash_files(tmp, written), env)
            return commit(run.checkpoints, tmp, self.step_count, state, hashes, self.config.train.keep_checkpoints,
                          env)

    def load(self, state: dict, folder: Path) -> None:
        """Restore the state saved in `folder` (already verified), under any number of ranks."""
        if is_sharded(folder):
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            sharded = self._sharded_state()
            read_sharded(folder, sharded)
            for name, module in self.modules().items():
                set_model_state_dict(module, sharded[name])
            for name, optimizer in self.optimizers().items():
                set_optimizer_state_dict(self.modules()[name], optimizer, sharded[f"optimizer.{name}"])
        elif self.sharded:
            raise CheckpointError(
                f"Checkpoint {folder} holds full (DDP) weights but this run shards with FSDP; resume it with "
                "train.parallelism=ddp (or auto), the setting it was written under.")
        else:
            _, weights, tensors = read_checkpoint(folder, verify=False)
            for name, module in self.modules().items():
                module.load_state_dict(weights[name])
            for name, optimizer in self.optimizers().items():
                load_optimizer_state(optimizer, unflatten_optimizer(name, tensors, state["optimizers"][name]))
        rng = read_rng(folder)
        self.rng.set_state(rng["train"])
        self.sigma_rng.set_state(rng["sigma"])
        if self.gan:
            self.real_rng.set_state(rng["real"])
        # Per-rank streams map onto ranks only when the rank count is unchanged; otherwise each keeps its seed.
        if state.get("world_size", 1) == self.env.world_size:
            prefix = f"rank{self.env.rank}."
            if prefix + "cpu" in rng:
                torch.set_rng_state(rng[prefix + "cpu"])
            if prefix + "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng[prefix + "cuda"], self.device)
        if self.step_graph is not None:  # The optimizers' state tensors were replaced: capture anew.
            self.step_graph.reset()
        self.scaler_generator.load_state_dict(state["scalers"]["generator"])
        self.scaler_fake.load_state_dict(state["scalers"]["fake"])
        self.step_count = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)

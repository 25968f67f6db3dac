"""The run configuration: pydantic models (unknown keys are errors), presets, --config files and --set overrides.

Merge order: preset, then the --config file, then each --set key.path=value; the result is validated once.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict as StrictType, ValidationError,
                      field_validator, model_validator)

from .errors import InputError, MissingFileError, OnestepError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "digits-sim"
DISCRIMINATORS = ("kind", "name")  # Keys that pick a variant of a config section (teacher.kind, objective.name).
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # A preset is a name; a file is given with --config.
MAX_YAML_NODES = 100_000  # Values a YAML file may expand to through its aliases; a run config has a few hundred.
MAX_SEED = 2**63 - 1  # Per-sample seeds are int64 (numpy's seed arrays, torch.Generator.manual_seed).
MAX_SEEDS = 10_000_000  # Seeds one command may name (200x the 50k of FID); larger sets are split, seeds shard exactly.


def _not_a_boolean(value):
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    return value


def _reshard_after_forward(value):
    if isinstance(value, bool) or (isinstance(value, int) and value >= 2):
        return value
    if value == 1:
        raise ValueError("1 would reshard to one process, which is false (keep the gathered parameters); use false")
    raise ValueError("expected true, false or a number of processes (2 or more, dividing the number of processes) "
                     "to reshard to after forward")


def _switch(value):
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError("expected true, false or auto")


Int = Annotated[int, StrictType()]  # An integer: not a float, string or boolean, which pydantic would convert.
Float = Annotated[float, BeforeValidator(_not_a_boolean)]  # A number; pydantic would read true/false as 1.0/0.0.
Switch = Annotated[Union[bool, Literal["auto"]], BeforeValidator(_switch)]  # On, off, or the engine's choice.
ReshardAfterForward = Annotated[Union[bool, int], BeforeValidator(_reshard_after_forward)]  # FSDP2's own argument.


class ConfigError(OnestepError, ValueError):
    """A configuration problem, phrased as a sentence a user can act on (exit code 2: change the config)."""

    exit_code = 2


class Strict(BaseModel):
    # Unknown keys are errors, numbers are finite (an infinite EMA half-life trains nothing).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------------------------
# Teachers


class GMMTeacherConfig(Strict):
    """Analytic Gaussian mixture with isotropic components; its denoiser E[x0 | x] is exact."""

    kind: Literal["gmm"] = "gmm"
    means: list[list[Float]]  # One point per component, all of the same dimension.
    stds: list[Float]  # Isotropic standard deviation per component.
    weights: list[Float] | None = None  # Mixture weights; uniform when omitted.

    @model_validator(mode="after")
    def _check_shapes(self):
        if not self.means:
            raise ValueError("teacher.means is empty: give at least one component mean, e.g. [[0.0, 0.0]]")
        dims = {len(m) for m in self.means}
        if len(dims) != 1:
            raise ValueError(f"teacher.means mixes dimensions {sorted(dims)}: every mean needs the same length")
        if len(self.stds) != len(self.means):
            raise ValueError(f"teacher.stds has {len(self.stds)} entries but teacher.means has {len(self.means)}")
        if any(s <= 0 for s in self.stds):
            raise ValueError(f"teacher.stds must all be positive, got {self.stds}")
        if self.weights is not None:
            if len(self.weights) != len(self.means):
                raise ValueError(f"teacher.weights has {len(self.weights)} entries, teacher.means {len(self.means)}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"teacher.weights must be non-negative with a positive sum, got {self.weights}")
        return self


class EDMTeacherConfig(Strict):
    """An EDM network: an EDM/SiD `.pkl` snapshot or a converted folder (model.safetensors + config.json)."""

    kind: Literal["edm"] = "edm"
    path: Path  # A leading '@assets/' means the folder of teachers shipped inside the package.
    snapshot_key: str = "ema"  # Which network of the pickled dict to use.
    hint: str | None = None  # Where the expected file is published; shown when `path` is missing.

    @property
    def resolved_path(self) -> Path:
        return resolve_asset_path(self.path)


ASSET_PREFIX = "@assets/"
ASSET_DIR = Path(__file__).resolve().parent / "assets"


def resolve_asset_path(path: Path | str) -> Path:
    """Paths starting with '@assets/' point inside the package's shipped assets; others are used as given."""
    text = str(path)
    return ASSET_DIR / text[len(ASSET_PREFIX):] if text.startswith(ASSET_PREFIX) else Path(text)


class DiffusersTeacherConfig(Strict):
    """A text-to-image diffusers pipeline (SD 1.5/2.1, SDXL, PixArt-α/Σ; SD3, SANA), distilled in its VAE's latents."""

    kind: Literal["diffusers"] = "diffusers"
    path: str  # Local diffusers folder (with model_index.json), a hub id (downloaded on first use), or '@assets/...'.
    revision: str | None = None  # Hub revision; a commit hash pins the files. None: main.
    variant: str | None = None  # Weight-file variant, e.g. 'fp16'.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # Frozen teacher's weights; trained copies stay fp32.
    guidance_scale: Float = Field(1.0, ge=0)  # SiD-LSG's kappa4: the teacher's CFG scale in the generator loss; 1: off.
    null_condition: Literal["auto", "empty_prompt", "zeros"] = "auto"  # Guidance null (auto: the pipeline's own).
    image_size: tuple[Int, Int] | None = None  # (H, W) pixels of generated images; None: the network's native size.
    # SD3, SANA, PixArt: T5 or Gemma tokens per prompt (the pipelines' max_sequence_length); None: the pipeline's own.
    max_sequence_length: Int | None = Field(None, ge=0)
    hint: str | None = None  # Where the teacher is published; shown when it cannot be loaded.

    @field_validator("image_size")
    @classmethod
    def _check_image_size(cls, size):
        if size is not None and not all(side > 0 for side in size):
            raise ValueError(f"teacher.image_size must be two positive pixel counts (H, W), got {list(size)}")
        return size

    @property
    def resolved_path(self) -> str:
        """The folder or hub id to load: '@assets/...' resolved inside the package, anything else as given."""
        return str(resolve_asset_path(self.path)) if self.path.startswith(ASSET_PREFIX) else self.path


TeacherConfig = Annotated[Union[GMMTeacherConfig, EDMTeacherConfig, DiffusersTeacherConfig],
                          Field(discriminator="kind")]


class PromptsConfig(Strict):
    """Training prompts of a text-to-image teacher: up to cache_max encoded once into `prompts.safetensors` in the run
    directory; a larger file is streamed, each step reading and encoding its batch's prompts."""

    path: Path | None = None  # .txt (one per line), .jsonl ('prompt'/'caption' key) or COCO .json; '@assets/...' too.
    cache_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # Embeddings' dtype; None: the encoder's.
    # Most prompts encoded once and cached (236 KB each for SD, 630 KB for SDXL in float32); a file with more is
    # streamed: its lines are indexed, not held, and the text encoders stay loaded on the training device. 0: stream.
    cache_max: int = Field(100_000, ge=0)


# ---------------------------------------------------------------------------------------------------------------------
# Networks trained by the run (generator and fake score) when the teacher is not itself a network to copy.


class MLPConfig(Strict):
    hidden_dim: Int = Field(256, gt=0)  # Width of each hidden layer.
    num_layers: Int = Field(4, ge=1)  # Number of hidden layers.
    noise_embedding_dim: Int = Field(32, gt=0)  # Fourier features of log(sigma).
    sigma_data: Float = Field(0.5, gt=0)  # Data scale used by the EDM preconditioning.
    input_fourier_dim: Int = Field(0, ge=0)  # Random Fourier features of the input (0: none).
    input_fourier_scale: Float = Field(1.0, gt=0)  # Std of their frequencies, in cycles per unit of c_in * x.


# ---------------------------------------------------------------------------------------------------------------------
# Noise-level distributions (objectives/sigmas.py draws them; docs/presets.md cites the official code of each)


class KarrasSigmaConfig(Strict):
    """SiD's generator noise levels: t ~ U(0, t_max), sigma = Karras grid position 1 - t (t = 0 is sigma_min)."""

    kind: Literal["karras"] = "karras"
    sigma_min: Float = Field(0.002, gt=0)
    sigma_max: Float = Field(80.0, gt=0)
    rho: Float = Field(7.0, gt=0)
    t_max: Float = Field(0.8, gt=0, le=1)  # SiD's tmax / 1000: sigma in [sigma_min, 24.4] at 0.8 (EDM's range).


class KarrasIndexSigmaConfig(Strict):
    """DMD2's noise levels: a uniform integer index into a num_levels Karras grid ascending from sigma_min (index 0),
    from int(min_fraction num_levels) to int(max_fraction num_levels) inclusive (at most num_levels - 1)."""

    kind: Literal["karras_index"] = "karras_index"
    sigma_min: Float = Field(0.002, gt=0)
    sigma_max: Float = Field(80.0, gt=0)
    rho: Float = Field(7.0, gt=0)
    num_levels: Int = Field(1000, ge=2)
    min_fraction: Float = Field(0.02, ge=0, le=1)
    max_fraction: Float = Field(0.98, ge=0, le=1)


class LogNormalSigmaConfig(Strict):
    kind: Literal["lognormal"] = "lognormal"
    mean_log: Float = -1.2
    std_log: Float = Field(1.2, gt=0)


class UniformTimestepSigmaConfig(Strict):
    """SiD-LSG's noise levels: a uniform integer DDPM timestep t in [t_min, t_max) (t_max excluded, torch.randint's
    bounds), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) on a DDPM beta schedule (defaults: Stable Diffusion's)."""

    kind: Literal["uniform_timestep"] = "uniform_timestep"
    t_min: Int = Field(20, ge=0)  # SiD-LSG's --tmin.
    t_max: Int = Field(980, gt=0)  # SiD-LSG's --tmax, never drawn.
    num_train_timesteps: Int = Field(1000, ge=2)
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    beta_start: Float = Field(0.00085, gt=0, lt=1)
    beta_end: Float = Field(0.012, gt=0, lt=1)

    @model_validator(mode="after")
    def _check_range(self):
        if not self.t_min < self.t_max <= self.num_train_timesteps:
            raise ValueError(f"the timesteps drawn, [t_min, t_max) = [{self.t_min}, {self.t_max}), must be a non-empty "
                             f"range within the schedule's {self.num_train_timesteps} timesteps; SiD-LSG uses "
                             "t_min: 20, t_max: 980")
        return self


SigmaConfig = Annotated[
    Union[KarrasSigmaConfig, KarrasIndexSigmaConfig, LogNormalSigmaConfig, UniformTimestepSigmaConfig],
    Field(discriminator="kind"),
]

# Dropout of a trained copy of an EDM teacher, active only in that copy's own update (SiD); None keeps the teacher's.
Dropout = Annotated[Float, Field(ge=0, lt=1)] | None


class GeneratorConfig(Strict):
    sigma_init: Float = Field(2.5, gt=0)  # G(z) = D(sigma_init * z, sigma_init).
    mlp: MLPConfig = MLPConfig()
    lora_rank: Int = Field(0, ge=0)  # Diffusers teachers: 0 trains every weight, r > 0 only rank-r LoRA adapters.
    dropout: Dropout = None  # EDM teachers: dropout probability in the generator's U-Net blocks; None: the teacher's.
    # Denoiser steps per sample, re-noised in between (DMD2's multi-step generator, trained by backward simulation).
    num_steps: Int = Field(1, ge=1)
    # The noise level of each step, decreasing (overrides sigma_init); None: the default schedule (docs/guide.md).
    step_sigmas: list[Annotated[Float, Field(gt=0)]] | None = None

    @model_validator(mode="after")
    def _check_step_sigmas(self):
        sigmas = self.step_sigmas
        if sigmas is None:
            return self
        if len(sigmas) != self.num_steps:
            raise ValueError(f"generator.step_sigmas has {len(sigmas)} levels but generator.num_steps is "
                             f"{self.num_steps}; give one level per step, or set generator.num_steps={len(sigmas)}")
        if any(later >= earlier for earlier, later in zip(sigmas, sigmas[1:])):
            raise ValueError(f"generator.step_sigmas must decrease from the first step to the last, got {sigmas}")
        return self


# `fake.guidance_scale` is shorthand for both of the fake score's guidance scales (SiD-LSG's kappa1 = kappa2 = kappa3).
FAKE_GUIDANCE_SHORTHAND = "guidance_scale"
FAKE_GUIDANCE_KEYS = ("train_guidance_scale", "generator_loss_guidance_scale")


def expand_fake_guidance(fake: Any, where: str = "fake") -> Any:
    """A `fake:` section with the shorthand `guidance_scale: k` written out as both scales it stands for; an error
    when the same section also gives one of them another value (which one was meant cannot be known)."""
    if not isinstance(fake, dict) or FAKE_GUIDANCE_SHORTHAND not in fake:
        return fake
    out = dict(fake)
    scale = out.pop(FAKE_GUIDANCE_SHORTHAND)
    for key in FAKE_GUIDANCE_KEYS:
        if key in out and out[key] != scale:
            raise ConfigError(f"{where} sets fake.guidance_scale={scale} and fake.{key}={out[key]}: guidance_scale "
                              "is shorthand for fake.train_guidance_scale (kappa1) and "
                              "fake.generator_loss_guidance_scale (kappa2 = kappa3) together; give either it or "
                              "those two.")
        out[key] = scale
    return out


class FakeScoreConfig(Strict):
    mlp: MLPConfig = MLPConfig()
    lora_rank: Int = Field(0, ge=0)  # Diffusers teachers: 0 trains every weight, r > 0 only rank-r LoRA adapters.
    # Classifier-free guidance of the fake score (diffusers teachers; 1: none), SiD-LSG's kappas. `guidance_scale: k`
    # is accepted as shorthand for both. kappa1: its scale in its own denoising loss (SiD-LSG's cfg_train_fake).
    train_guidance_scale: Float = Field(1.0, ge=0)
    # kappa2 = kappa3: its scale where the generator loss evaluates it (cfg_eval_fake; one evaluation serves both).
    generator_loss_guidance_scale: Float = Field(1.0, ge=0)
    sigma: SigmaConfig = LogNormalSigmaConfig()  # Noise levels of its denoising score matching loss (EDM, SiD).
    # EDM loss weight lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; null: its limit 1 / sigma^2, the
    # epsilon-prediction MSE that SiD-LSG trains its fake score with (sid_training_loop.py's (noise_fake - noise)^2).
    sigma_data: Annotated[Float, Field(gt=0)] | None = 0.5
    # Probability that a sample of the fake score's own update has its prompt replaced by the null condition, for the
    # generator's sample and the fake score alike (diffusers teachers). SiD-LSG: 0.1 when the fake score is guided.
    prompt_dropout: Float = Field(0.0, ge=0, lt=1)
    dropout: Dropout = None  # EDM teachers: dropout probability in the fake score's U-Net blocks; None: the teacher's.
    # EDM's non-leaking augmentation of the generated images that train the fake score (its CIFAR-10 geometric ops,
    # each with probability augment_p; labels to the network's 9 augment inputs); 0: off. SiD's CIFAR-10 uses 0.12.
    augment_p: Float = Field(0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _expand_guidance_shorthand(cls, data):
        try:
            return expand_fake_guidance(data, "the config")
        except ConfigError as error:
            raise ValueError(str(error).rstrip(".")) from None


# ---------------------------------------------------------------------------------------------------------------------
# Objectives


# How each sample's generator loss is scaled: by nothing, or by sg(mean |x_g - D_teacher|) as SiD and DMD do.
Normalization = Literal["none", "mean_abs_error"]


class SIMObjectiveConfig(Strict):
    name: Literal["sim"] = "sim"
    distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    # Pseudo-Huber scale c in d(y) = sqrt(|y|^2 + c^2) - c, in score units summed over the data's D elements, so |y|
    # grows like sqrt(D); auto: c = sqrt(D) (docs/objectives.md says how it was chosen).
    huber_c: Union[Annotated[Float, Field(gt=0)], Literal["auto"]] = "auto"
    weighting: Literal["unit", "sigma4"] = "sigma4"  # w(sigma): 1, or sigma^4 (denoiser units, as SiD).
    normalization: Normalization = "mean_abs_error"
    sigma: SigmaConfig = KarrasSigmaConfig()


class SiDObjectiveConfig(Strict):
    name: Literal["sid"] = "sid"
    alpha: Float = 1.2  # SiD's alpha; 0.5 is the full Fisher-divergence gradient, 1 its sampling-fixed part.
    normalization: Normalization = "mean_abs_error"
    sigma: SigmaConfig = KarrasSigmaConfig()


class DMDObjectiveConfig(Strict):
    name: Literal["dmd"] = "dmd"
    normalization: Normalization = "mean_abs_error"
    sigma: SigmaConfig = KarrasIndexSigmaConfig()


class DIObjectiveConfig(Strict):
    name: Literal["di"] = "di"
    normalization: Normalization = "none"
    sigma: SigmaConfig = KarrasIndexSigmaConfig()


ObjectiveConfig = Annotated[
    Union[SIMObjectiveConfig, SiDObjectiveConfig, DMDObjectiveConfig, DIObjectiveConfig], Field(discriminator="name")
]


# ---------------------------------------------------------------------------------------------------------------------
# DMD2's GAN term (docs/objectives.md#the-gan-term)


class GANConfig(Strict):
    """DMD2's GAN term: a classifier head on the fake score's bottleneck features tells real images from generated
    ones (non-saturating softplus losses); the head trains with the fake score, the generator learns to fool it.

    Both weights are in DMD2's units, relative to its losses averaged over a sample's elements (onestep's losses are
    sums over them, so each GAN loss enters multiplied by the element count C*H*W)."""

    # Real images: a folder of images or an .npz (uint8 'samples' [N, H, W, C] or [-1, 1] float [N, C, H, W], with
    # 'labels' for a class-conditional teacher); '@assets/...' points inside the package, e.g. the digits at 8x8:
    # '@assets/digits_real/digits8.npz'. Held in memory as uint8, drawn uniformly with replacement each update.
    data: Path
    gen_cls_loss_weight: Float = Field(3e-3, ge=0)  # The generator's GAN loss weight (DMD2 ImageNet 3e-3, SDXL 5e-3).
    guidance_cls_loss_weight: Float = Field(1e-2, ge=0)  # The head's classification loss weight in the fake update.
    # Noise levels of the images the fake score classifies, each image its own draw (DMD2's --diffusion_gan with
    # --diffusion_gan_max_timestep 1000, as every published DMD2 recipe: the whole 1000-level Karras grid).
    sigma: SigmaConfig = KarrasIndexSigmaConfig(min_fraction=0.0, max_fraction=1.0)

    @property
    def resolved_data(self) -> Path:
        return resolve_asset_path(self.data)


# ---------------------------------------------------------------------------------------------------------------------
# Training


FLOAT32_MAX = 3.4028234663852886e38


class TrainConfig(Strict):
    batch_size: Int = Field(256, gt=0)  # Images (or points) per generator update, over all processes (global batch).
    # Micro-batches per update on each process (per-process batch divides by it).
    grad_accumulation: Int = Field(1, ge=1)
    # Largest micro-batch a process computes at once (EDM's and SiD's --batch-gpu): the accumulation rounds follow from
    # batch_size / (processes x batch_gpu); None: the whole per-process share at once, or train.grad_accumulation.
    batch_gpu: Int | None = Field(None, gt=0)
    lr: Float = Field(1e-4, gt=0)  # Learning rate of both networks unless overridden below.
    generator_lr: Float | None = Field(None, gt=0)
    fake_lr: Float | None = Field(None, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    betas: tuple[Float, Float] = (0.0, 0.999)
    weight_decay: Float = Field(0.0, ge=0)
    eps: Float = Field(1e-8, gt=0)  # Adam's epsilon (SiD uses 1e-6 with --fp16).
    # Max global grad norm per network, of the gradient of the loss averaged over data elements as DMD2 computes it
    # (onestep sums each sample's loss over its D elements, so the threshold applied is grad_clip * D); None: off.
    grad_clip: Float | None = Field(None, gt=0)
    # The order inside one step: fake_first (SiD: k fake updates, then the generator) or generator_first (DMD2: the
    # generator, then k fake updates, the first on the same samples the generator update drew, before it changed).
    update_order: Literal["fake_first", "generator_first"] = "fake_first"
    # Linear learning-rate warm-up from 0 over this many fake-score updates (DMD2's constant_with_warmup, which counts
    # its iterations: a generator update takes the lr of the iteration it happens in); 0: none.
    lr_warmup_iterations: Float = Field(0.0, ge=0)
    max_steps: Int = Field(1000, gt=0)  # Generator updates.
    fake_updates_per_step: Int = Field(1, ge=1)
    ema_halflife_kimg: Float | None = Field(0.5, gt=0)  # None disables the EMA (the raw generator is used).
    # Half-life at most this fraction of the images seen so far (EDM's and SiD's ramp-up): the average starts equal
    # to the generator instead of holding on to its initialisation; None: the full half-life from the first step.
    ema_rampup_ratio: Float | None = Field(0.05, gt=0)
    seed: Int = Field(0, ge=0, le=MAX_SEED)  # Seed of the run's random numbers.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tf32: bool = True  # TF32 tensor cores for float32 matmuls and convolutions on CUDA; false for strict IEEE fp32.
    parallelism: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: DDP, or FSDP2 when the networks would not fit one GPU.
    # FSDP2 only (docs/scaling.md): after each block's forward, true frees its gathered parameters (gathered again
    # for the backward), false keeps them until the backward (more memory, one all-gather fewer per block), a number
    # of processes N reshards them over groups of N (a backward all-gather within the group, e.g. one node's GPUs).
    fsdp_reshard_after_forward: ReshardAfterForward = True
    # FSDP2 only: 0 leaves prefetching to FSDP2; N issues the next N blocks' all-gathers explicitly in forward (the
    # previous N in backward): earlier overlap with compute, N blocks' gathered parameters held at once.
    fsdp_prefetch: Int = Field(0, ge=0)
    # Recompute block activations in backward: less memory, more time. true: all three networks; or a list of some
    # of teacher, generator, fake (the guided teacher holds half the generator update's activations: [teacher]
    # halves that memory for +2 of 13 forward passes, docs/benchmarks.md).
    gradient_checkpointing: Union[bool, list[Literal["teacher", "generator", "fake"]]] = False
    # The speed switches (docs/benchmarks.md; engine/switches.py resolves them). auto, as every image preset sets
    # them: the fastest measured configuration for the network family on one CUDA device, off where it cannot apply
    # (the run says which and why once, and records it in run.json); eager on the CPU.
    # CUDA: NHWC activations; CPU ignores it. EDM U-Nets: slower eager; with compile and cuda_graph the fastest
    # measured (our Triton GroupNorm kernels for NHWC). auto: EDM U-Nets when compiled under the CUDA graph.
    channels_last: Switch = False
    # CUDA: one fused Adam/AdamW kernel per network instead of per-tensor loops; CPU ignores it.
    fused_optimizer: bool = False
    # torch.compile each network block (compiled once per distinct block, cached under ONESTEP_HOME); eager where it
    # cannot. auto: EDM U-Nets under the CUDA graph, diffusers transformers without FSDP.
    compile: Switch = False
    # CUDA: record the whole step once as a CUDA graph and replay it (one process, bf16/fp32; fused Adam; non-finite
    # steps skipped on the GPU and checked every tick_every steps). true: an error where it cannot apply; auto: on
    # where it can (one CUDA process, no FSDP, bf16/fp32, prompts' conditions <= 4 GiB).
    cuda_graph: Switch = False
    checkpoint_every: Int = Field(500, gt=0)  # Steps between checkpoints (one is always written at the end).
    keep_checkpoints: Int = Field(2, ge=1)  # Newest complete checkpoints kept on disk.
    tick_every: Int = Field(50, gt=0)  # Steps between status lines and stats.jsonl records.
    max_consecutive_nonfinite: Int = Field(10, ge=1)  # Skipped non-finite steps in a row before the run stops.

    @field_validator("lr", "generator_lr", "fake_lr")
    @classmethod
    def _check_lr(cls, lr, info):
        # torch's optimizers refuse, at the first update, a step size that float32 weights cannot hold.
        if lr is not None and not lr < FLOAT32_MAX:
            raise ValueError(f"train.{info.field_name}={lr:g} is beyond the largest float32 ({FLOAT32_MAX:.2g}), "
                             "which an optimizer step can hold; learning rates are typically 1e-6 to 1e-3")
        return lr

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas):
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"train.betas must lie in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _check_accumulation(self):
        if self.batch_gpu is not None and self.grad_accumulation > 1:
            raise ValueError(f"train.batch_gpu={self.batch_gpu} and train.grad_accumulation={self.grad_accumulation} "
                             "both set the micro-batch; set only one (batch_gpu derives the accumulation rounds)")
        return self

    @property
    def checkpointed_networks(self) -> tuple[str, ...]:
        """The networks whose blocks gradient checkpointing recomputes, of teacher, generator and fake."""
        if isinstance(self.gradient_checkpointing, bool):
            return ("teacher", "generator", "fake") if self.gradient_checkpointing else ()
        return tuple(dict.fromkeys(self.gradient_checkpointing))

    @property
    def generator_learning_rate(self) -> float:
        return self.generator_lr if self.generator_lr is not None else self.lr

    @property
    def fake_learning_rate(self) -> float:
        return self.fake_lr if self.fake_lr is not None else self.lr


class EvalConfig(Strict):
    """Metrics computed during training (metrics.jsonl), so `onestep compare` can plot them against kimg."""

    metrics: list[str] = ["swd", "mode_coverage"]
    every_steps: Int | None = Field(None, gt=0)  # None: only at the end of the run.
    at_start: bool = False  # Also evaluate the initial generator (step 0) of a fresh run: where its curve begins.
    num_samples: Int = Field(2000, gt=0, le=MAX_SEEDS)
    seed: Int = Field(1_000_000, ge=0, le=MAX_SEED)  # First per-sample seed of the evaluation samples.
    # Reference of distribution metrics (fid, kid, fd_*): statistics .npz, image .npz or folder, as `onestep eval
    # --ref`; '@assets/...' points inside the package. None: each metric's default reference, if it has one.
    ref: Path | None = None
    fid_mode: Literal["edm", "clean", "legacy_tensorflow"] = "edm"
    batch_size: Int = Field(256, gt=0)  # Images per feature-network call.

    @model_validator(mode="after")
    def _check_seeds(self):
        if self.seed + self.num_samples - 1 > MAX_SEED:
            raise ValueError(f"eval.seed={self.seed} with eval.num_samples={self.num_samples} runs past the largest "
                             f"seed, {MAX_SEED} (2^63 - 1); choose a smaller eval.seed")
        return self

    @property
    def resolved_ref(self) -> Path | None:
        return resolve_asset_path(self.ref) if self.ref is not None else None


class WandbConfig(Strict):
    """A Weights & Biases run that receives the same records (needs `pip install wandb` and `wandb login`)."""

    project: str
    entity: str | None = None  # W&B team or user; None: the logged-in default.
    name: str | None = None  # Display name; None: the run directory's name.


class LoggingConfig(Strict):
    """Experiment trackers, off by default: rank 0 sends each stats.jsonl record (every tick) and each in-training
    evaluation's metrics to them, keyed by step; a resumed run appends."""

    tensorboard: bool = False  # Event files in RUN/tensorboard/ by torch's SummaryWriter (pip install tensorboard).
    wandb: WandbConfig | None = None  # e.g. {project: my-distillation}; None: no W&B run.


class RunConfig(Strict):
    teacher: TeacherConfig
    prompts: PromptsConfig = PromptsConfig()
    generator: GeneratorConfig = GeneratorConfig()
    fake: FakeScoreConfig = FakeScoreConfig()
    objective: ObjectiveConfig = SIMObjectiveConfig()
    gan: GANConfig | None = None  # DMD2's GAN term added to the objective; None: off.
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()


# ---------------------------------------------------------------------------------------------------------------------
# Presets and merging


class YAMLRefused(ConfigError, yaml.YAMLError):
    """A YAML document that parses but that onestep does not read: a key given twice in one mapping, or aliases that
    expand beyond MAX_YAML_NODES values (a few hundred bytes can otherwise expand to gigabytes)."""


class _ConfigLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden; only a mapping's own keys must differ.
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # SafeLoader's own error names it.
                if key in seen:
                    raise YAMLRefused(f"the key {key!r} appears twice in one mapping (line "
                                      f"{key_node.start_mark.line + 1}); keep one")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node, sizes: dict) -> int:
    """Values in `node` with every alias expanded, counted without expanding them (aliases share their node)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise YAMLRefused("an alias refers to a value that contains it, which expands without end")
        return sizes[id(node)]
    sizes[id(node)] = None
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def load_yaml(text: str) -> Any:
    """One YAML document, read as yaml.safe_load reads it; YAMLRefused for duplicate keys and alias bombs."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise YAMLRefused(f"its aliases (*name) expand to {size} values, more than the {MAX_YAML_NODES} a config "
                              "may hold; write the values out or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{error.problem}{where}"
    return " ".join(str(error).split())


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the `description:` key of the YAML file)."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        data = load_yaml(path.read_text()) or {}
        out[path.stem] = str(data.get("description", ""))
    return out


def is_preset(name: str) -> bool:
    """Whether `name` names a shipped preset (a name, never a path: files are given with --config)."""
    return PRESET_NAME.fullmatch(name) is not None and (PRESET_DIR / f"{name}.yaml").is_file()


def read_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not PRESET_NAME.fullmatch(name):
        shown = f"'{name}'" if name else "'' (empty)"
        raise ConfigError(f"Preset {shown} is not a preset name; name one of `onestep presets` (e.g. "
                          f"{DEFAULT_PRESET}), or pass a YAML file with --config.")
    if not path.is_file():
        names = list(list_presets())
        hint = difflib.get_close_matches(name, names, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"Unknown preset '{name}'.{did_you_mean} Available: {', '.join(names)}.")
    data = load_yaml(path.read_text()) or {}
    data.pop("description", None)
    return data


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MissingFileError(f"Config file {path} does not exist; pass an existing YAML file to --config.")
    if not path.is_file():
        raise ConfigError(f"Config file {path} is not a file; pass a YAML file to --config.")
    try:
        data = load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Config file {path} cannot be read ({exc}); pass a YAML text file to --config.") from None
    except YAMLRefused as exc:
        raise ConfigError(f"Config file {path} cannot be used: {exc}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {describe_yaml_error(exc)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys (teacher:, train:, ...), "
                          f"not {type(data).__name__}.")
    data.pop("description", None)
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base`; nested mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in override.items():
        switches_variant = isinstance(value, dict) and any(
            d in value and value[d] != (out.get(key) or {}).get(d) for d in DISCRIMINATORS
        )
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not switches_variant:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML, so numbers, lists and null keep their types."""
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}' needs the form key.path=value, e.g. --set train.lr=1e-5")
    key, raw = assignment.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{assignment}' has an empty key part; write it as key.path=value")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except YAMLRefused as exc:
        raise ConfigError(f"--set '{assignment}' cannot be used: {exc}.") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_set(data: dict, path: list[str], value: Any) -> dict:
    out = dict(data)
    node = out
    for part in path[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    if path[-1] in DISCRIMINATORS and node.get(path[-1]) != value:
        # Switching kind/name starts that section afresh: the old variant's keys would not be accepted.
        node.clear()
    node[path[-1]] = value
    return out


def resolve_config(
    preset: str | None = None, config_file: Path | None = None, overrides: list[str] = ()
) -> RunConfig:
    """Build and validate a RunConfig from a preset, an optional YAML file and `key.path=value` overrides."""
    name = DEFAULT_PRESET if preset is None else preset
    # Shorthands are written out in each source before merging, so a later source's key overrides an earlier one's.
    data = expand_shorthands(read_preset(name), f"Preset {name}")
    if config_file is not None:
        data = deep_merge(data, expand_shorthands(read_config_file(config_file), f"Config file {config_file}"))
    if overrides:
        # Overrides apply to the defaults-filled config, so `--set objective.sigma.t_max=0.5` works on a preset
        # that never spelled out objective.sigma.
        data = validate_config(data).model_dump(mode="json")
    for assignment in overrides:
        path, value = parse_set(assignment)
        targets = [path]
        if path == ["fake", FAKE_GUIDANCE_SHORTHAND]:
            targets = [["fake", key] for key in FAKE_GUIDANCE_KEYS]
        for target in targets:
            data = apply_set(data, target, value)
    return validate_config(data)


def expand_shorthands(data: dict, where: str) -> dict:
    """One source of a config (preset, file) with its shorthand keys written out (fake.guidance_scale)."""
    if isinstance(data.get("fake"), dict):
        data = {**data, "fake": expand_fake_guidance(data["fake"], where)}
    return data


def upgrade_saved_config(data: Any) -> Any:
    """A run's saved config.yaml in the current layout: keys that older versions wrote and that have since moved are
    translated (fake.sigma_mean_log and fake.sigma_std_log are now the log-normal fake.sigma)."""
    fake = data.get("fake") if isinstance(data, dict) else None
    if isinstance(fake, dict) and ("sigma_mean_log" in fake or "sigma_std_log" in fake) and "sigma" not in fake:
        fake = dict(fake)
        fake["sigma"] = {"kind": "lognormal", "mean_log": fake.pop("sigma_mean_log", -1.2),
                         "std_log": fake.pop("sigma_std_log", 1.2)}
        data = {**data, "fake": fake}
    return data


def validate_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, data)) from None


def _lookup(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _known_keys(loc: tuple) -> list[str]:
    """Field names accepted at the parent of `loc`, walking the pydantic models (discriminated unions merged)."""
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc[:-1]:
        next_models = []
        for model in models:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                continue
            next_models.extend(_models_in(field.annotation))
        if not next_models:
            return []
        models = next_models
    keys = []
    for model in models:
        keys.extend(k for k in model.model_fields if k not in keys)
    return keys


def _models_in(annotation) -> list[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def describe_validation_error(exc: ValidationError, data: dict) -> str:
    """Turn pydantic's errors into sentences naming the key, the value given and what is accepted."""
    lines = []
    for err in exc.errors():
        # Drop the discriminated-union tag pydantic inserts into the path (e.g. 'gmm', 'sim').
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _is_union_tag(p)))
        key = ".".join(str(p) for p in loc) or "(top level)"
        given = _lookup(data, loc)
        if err["type"] == "extra_forbidden":
            accepted = _known_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
            msg = f"Unknown key '{key}'."
            if hint:
                msg += f" Did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?"
            if accepted:
                msg += f" Accepted here: {', '.join(accepted)}."
        elif err["type"] == "missing":
            msg = f"Missing key '{key}': it is required."
        elif err["type"] == "union_tag_invalid":
            tag = err["ctx"]["discriminator"].strip("'")
            given = _lookup(data, loc + (tag,))
            msg = (f"Key '{key}.{tag}' has value {given!r}, which is not accepted; "
                   f"expected one of {err['ctx']['expected_tags']}.")
        elif err["type"] == "literal_error":
            msg = f"Key '{key}' has value {given!r}, which is not accepted; expected one of {err['ctx']['expected']}."
        elif err["type"] == "value_error" and isinstance(given, dict):
            # A check across a whole section: its sentence names the keys; the section's dump would bury it.
            msg = err["msg"].removeprefix("Value error, ") + "."
        else:
            msg = f"Key '{key}' has value {given!r}: {err['msg'].removeprefix('Value error, ')}."
        lines.append(msg)
    return "Invalid configuration: " + " ".join(lines)


def _union_tags() -> set[str]:
    import typing

    tags = set()
    for union in (TeacherConfig, ObjectiveConfig, SigmaConfig):
        for model in _models_in(union):
            for name in DISCRIMINATORS:
                field = model.model_fields.get(name)
                if field is not None:
                    tags.update(typing.get_args(field.annotation))
    return tags


def _is_union_tag(part: str) -> bool:
    return part in _union_tags()


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

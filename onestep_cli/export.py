"""Export a trained generator: a diffusers pipeline folder that runs its steps, or plain safetensors + JSON.

The diffusers folder is the teacher's pipeline with two parts replaced:

- the network (`unet/` or `transformer/`): the generator's weights, LoRA adapters merged in;
- the scheduler. One step: an `EulerDiscreteScheduler` on the teacher's own DDPM schedule with `use_karras_sigmas`,
  `sigma_max = sigma_init` and `timestep_spacing = "trailing"`. With `num_inference_steps=1` its one level is exactly
  sigma_init, so the pipeline starts from `sigma_init * z`, gives the network `x / sqrt(1 + sigma_init^2)` at the
  fractional timestep of sigma_init (log-sigma interpolation, the rule our adapter uses), and its Euler step to
  sigma = 0 returns the network's x0 estimate: the generator's `D(sigma_init z, sigma_init, c)`, decoded by the VAE.
  N steps (generator.num_steps): an `LCMScheduler`, DMD2's multi-step sampler (tianweiy/DMD2 README), on the
  teacher's schedule. It starts from unit noise, as the generator's first step does, and each step takes the
  network's x0 estimate and re-noises it to the next step's timestep with noise drawn from the call's generator,
  as `onestep sample` draws it per seed. Its `original_inference_steps` is the number of training timesteps, so
  `num_inference_steps=N` gives DMD2's timesteps T-1, T-1-T//N, ... (where N divides T), and `timestep_scaling` is
  large enough that its consistency-model boundary terms (c_skip, c_out) are exactly 0 and 1 in float32. Other
  step levels are passed as `timesteps=[...]`, written into onestep.json's call.

Call it with `guidance_scale=1.0` (guidance is distilled into the generator; the pipelines' defaults would apply it a
second time) and, for the same image as `onestep sample`, `generator=torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import torch

from .config import ConfigError, config_to_yaml
from .jsonio import to_json

FORMATS = ("diffusers", "safetensors")
EXPORT_FORMAT = "onestep-generator-1"


def export_run(source: str | Path, out: str | Path, format: str = "diffusers") -> dict:
    """Write the (EMA) generator of a run directory or checkpoint folder to `out`; returns what was written."""
    from .runs.loading import load_generator_source

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not known; use one of {', '.join(FORMATS)}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export folder {out} already exists and is not empty; give a new --out folder.")
    loaded = load_generator_source(Path(source))
    provenance = {"source": str(Path(source).resolve()), "step": loaded.step, "kimg": loaded.kimg,
                  "sigma_init": loaded.generator.sigma_init}
    if loaded.generator.num_steps > 1:
        provenance.update(num_steps=loaded.generator.num_steps, step_sigmas=list(loaded.generator.step_sigmas))
    if loaded.pipeline is None:
        if format == "diffusers":
            raise ConfigError(f"{source} distils a {loaded.config.teacher.kind} teacher, which has no diffusers "
                              "pipeline; export it with --format safetensors.")
        return _write_safetensors(loaded.generator.state_dict(), out, {
            **provenance, "data_shape": list(loaded.data_shape), "label_dim": loaded.label_dim,
            "config": json.loads(json.dumps(loaded.config.model_dump(mode="json")))})
    network = merged_network(loaded.generator.denoiser.model)
    teacher = loaded.pipeline
    info = {**provenance, "teacher": teacher.source, "network_class": type(network).__name__,
            "network_config": {k: v for k, v in dict(network.config).items() if not k.startswith("_")},
            "prediction_type": teacher.denoiser.prediction_type, "latent_shape": list(loaded.data_shape),
            "vae_scaling_factor": teacher.denoiser.vae_scaling_factor,
            "scheduler_config": dict(teacher.pipeline.scheduler.config)}
    if format == "safetensors":
        return _write_safetensors(network.state_dict(), out, info)
    return write_diffusers(network, teacher, out, info, loaded.config, loaded.generator)


def merged_network(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a diffusers network with any peft LoRA adapters merged into its weights (float32)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(model).float()
    lora = False
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            lora = True
    state = model.state_dict()
    if lora:
        state = {key.replace(".base_layer.", "."): value for key, value in state.items() if "lora_" not in key}
    plain = type(model).from_config(model.config)
    plain.load_state_dict(state, strict=True)
    return plain.eval().requires_grad_(False)


def one_step_scheduler(teacher_scheduler_config, sigma_init: float, sigma_min: float):
    """Euler on the teacher's schedule whose single step at `num_inference_steps=1` starts at exactly sigma_init."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(
        teacher_scheduler_config, use_karras_sigmas=True, use_exponential_sigmas=False, use_beta_sigmas=False,
        sigma_max=float(sigma_init), sigma_min=float(sigma_min), timestep_spacing="trailing",
        interpolation_type="linear", timestep_type="discrete", final_sigmas_type="zero")


LCM_TIMESTEP_SCALING = 1e6  # c_skip = 0.25 / (1e6 t)^2 < 3e-13 for t >= 1: the boundary terms vanish in float32.


def multi_step_scheduler(teacher_scheduler_config, schedule, step_sigmas) -> tuple[object, list[int] | None]:
    """An LCMScheduler that runs the generator's steps, and the `timesteps=` a call must pass (None: the scheduler's
    own for `num_inference_steps=N` are the generator's). ConfigError for steps off the teacher's integer timesteps."""
    from diffusers import LCMScheduler

    timesteps = [_integer_timestep(schedule, sigma) for sigma in step_sigmas]
    num_train_timesteps = schedule.num_timesteps
    scheduler = LCMScheduler.from_config(
        teacher_scheduler_config, original_inference_steps=num_train_timesteps, timestep_scaling=LCM_TIMESTEP_SCALING,
        clip_sample=False, thresholding=False, set_alpha_to_one=True)
    scheduler.set_timesteps(len(timesteps))
    own = [int(t) for t in scheduler.timesteps]
    return scheduler, (None if own == timesteps else timesteps)


def _integer_timestep(schedule, sigma: float) -> int:
    """The teacher timestep whose level is `sigma`; ConfigError if none is (LCMScheduler takes whole timesteps)."""
    sigmas = schedule.sigmas
    index = int((sigmas.log() - math.log(sigma)).abs().argmin())
    if index < 1 or abs(float(sigmas[index]) / float(sigma) - 1) > 1e-5:
        raise ConfigError(
            f"generator.step_sigmas holds {sigma:g}, which is not the level of a timestep from 1 to "
            f"{len(sigmas) - 1} of the teacher's schedule, so diffusers' LCMScheduler cannot run that step; "
            "export with --format safetensors, or train with the default step levels (generator.step_sigmas: null).")
    return index


def write_diffusers(network, teacher, out: Path, info: dict, config, generator) -> dict:
    """The teacher's pipeline folder with the generator's network and a scheduler of its steps (see the module
    doc)."""
    folder = Path(teacher.folder)
    part = "unet" if (folder / "unet").is_dir() and getattr(teacher.pipeline, "unet", None) is not None \
        else "transformer"
    out.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name in (part, "scheduler", "model_index.json"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, out / entry.name)
    network.save_pretrained(out / part, safe_serialization=True)
    steps, timesteps = generator.num_steps, None
    if steps == 1:
        scheduler = one_step_scheduler(teacher.pipeline.scheduler.config, info["sigma_init"], teacher.sigma_min)
    else:
        scheduler, timesteps = multi_step_scheduler(teacher.pipeline.scheduler.config, generator.denoiser.schedule,
                                                    generator.step_sigmas)
    scheduler.save_pretrained(out / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out / "model_index.json").write_text(to_json(index, indent=2))
    steps_argument = f"timesteps={timesteps}" if timesteps else f"num_inference_steps={steps}"
    call = (f"DiffusionPipeline.from_pretrained(folder)(prompt, {steps_argument}, guidance_scale=1.0, "
            "generator=torch.Generator().manual_seed(seed))")
    note = ("One step only: more inference steps run a Karras schedule below sigma_init that the generator was not "
            "trained for." if steps == 1 else
            f"{steps} steps, at the timesteps the generator was trained on; other step counts run timesteps it was "
            "not trained for.")
    (out / "onestep.json").write_text(to_json({
        "format": EXPORT_FORMAT, **{k: v for k, v in info.items() if k not in ("network_config", "scheduler_config")},
        "network": part, "call": call,
        "note": note + " guidance_scale must be 1.0: guidance is already distilled in."}, indent=1))
    (out / "onestep_config.yaml").write_text(config_to_yaml(config))
    return {"out": str(out), "format": "diffusers", "network": part, "call": call, **_summary(info)}


def _write_safetensors(state: dict, out: Path, info: dict) -> dict:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(out / "generator.safetensors"))
    (out / "generator.json").write_text(to_json({"format": EXPORT_FORMAT, **info}, indent=1))
    return {"out": str(out), "format": "safetensors", "files": ["generator.safetensors", "generator.json"],
            **_summary(info)}


def _summary(info: dict) -> dict:
    return {k: info[k] for k in ("source", "step", "kimg", "sigma_init", "num_steps", "step_sigmas") if k in info}


def _link_or_copy(source, destination) -> None:
    """Hard-link a teacher file (no extra disk for multi-GB text encoders), copying across file systems."""
    try:
        os.link(os.path.realpath(source), destination)
    except OSError:
        shutil.copy2(source, destination)

"""Export a trained generator: a diffusers pipeline folder that runs it in one step, or plain safetensors + JSON.

The diffusers folder is the teacher's pipeline with two parts replaced:

- the network (`unet/` or `transformer/`): the generator's weights, LoRA adapters merged in;
- the scheduler: an `EulerDiscreteScheduler` on the teacher's own DDPM schedule with `use_karras_sigmas`,
  `sigma_max = sigma_init` and `timestep_spacing = "trailing"`. With `num_inference_steps=1` its one level is exactly
  sigma_init, so the pipeline starts from `sigma_init * z`, gives the network `x / sqrt(1 + sigma_init^2)` at the
  fractional timestep of sigma_init (log-sigma interpolation, the rule our adapter uses), and its Euler step to
  sigma = 0 returns the network's x0 estimate: the generator's `D(sigma_init z, sigma_init, c)`, decoded by the VAE.

Call it with `guidance_scale=1.0` (guidance is distilled into the generator; the pipelines' defaults would apply it a
second time) and, for the same image as `onestep sample`, `generator=torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import copy
import json
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
    return write_diffusers(network, teacher, out, info, loaded.config)


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


def write_diffusers(network, teacher, out: Path, info: dict, config) -> dict:
    """The teacher's pipeline folder with the generator's network and a one-step scheduler (see the module doc)."""
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
    scheduler = one_step_scheduler(teacher.pipeline.scheduler.config, info["sigma_init"], teacher.sigma_min)
    scheduler.save_pretrained(out / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out / "model_index.json").write_text(to_json(index, indent=2))
    call = ("DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, guidance_scale=1.0, "
            "generator=torch.Generator().manual_seed(seed))")
    (out / "onestep.json").write_text(to_json({
        "format": EXPORT_FORMAT, **{k: v for k, v in info.items() if k not in ("network_config", "scheduler_config")},
        "network": part, "call": call,
        "note": "One step only: more inference steps run a Karras schedule below sigma_init that the generator was "
                "not trained for. guidance_scale must be 1.0: guidance is already distilled in."}, indent=1))
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
    return {k: info[k] for k in ("source", "step", "kimg", "sigma_init") if k in info}


def _link_or_copy(source, destination) -> None:
    """Hard-link a teacher file (no extra disk for multi-GB text encoders), copying across file systems."""
    try:
        os.link(os.path.realpath(source), destination)
    except OSError:
        shutil.copy2(source, destination)

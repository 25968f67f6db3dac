"""Export a trained generator: a diffusers pipeline folder that runs its steps, its LoRA adapter alone,
or plain safetensors + JSON.

The diffusers folder is the teacher's pipeline with two parts replaced:

- the network (`unet/` or `transformer/`): the generator's weights, LoRA adapters merged in;
- the scheduler. One step: an `EulerDiscreteScheduler` on the teacher's own DDPM schedule with `use_karras_sigmas`,
  `sigma_max = sigma_init` and `timestep_spacing = "trailing"`. With `num_inference_steps=1` its one level is exactly
  sigma_init, so the pipeline starts from `sigma_init * z`, gives the network `x / sqrt(1 + sigma_init^2)` at the
  fractional timestep of sigma_init (log-sigma interpolation, the rule our adapter uses), and its Euler step to
  sigma = 0 returns the network's x0 estimate: the generator's `D(sigma_init z, sigma_init, c)`, decoded by the VAE.
  A flow-matching teacher (SD3, SANA): a `FlowMatchEulerDiscreteScheduler` with no shift, called with
  `sigmas=[t_init]` (t_init = sigma_init / (1 + sigma_init)): its one Euler step from the unit noise the pipeline
  starts from, at timestep 1000 t_init, to t = 0 returns `z - t_init v`, the generator's x0 (which reads `x_t = z`).
  N steps (generator.num_steps): an `LCMScheduler`, DMD2's multi-step sampler (tianweiy/DMD2 README), on the
  teacher's schedule. It starts from unit noise, as the generator's first step does, and each step takes the
  network's x0 estimate and re-noises it to the next step's timestep with noise drawn from the call's generator,
  as `onestep sample` draws it per seed. Its `original_inference_steps` is the number of training timesteps, so
  `num_inference_steps=N` gives DMD2's timesteps T-1, T-1-T//N, ... (where N divides T), and `timestep_scaling` is
  large enough that its consistency-model boundary terms (c_skip, c_out) are exactly 0 and 1 in float32. Other
  step levels are passed as `timesteps=[...]`, written into onestep.json's call.

Call it with `guidance_scale=1.0` (guidance is distilled into the generator; the pipelines' defaults would apply it a
second time) and, for the same image as `onestep sample`, `generator=torch.Generator().manual_seed(seed)`.

A LoRA run (generator.lora_rank > 0) can instead export its adapter alone: `pytorch_lora_weights.safetensors` in
diffusers' layout (peft key names under `unet.` or `transformer.`, the LoraConfig in the file's metadata), which the
teacher's own pipeline reads with `load_lora_weights(folder)`, plus the one-step scheduler above in `scheduler/`. The
teacher's weights plus the adapter are the generator, because LoRA training leaves every base weight frozen.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import shutil
from pathlib import Path

import torch

from .config import ConfigError, config_to_yaml
from .denoisers.diffusers.loading import absent_components
from .denoisers.diffusers.schedule import FlowSigmaSchedule
from .jsonio import to_json

FORMATS = ("diffusers", "lora", "safetensors")
EXPORT_FORMAT = "onestep-generator-1"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # The file name diffusers' `load_lora_weights(folder)` looks for.


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
        if format != "safetensors":
            raise ConfigError(f"{source} distils a {loaded.config.teacher.kind} teacher, which has no diffusers "
                              "pipeline; export it with --format safetensors.")
        return _write_safetensors(loaded.generator.state_dict(), out, {
            **provenance, "data_shape": list(loaded.data_shape), "label_dim": loaded.label_dim,
            "config": json.loads(json.dumps(loaded.config.model_dump(mode="json")))})
    if format == "lora":
        return write_lora(loaded, out, provenance)
    network = merged_network(loaded.generator.denoiser.model)
    teacher = loaded.pipeline
    info = {**provenance, "teacher": teacher.source, "network_class": type(network).__name__,
            "network_config": {k: v for k, v in dict(network.config).items() if not k.startswith("_")},
            "prediction_type": getattr(teacher.denoiser, "prediction_type", "flow_prediction"),
            "latent_shape": list(loaded.data_shape),
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


def one_step_flow_scheduler(teacher_scheduler_config):
    """Euler on the rectified flow with no shift, so a call's `sigmas=[t_init]` is the one step's t as given."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(
        teacher_scheduler_config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False)


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
    part = network_part(teacher)
    out.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name in (part, "scheduler", "model_index.json"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, out / entry.name)
    network.save_pretrained(out / part, safe_serialization=True)
    steps, timesteps, sigmas = generator.num_steps, None, None
    if steps == 1 and isinstance(generator.denoiser.schedule, FlowSigmaSchedule):
        scheduler = one_step_flow_scheduler(teacher.pipeline.scheduler.config)
        sigmas = [float(FlowSigmaSchedule.flow_time(torch.tensor(info["sigma_init"], dtype=torch.float64)))]
    elif steps == 1:
        scheduler = one_step_scheduler(teacher.pipeline.scheduler.config, info["sigma_init"], teacher.sigma_min)
    else:
        scheduler, timesteps = multi_step_scheduler(teacher.pipeline.scheduler.config, generator.denoiser.schedule,
                                                    generator.step_sigmas)
    scheduler.save_pretrained(out / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out / "model_index.json").write_text(to_json(index, indent=2))
    steps_argument = (f"sigmas={sigmas}" if sigmas else f"timesteps={timesteps}" if timesteps
                      else f"num_inference_steps={steps}")
    absent = "".join(f", {name}=None" for name in absent_components(folder))  # E.g. SD3 saved without T5.
    tokens = config.teacher.max_sequence_length
    tokens = "" if tokens is None else f", max_sequence_length={tokens}"
    call = (f"DiffusionPipeline.from_pretrained(folder{absent})(prompt, {steps_argument}, guidance_scale=1.0"
            f"{tokens}, generator=torch.Generator().manual_seed(seed))")
    note = ("One step at the generator's t_init: pass sigmas as the call does (without them the pipeline starts at "
            "t = 1)." if sigmas else
            "One step only: more inference steps run a Karras schedule below sigma_init that the generator was not "
            "trained for." if steps == 1 else
            f"{steps} steps, at the timesteps the generator was trained on; other step counts run timesteps it was "
            "not trained for.")
    (out / "onestep.json").write_text(to_json({
        "format": EXPORT_FORMAT, **{k: v for k, v in info.items() if k not in ("network_config", "scheduler_config")},
        "network": part, "call": call,
        "note": note + " guidance_scale must be 1.0: guidance is already distilled in."}, indent=1))
    (out / "onestep_config.yaml").write_text(config_to_yaml(config))
    return {"out": str(out), "format": "diffusers", "network": part, "call": call, **_summary(info)}


def network_part(teacher) -> str:
    """The pipeline component the generator replaces or adapts: `unet` or `transformer`."""
    has_unet = (Path(teacher.folder) / "unet").is_dir() and getattr(teacher.pipeline, "unet", None) is not None
    return "unet" if has_unet else "transformer"


def write_lora(loaded, out: Path, provenance: dict) -> dict:
    """The generator's LoRA adapter for the teacher's pipeline, its one-step scheduler and how to load both."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    config, teacher, model = loaded.config, loaded.pipeline, loaded.generator.denoiser.model
    if not config.generator.lora_rank:
        raise ConfigError(f"{provenance['source']} trained every weight of its generator (generator.lora_rank: 0), "
                          "so it has no LoRA adapter to export; use --format diffusers, which writes the whole network "
                          "into a pipeline folder.")
    if isinstance(teacher.denoiser.schedule, FlowSigmaSchedule):
        raise ConfigError(f"{provenance['source']} distils a flow-matching teacher ({type(model).__name__}); the LoRA "
                          "export writes a DDPM-family one-step scheduler, so use --format diffusers, whose "
                          "flow-matching scheduler and call run the generator's step.")
    if loaded.generator.num_steps > 1:
        raise ConfigError(f"{provenance['source']} is a {loaded.generator.num_steps}-step generator; the LoRA export "
                          "writes a one-step scheduler beside the adapter, so use --format diffusers, whose scheduler "
                          "runs its steps.")
    moved = _moved_base_weight(model, teacher.denoiser.model)
    if moved:
        raise ConfigError(f"the generator's frozen weight {moved} differs from the teacher's at {teacher.source}: the "
                          "teacher changed since training, so the adapter alone would not give this generator; use "
                          "--format diffusers, which carries the whole network.")
    part, pipeline_class = network_part(teacher), type(teacher.pipeline)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    lora_config = model.peft_config["default"].to_dict()  # As diffusers' LoRA training scripts record it.
    has_loader = issubclass(pipeline_class, LoraBaseMixin)
    out.mkdir(parents=True, exist_ok=True)
    if has_loader:
        pipeline_class.save_lora_weights(out, weight_name=LORA_WEIGHTS, **{
            f"{part}_lora_layers": layers, f"{part}_lora_adapter_metadata": lora_config})
    else:  # PixArt's pipeline has no LoRA loader: the same layout, loaded with peft (README.md).
        LoraBaseMixin.write_lora_layers(
            LoraBaseMixin.pack_weights(layers, part), str(out), is_main_process=True, weight_name=LORA_WEIGHTS,
            save_function=None, safe_serialization=True,
            lora_adapter_metadata={f"{part}.{key}": value for key, value in lora_config.items()})
    one_step_scheduler(teacher.pipeline.scheduler.config, provenance["sigma_init"],
                       teacher.sigma_min).save_pretrained(out / "scheduler")
    lora = {"r": lora_config["r"], "lora_alpha": lora_config["lora_alpha"],
            "target_modules": sorted(lora_config["target_modules"])}
    info = {"format": EXPORT_FORMAT, **provenance, "teacher": teacher.source,
            "teacher_revision": config.teacher.revision, "pipeline_class": pipeline_class.__name__, "network": part,
            "weights": LORA_WEIGHTS, "lora": lora, "loader": "load_lora_weights" if has_loader else "peft",
            "scheduler": "scheduler/",
            "note": "Load the teacher's pipeline, then this adapter and scheduler/ as README.md shows. One step only, "
                    "guidance_scale 1.0: guidance is already distilled in."}
    (out / "onestep.json").write_text(to_json(info, indent=1))
    (out / "README.md").write_text(lora_readme(info, pipeline_class, out))
    (out / "onestep_config.yaml").write_text(config_to_yaml(config))
    return {"out": str(out), "format": "lora", "network": part, "teacher": teacher.source, "rank": lora["r"],
            "loader": info["loader"], "files": [LORA_WEIGHTS, "scheduler/", "onestep.json", "README.md",
                                                "onestep_config.yaml"], **_summary(provenance)}


def _moved_base_weight(model: torch.nn.Module, teacher_model: torch.nn.Module) -> str | None:
    """The first non-LoRA weight of `model` that is not the teacher's (up to the EMA's float rounding), or None."""
    theirs = teacher_model.state_dict()
    for key, value in model.state_dict().items():
        name = key.replace(".base_layer.", ".")
        if "lora_" not in key and not torch.allclose(value.float(), theirs[name].float(), rtol=1e-4, atol=1e-6):
            return name
    return None


LORA_README = '''# One-step generator as a LoRA adapter

The step-{step} generator of the onestep run {source}: a rank-{rank} LoRA adapter of the {part} of the teacher
{teacher}, and in `scheduler/` the Euler scheduler whose single step starts at sigma_init = {sigma_init}.

```python
{imports}import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler

folder = {out}
pipe = DiffusionPipeline.from_pretrained({teacher}{revision})
{load}
pipe.scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0{extra},
             generator=torch.Generator().manual_seed(seed)).images[0]
```

One step only, and `guidance_scale=1.0`: guidance is already distilled into the generator. With the same prompt and
seed this is the image `onestep sample` writes. `onestep.json` records the run, step and LoRA settings,
`onestep_config.yaml` the run's config.
'''

PEFT_IMPORTS = '''import json
from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file
'''

PEFT_LOAD = '''lora = json.loads((Path(folder) / "onestep.json").read_text())["lora"]
inject_adapter_in_model(LoraConfig(**lora), pipe.{part})
weights = load_file(str(Path(folder) / "{weights}"))
set_peft_model_state_dict(pipe.{part}, {{key.removeprefix("{part}."): value for key, value in weights.items()}})'''


def lora_readme(info: dict, pipeline_class, out: Path) -> str:
    """How to run the exported adapter (`info`: its onestep.json) in one step: diffusers' `load_lora_weights`, or peft
    where the pipeline has no LoRA loader (PixArt); prompt cleaning and resolution binning off where the pipeline has
    them, as onestep encodes prompts uncleaned at the run's size."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    extra = "".join(f", {name}=False" for name in ("use_resolution_binning", "clean_caption") if name in parameters)
    peft = info["loader"] == "peft"
    part = info["network"]
    revision = f", revision={json.dumps(info['teacher_revision'])}" if info["teacher_revision"] else ""
    return LORA_README.format(
        step=info["step"], source=info["source"], rank=info["lora"]["r"], part=part,
        teacher=json.dumps(info["teacher"]), revision=revision, sigma_init=info["sigma_init"],
        out=json.dumps(str(out)), extra=extra,
        imports=PEFT_IMPORTS + "\n" if peft else "",
        load=PEFT_LOAD.format(part=part, weights=LORA_WEIGHTS) if peft else "pipe.load_lora_weights(folder)")


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

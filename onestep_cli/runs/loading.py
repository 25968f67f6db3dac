"""Load a trained generator back from a run directory or one of its checkpoints."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import RunConfig
from ..denoisers.base import Denoiser
from ..denoisers.generator import OneStepGenerator
from ..errors import InputError, MissingFileError
from .checkpoint import (PREFIX, CheckpointError, find_latest_checkpoint, is_sharded, read_checkpoint, read_sharded,
                         read_state, verify_checkpoint)
from .networks import build_networks
from .run_dir import RunDir


@dataclass
class GeneratorSource:
    path: Path
    config: RunConfig
    generator: OneStepGenerator
    teacher: Denoiser
    data_shape: tuple[int, ...]
    label_dim: int
    step: int
    kimg: float
    pipeline: object | None = None  # A text-to-image run's DiffusersTeacher: prompt encoders and VAE.


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / "state.json").is_file()


def is_generator_source(path: Path) -> bool:
    return RunDir(path).is_run() or is_checkpoint_dir(path)


def read_generator_weights(folder: Path, template: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, EMA generator weights, or the raw generator's without EMA) of a verified checkpoint of either
    format; `template` (a generator of the run's architecture) gives the names and shapes of a sharded one."""
    problem = verify_checkpoint(folder)
    if problem:
        raise CheckpointError(problem)
    state = read_state(folder)
    name = "ema" if "ema" in state.get("modules", ["ema"]) else "generator"
    if is_sharded(folder):
        weights = {name: {k: v.clone() for k, v in template.state_dict().items()}}
        read_sharded(folder, weights)
        return state, weights[name]
    _, modules, _ = read_checkpoint(folder, verify=False)
    return state, modules.get("ema", modules["generator"])


def load_generator_source(path: Path, device: str | torch.device = "cpu") -> GeneratorSource:
    """The EMA generator (raw generator when the run has no EMA) of a run directory or checkpoint folder.

    A run directory gives its newest intact checkpoint; `export/` is used when no checkpoint remains.
    """
    path = Path(path)
    if is_checkpoint_dir(path):
        run, folder = RunDir(path.parent.parent), path
    elif RunDir(path).is_run():
        run = RunDir(path)
        run.check_layout()
        latest = find_latest_checkpoint(run.checkpoints, warn=lambda message: print(message, file=sys.stderr))
        folder = latest[1] if latest else None
    elif not path.exists():
        raise MissingFileError(f"{path} does not exist; pass a onestep run directory (with config.yaml) or a "
                               "checkpoint folder (checkpoints/step-XXXXXXXX).")
    else:
        raise InputError(f"{path} is neither a onestep run directory (with config.yaml) nor a checkpoint folder "
                         "(checkpoints/step-XXXXXXXX); pass one of those.")
    config = run.read_config()
    networks = build_networks(config, prompts=False)  # Sampling takes its own prompts.
    if folder is not None:
        state, generator_weights = read_generator_weights(folder, networks.generator)
        step, kimg = state["step"], state["kimg"]
    elif (run.export / "generator.safetensors").is_file():
        generator_weights = load_file(str(run.export / "generator.safetensors"))
        status = run.read_status()
        step, kimg = status.get("step", 0), status.get("kimg", 0.0)
    else:
        raise InputError(f"Run {run.path} has no checkpoint and no export yet; run `onestep distill --out "
                         f"{run.path}` to train it first.")
    networks.generator.load_state_dict(generator_weights)
    generator = networks.generator.to(device).eval().requires_grad_(False)
    return GeneratorSource(path, config, generator, networks.teacher.to(device), networks.data_shape,
                           networks.label_dim, step, kimg, networks.pipeline)

"""Load a trained generator back from a run directory or one of its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ConfigError, RunConfig
from ..denoisers.base import Denoiser
from ..denoisers.generator import OneStepGenerator
from .checkpoint import PREFIX, list_checkpoints, read_checkpoint
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


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / "state.json").is_file()


def is_generator_source(path: Path) -> bool:
    return RunDir(path).is_run() or is_checkpoint_dir(path)


def load_generator_source(path: Path, device: str | torch.device = "cpu") -> GeneratorSource:
    """The EMA generator (raw generator when the run has no EMA) of a run directory or checkpoint folder.

    A run directory gives its newest complete checkpoint; `export/` is used when no checkpoint remains.
    """
    path = Path(path)
    if is_checkpoint_dir(path):
        run, folder = RunDir(path.parent.parent), path
    elif RunDir(path).is_run():
        run = RunDir(path)
        checkpoints = list_checkpoints(run.checkpoints)
        folder = checkpoints[-1] if checkpoints else None
    else:
        raise ConfigError(f"{path} is neither a onestep run directory (with config.yaml) nor a checkpoint folder "
                          "(checkpoints/step-XXXXXXXX); pass one of those.")
    config = run.read_config()
    networks = build_networks(config)
    if folder is not None:
        state, weights, _ = read_checkpoint(folder)
        generator_weights = weights.get("ema", weights["generator"])
        step, kimg = state["step"], state["kimg"]
    elif (run.export / "generator.safetensors").is_file():
        generator_weights = load_file(str(run.export / "generator.safetensors"))
        status = run.read_status()
        step, kimg = status.get("step", 0), status.get("kimg", 0.0)
    else:
        raise ConfigError(f"Run {run.path} has no checkpoint and no export yet; run `onestep distill --out "
                          f"{run.path}` to train it first.")
    networks.generator.load_state_dict(generator_weights)
    generator = networks.generator.to(device).eval().requires_grad_(False)
    return GeneratorSource(path, config, generator, networks.teacher.to(device), networks.data_shape,
                           networks.label_dim, step, kimg)

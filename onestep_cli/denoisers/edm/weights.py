"""Our export format for EDM networks: `model.safetensors` (the state dict) next to `config.json` (how to build it).

`config.json` holds `{"format": "onestep-edm", "format_version": 1, "class_name": ..., "init_kwargs": {...}}`, where
`init_kwargs` are the constructor arguments of EDMPrecond/VPPrecond/VEPrecond (EDM's own argument names). It is
written by Python's json module, so an infinite `sigma_max` (EDMPrecond's default) appears as `Infinity`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import MissingFileError
from .precond import PRECOND_TYPES, EDMLoadError, _Precond, build_precond
from .snapshot import load_edm_snapshot

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "onestep-edm"
FORMAT_VERSION = 1


def save_edm_weights(denoiser: _Precond, out_dir: str | os.PathLike) -> Path:
    """Write `denoiser`'s weights and constructor arguments to `out_dir` (created if needed); returns `out_dir`."""
    class_name = type(denoiser).__name__
    if PRECOND_TYPES.get(class_name) is not type(denoiser):
        raise TypeError(f"save_edm_weights takes an EDMPrecond, VPPrecond or VEPrecond, not a {class_name}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, class_name=class_name,
                  init_kwargs=denoiser.init_kwargs)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in denoiser.state_dict().items()}
    save_file(state, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_edm_weights(weights_dir: str | os.PathLike) -> _Precond:
    """The network saved by `save_edm_weights` in `weights_dir`, in eval mode on the CPU."""
    weights_dir = Path(weights_dir)
    config_path, weights_path = weights_dir / CONFIG_NAME, weights_dir / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.is_file():
            raise MissingFileError(f"{required} does not exist; pass a folder written by save_edm_weights or "
                                   f"`onestep convert`.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise EDMLoadError(f"{config_path} is not valid JSON ({error}); re-export the weights.") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise EDMLoadError(f"{config_path} is not an onestep EDM config (its format is not {FORMAT!r}); pass a folder "
                           f"written by save_edm_weights or `onestep convert`.")
    if config.get("format_version") != FORMAT_VERSION:
        raise EDMLoadError(f"{config_path} has format_version {config.get('format_version')!r}; this onestep reads "
                           f"version {FORMAT_VERSION}. Re-export the weights with this version.")
    try:
        net = build_precond(config.get("class_name"), config.get("init_kwargs") or {})
    except ValueError as error:
        raise EDMLoadError(f"{config_path}: {error}") from error
    try:
        state = load_file(weights_path)
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as error:
        raise EDMLoadError(f"{weights_path} does not match the network described by {config_path}: {error}") from error
    return net.eval()


def convert_snapshot(pkl_path: str | os.PathLike, out_dir: str | os.PathLike, key: str = "ema") -> Path:
    """Safely read the `key` network of an EDM/SiD `.pkl` snapshot and write it to `out_dir` in our format."""
    return save_edm_weights(load_edm_snapshot(pkl_path, key=key), out_dir)
